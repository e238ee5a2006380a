"""``qwen3emb-export push``: publish a bundle on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import configure_logging


def push(
    bundle: Annotated[Path, typer.Argument(help="The bundle directory.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository, owner/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")]
    = False,
    token: Annotated[str | None, typer.Option(
        "--token", help="Hub token with write access (default: HF_TOKEN or the saved login).")]
    = None,
) -> None:
    """Upload a bundle to the Hugging Face Hub, model card (README.md) included.

    The repository then loads in sentence-transformers, transformers.js, fastembed, TEI and
    llama.cpp by its id (see docs/interop.md).

    Example:
        qwen3emb-export push ./qwen3-emb-0.6b you/Qwen3-Embedding-0.6B-ONNX --private
    """
    from qwen3emb.hub import push_bundle

    configure_logging()
    typer.echo(push_bundle(bundle, repo_id, private=private, token=token))
