"""Stage a bundle in a temporary sibling directory and move it into place only when every
graph it holds loads: nothing that looks complete is ever left half-written or unloadable."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen3emb.constants import EXTERNAL_DATA_SUFFIX
from qwen3emb.errors import OutputError

logger = logging.getLogger(__name__)

FULL_LOAD_BYTES = 2 << 30
"""Graphs whose weights are at most this large are loaded whole by the check. Larger ones
are loaded as a skeleton (weights declared as graph inputs), so that a big export does not
read its weights a second time: the check then proves what onnxruntime decides from the graph
(node names, operators and their kernels, shapes and types), not the weight bytes, which the
writer produced from the shards tensor by tensor."""


@contextmanager
def staged_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; move it into place only if the block succeeds.

    A crash or Ctrl-C removes the temporary directory, so no half-written bundle remains.

    Raises:
        OutputError: ``out`` exists (without ``force``) or its parent is not writable.
    """
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists",
                          hint="Delete it, choose another path, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a directory",
                          hint="Choose another path")
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write to '{out.parent}': {e.strerror or e}",
                          hint="Choose a writable output directory") from e
    try:
        yield stage
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_loadable(stage: Path, artifacts: list[dict[str, Any]]) -> None:
    """Load every ONNX graph of the staged bundle in onnxruntime, and every GGUF model in
    llama.cpp when llama-cpp-python is installed.

    Raises:
        OutputError: a file does not load; names the file and onnxruntime's / llama.cpp's
            reason (every failing file, in one message).
    """
    problems = []
    for entry in artifacts:
        path = stage / entry["path"]
        if entry.get("kind") == "onnx" and path.suffix == ".onnx":
            problem = _onnx_problem(path)
        elif entry.get("kind") == "gguf" and entry.get("role", "model") == "model":
            problem = _gguf_problem(path)
        else:
            continue
        if problem:
            problems.append(f"{entry['path']}: {problem}")
        else:
            logger.info("load check: %s loads", entry["path"])
    if problems:
        raise OutputError(f"the export wrote files that do not load: {'; '.join(problems)}",
                          hint="Nothing was written to the output; please report this with "
                               "the checkpoint's config.json")


def _weight_bytes(path: Path) -> int:
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _onnx_problem(path: Path) -> str | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        if _weight_bytes(path) <= FULL_LOAD_BYTES:
            ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        else:
            with tempfile.TemporaryDirectory(prefix="qwen3emb-load-check-") as tmp:
                skeleton = Path(tmp) / path.name
                _write_skeleton(path, skeleton)
                ort.InferenceSession(os.fspath(skeleton), options,
                                     providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        return f"onnxruntime refuses it: {str(e).strip().splitlines()[0][:300]}"
    return None


def _write_skeleton(path: Path, out: Path) -> None:
    """The graph with every externally stored weight turned into a graph input of the same
    type and shape: loads without reading a weight byte."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    graph = model.graph
    keep = []
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save_model(model, os.fspath(out))


def _gguf_problem(path: Path) -> str | None:
    try:
        from qwen3emb.runtime._llama import llama_library
        lib = llama_library()
    except Exception:  # the gguf extra is optional: no llama.cpp, no check
        return None
    from qwen3emb.runtime._llama import load_model_problem

    return load_model_problem(lib, path)
