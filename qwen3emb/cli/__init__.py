"""The ``qwen3emb-export`` command line. Wiring only: each command calls one library function."""

from __future__ import annotations

from qwen3emb.cli.app import create_app


def main() -> None:
    """Console-script entry point."""
    create_app()(prog_name="qwen3emb-export")


__all__ = ["create_app", "main"]
