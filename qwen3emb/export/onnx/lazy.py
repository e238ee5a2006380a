"""Rewrite an ONNX graph whose weights stay on disk, and write it one tensor at a time.

A variant (fp16, int8, int4) of a 30 GB fp32 graph cannot be built in memory on a 24 GB
machine. Here the graph is loaded without its weights: every weight initializer is replaced by
an empty placeholder of the same name, and the rewrites work on that small ``ModelProto``.
Each initializer of the result gets a *recipe*: a function that reads its fp32 source tensor
(memory-mapped by onnx_ir), transforms it (cast, scale rows, quantize) and returns the bytes.
``onnx_ir`` evaluates the recipes one by one while it writes the data file, so only one
source tensor and its outputs are in memory at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import EXTERNAL_DATA_SUFFIX

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Recipe:
    """How to compute one initializer of the output: dtype, shape and a function for the data."""

    dtype: Any  # onnx.TensorProto data type
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


class LazyGraph:
    """An ONNX graph without its weights, plus the recipes of its initializers.

    Args:
        source: an ``.onnx`` file; its external data (if any) must sit beside it.

    Attributes:
        model: the ``onnx.ModelProto`` with empty placeholders for the weights; rewrite freely.
        recipes: output initializer name → :class:`Recipe`. Starts as "copy the source".
        reads: how many times each source tensor was read (instrumentation for tests).
    """

    def __init__(self, source: Path) -> None:
        import onnx
        import onnx_ir as ir

        self.source = source
        self.model = onnx.load(os.fspath(source), load_external_data=False)
        # onnx_ir memory-maps external data only when a tensor is read, and releases it on
        # request; inline tensors are small by construction.
        self._tensors = {name: value.const_value for name, value in
                         ir.load(os.fspath(source)).graph.initializers.items()
                         if value.const_value is not None}
        self.recipes: dict[str, Recipe] = {}
        self.reads: dict[str, int] = {}
        self.row_scales: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        kept = []
        self.has_external_data = False
        """Whether the source keeps weights in an external data file."""
        for tensor in self.model.graph.initializer:
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            self.has_external_data |= external
            # Every float initializer is read lazily, so rewrites treat all weights alike.
            if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                name = tensor.name
                self._shapes[name] = tuple(tensor.dims)
                self.recipes[name] = Recipe(tensor.data_type, tuple(tensor.dims),
                                            self.reader(name))
                kept.append(placeholder(name, tensor.data_type))
            else:
                if external:
                    onnx.external_data_helper.load_external_data_for_tensor(
                        tensor, os.fspath(source.parent))
                kept.append(tensor)
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a lazily read initializer."""
        return self.recipes[name].shape

    def is_lazy(self, name: str) -> bool:
        return name in self.recipes

    def reader(self, name: str) -> Callable[[], np.ndarray]:
        """A recipe function: :meth:`read` of ``name``."""
        return lambda: self.read(name)

    def read(self, name: str) -> np.ndarray:
        """The fp32 source tensor ``name``, with any row scaling (smoothing) applied."""
        tensor = self._tensors[name]
        # A private copy, in the declared shape (onnx_ir reads some scalars as [1]).
        array = np.array(tensor.numpy(), dtype=np.float32).reshape(self._shapes[name])
        if hasattr(tensor, "release"):
            tensor.release()  # unmap the external data file
        self.reads[name] = self.reads.get(name, 0) + 1
        scale = self.row_scales.get(name)
        if scale is not None:
            array *= scale.reshape((-1,) + (1,) * (array.ndim - 1))
        return array

    def replace(self, name: str, recipe: Recipe) -> None:
        """Give initializer ``name`` a new recipe (adding a placeholder if it is new)."""
        if name not in self.recipes:
            self.model.graph.initializer.append(placeholder(name, recipe.dtype))
        self.recipes[name] = recipe

    def drop_unused(self) -> None:
        """Remove initializers (and their recipes) that no node reads any more."""
        from qwen3emb.export.onnx.graph import node_reads

        used = {name for node in self.model.graph.node for name in node_reads(node)}
        used |= {o.name for o in self.model.graph.output}
        kept = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)
        self.recipes = {k: v for k, v in self.recipes.items() if k in used}

    def nbytes(self) -> int:
        """Bytes of every lazily computed initializer of the output."""
        import onnx

        return sum(int(np.prod(r.shape, dtype=np.int64))
                   * onnx.helper.tensor_dtype_to_np_dtype(r.dtype).itemsize
                   for r in self.recipes.values())

    def save(self, path: Path, *, external: bool, progress: bool = False) -> list[Path]:
        """Write the graph, computing each initializer only when the writer reaches it.

        Args:
            path: the ``.onnx`` file.
            external: put the weights in ``<name>_data`` beside it (needed above 2 GB).
            progress: show a byte progress bar.

        Returns:
            The files written (the model first).
        """
        import onnx_ir as ir

        from qwen3emb.progress import bar

        model = ir.serde.deserialize_model(self.model)
        for name, value in model.graph.initializers.items():
            recipe = self.recipes.get(name)
            if recipe is None:
                continue
            dtype = ir.DataType(recipe.dtype)
            shape = ir.Shape(recipe.shape)
            value.const_value = ir.LazyTensor(_evaluate(recipe), dtype=dtype, shape=shape,
                                              name=name)
            value.dtype = dtype
            value.shape = shape
        total = self.nbytes()
        if not external:
            ir.save(model, os.fspath(path))
            return [path]
        data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
        with bar(total, f"write {path.name}", progress, unit="B") as writing:
            ir.save(model, os.fspath(path), external_data=data.name,
                    callback=lambda tensor, info: writing.update(int(tensor.nbytes)))
        return [path, data]


def placeholder(name: str, data_type: int) -> Any:
    """An empty initializer standing in for a weight whose data is computed at save time."""
    import onnx

    return onnx.helper.make_tensor(name, data_type, [0], [])


def _evaluate(recipe: Recipe) -> Callable[[], Any]:
    import onnx
    import onnx_ir as ir

    dtype = onnx.helper.tensor_dtype_to_np_dtype(recipe.dtype)

    def make() -> Any:
        array = np.asarray(recipe.make(), dtype=dtype, order="C")  # keeps 0-d shapes
        if array.shape != recipe.shape:
            raise ValueError(f"recipe produced shape {array.shape}, expected {recipe.shape}")
        return ir.tensor(array)

    return make


class OneSlot:
    """Remember the last computed result, so several outputs of one source share one pass.

    A quantizer returns codes and scales together; the writer asks for them one after the
    other, so keeping only the latest result avoids computing twice without holding more.
    """

    def __init__(self) -> None:
        self._key: object = None
        self._value: Any = None

    def get(self, key: object, compute: Callable[[], Any]) -> Any:
        if self._key != key:
            self._key, self._value = None, None  # drop the old result before computing
            self._value = compute()
            self._key = key
        return self._value
