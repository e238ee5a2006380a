"""The runtime (and the embed command) work with torch and transformers impossible to import."""

from __future__ import annotations

from pathlib import Path


def test_runtime_imports_and_embeds_without_torch(tiny_bundle: Path, run_without_torch) -> None:
    result = run_without_torch(f"""
        import sys
        from qwen3emb.runtime import TextEmbedder
        vectors = TextEmbedder({str(tiny_bundle)!r}).encode_queries(["no torch here"])
        assert vectors.shape == (1, 64), vectors.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_embed_and_inspect_work_without_torch(tiny_bundle: Path, run_without_torch) -> None:
    result = run_without_torch(f"""
        import sys
        from typer.testing import CliRunner
        from qwen3emb.cli import create_app
        app = create_app()
        for args in (["embed", {str(tiny_bundle)!r}, "hi"], ["inspect", {str(tiny_bundle)!r}]):
            out = CliRunner().invoke(app, args)
            assert out.exit_code == 0, (args, out.output, out.exception)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_blocker_really_blocks(run_without_torch) -> None:
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "blocked import of torch" in result.stderr
