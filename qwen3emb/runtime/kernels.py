"""Run a bundle's int8 MatMuls on the fastest integer kernel that is exact on this CPU.

Bundles store int8 weight codes as uint8 around 128 (``qwen3emb.export.quant.ops``): uint8 ×
uint8 is exact on every CPU, so any tool that loads the file gets the numbers its parity report
measured. onnxruntime's uint8 × int8 kernel is much faster where it is exact too, on x86 CPUs with
VNNI (AVX-512 VNNI, AVX-VNNI): 1024 × 1024 × 3072 at 128 rows on 2 threads, 1.02 ms against
2.47 ms for uint8 × uint8 and 4.04 ms for the fp32 MatMul (onnxruntime 1.32, AMD EPYC with
AVX-512 VNNI). Without VNNI that kernel adds pairs of products in int16 (``vpmaddubsw``) and
saturates, so it is used only where VNNI is present.

:func:`for_cpu` returns the graph to load: the bundle's own file, or, on a VNNI CPU, a copy
with the same codes shifted to int8 (the products and sums are the same integers, so the
outputs are the same), written once to a cache directory. ``QWEN3EMB_INT8_KERNEL`` =
``u8u8`` or ``u8s8`` overrides the choice (``u8s8`` on a CPU without VNNI saturates: for tests
only).

Importable without torch; the copy needs the ``onnx`` package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KERNEL_ENV = "QWEN3EMB_INT8_KERNEL"
CACHE_ENV = "QWEN3EMB_CACHE"
KERNELS = ("u8u8", "u8s8")
STORED_ZERO_POINT = 128
# Weight input and weight zero-point input of each integer MatMul onnxruntime runs.
WEIGHT_SLOTS: dict[str, tuple[int, int]] = {
    "MatMulInteger": (1, 3),
    "MatMulIntegerToFloat": (1, 5),
    "DynamicQuantizeMatMul": (1, 3),
}
EXTERNAL_THRESHOLD = 1 << 30
MARKER = "unchanged"
SOURCE = "source"
"""A copy's record of the file it was made from (:func:`prune` drops stale copies)."""


@cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (x86 only; reads ``/proc/cpuinfo`` or numpy's CPU table)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"avx512_vnni", "avx_vnni"})
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
    return bool(features.get("AVX512VNNI") or features.get("AVXVNNI"))


def int8_kernel() -> str:
    """``u8s8`` where that kernel is exact (or forced), else ``u8u8``."""
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced in KERNELS:
        return forced
    return "u8s8" if cpu_has_vnni() else "u8u8"


def cache_root() -> Path:
    if root := os.environ.get(CACHE_ENV):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3emb"


def _key(model: Path) -> str:
    """Identity of ``model`` and its external data (path, size, modification time)."""
    parts = []
    for path in (model, model.with_name(model.name + "_data")):
        if path.exists():
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def for_cpu(model: Path, cache: Path | None = None) -> Path:
    """The file onnxruntime's CPU provider should load for ``model`` (see the module doc).

    Args:
        cache: where copies go (default :func:`cache_root`).

    Never raises for a cache problem: it logs and returns ``model`` (correct, slower).
    """
    if int8_kernel() == "u8u8":
        return model
    folder = (cache or cache_root()) / "u8s8" / _key(model)
    copy = folder / model.name
    if (folder / MARKER).exists():
        return model
    if copy.exists():
        return copy
    try:
        return _write_copy(model, folder)
    except ImportError:
        logger.warning("the onnx package is missing: %s runs on the uint8 x uint8 kernel "
                       "(pip install onnx for the faster exact one)", model.name)
    except OSError as e:
        logger.warning("cannot write the int8 kernel copy of %s under %s (%s): running it "
                       "on the uint8 x uint8 kernel", model.name, folder.parent, e)
    return model


def _write_copy(model: Path, folder: Path) -> Path:
    """Write the int8-code copy of ``model`` into ``folder`` (atomically), or a marker file
    when ``model`` has no uint8 weight codes; returns the path to load."""
    import onnx

    proto = onnx.load(os.fspath(model))
    shifted = shift_weight_codes(proto)
    folder.parent.mkdir(parents=True, exist_ok=True)
    prune(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        (staging / SOURCE).write_text(os.fspath(model.resolve()))
        if not shifted:
            (staging / MARKER).write_text(f"{model}: no uint8 weight codes\n")
        else:
            big = proto.ByteSize() > EXTERNAL_THRESHOLD
            onnx.save(proto, os.fspath(staging / model.name), save_as_external_data=big,
                      all_tensors_to_one_file=True, location=model.name + "_data")
        try:
            staging.rename(folder)
        except OSError:  # another process won the race: use its copy
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not shifted:
        return model
    logger.info("%s: %d int8 weights on the uint8 x int8 kernel (copy in %s)", model.name,
                shifted, folder)
    return folder / model.name


def shift_weight_codes(proto: Any) -> int:
    """Turn every uint8 weight initializer around 128 of an integer MatMul into int8 codes
    around 0 (in place). Returns how many weights changed."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    pairs: dict[str, str] = {}
    for node in proto.graph.node:
        slots = WEIGHT_SLOTS.get(node.op_type)
        if slots is None or len(node.input) <= slots[1]:
            continue
        weight, zero = node.input[slots[0]], node.input[slots[1]]
        w, z = inits.get(weight), inits.get(zero)
        if w is None or z is None or w.data_type != TensorProto.UINT8 \
                or z.data_type != TensorProto.UINT8:
            continue
        if not np.all(numpy_helper.to_array(z) == STORED_ZERO_POINT):
            continue
        pairs[weight] = zero
    # A tensor also read by another kind of node keeps its type.
    other_readers = {name for node in proto.graph.node if node.op_type not in WEIGHT_SLOTS
                     for name in node.input}
    done: set[str] = set()
    for weight, zero in pairs.items():
        if weight in other_readers or zero in other_readers:
            continue
        for name in (weight, zero):
            if name in done:
                continue
            array = numpy_helper.to_array(inits[name])
            codes = (array.astype(np.int16) - STORED_ZERO_POINT).astype(np.int8)
            inits[name].CopyFrom(numpy_helper.from_array(codes, name))
            done.add(name)
    return sum(1 for w in pairs if w in done)


def prune(root: Path) -> int:
    """Remove the copies under ``root`` whose source file is gone or has changed since (an
    export's staging files, a re-exported bundle). Returns how many were removed."""
    removed = 0
    for entry in root.iterdir() if root.is_dir() else ():
        record = entry / SOURCE
        if entry.name.startswith(".") or not record.is_file():
            continue
        source = Path(record.read_text().strip())
        if not source.exists() or _key(source) != entry.name:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
