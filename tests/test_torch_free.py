"""The runtime (and the embed command) work with torch and transformers impossible to import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "safetensors")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_runtime_imports_and_embeds_without_torch(tiny_bundle: Path) -> None:
    result = _run(f"""
        import sys
        from qwen3emb.runtime import TextEmbedder
        vectors = TextEmbedder({str(tiny_bundle)!r}).encode_queries(["no torch here"])
        assert vectors.shape == (1, 64), vectors.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_embed_and_inspect_work_without_torch(tiny_bundle: Path) -> None:
    result = _run(f"""
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


def test_blocker_really_blocks() -> None:
    result = _run("import torch")
    assert result.returncode != 0 and "blocked import of torch" in result.stderr
