"""Embed text and images with a Qwen3-VL GGUF pair through llama.cpp and libmtmd: the twin of
the ONNX ``VLEmbedder``. Torch-free (numpy, Pillow and the ``gguf`` extra).

    >>> from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder
    >>> embedder = GGUFVLEmbedder("bundle/", gguf_type="f16")
    >>> vectors = embedder.encode([{"text": "a cat"}, {"image": "cat.png"}])

The prompt is the released embedder's (instruction in the system message, the image before the
text, ending in ``<|im_start|>assistant\\n``); libmtmd tokenizes it, wraps each image in
``<|vision_start|>``/``<|vision_end|>``, encodes it with the mmproj (visual + deepstack
features) and decodes it with 3-axis M-RoPE positions; the context pools the last token.

Image resizing has two modes. ``resize="reference"`` (default) resizes on the host exactly as
the reference does (qwen-vl-utils ``smart_resize``, factor 32, Pillow BICUBIC), so llama.cpp
receives an image it keeps as is. ``resize="llama.cpp"`` hands the decoded RGB image to libmtmd
unchanged and lets llama.cpp resize it with its own algorithm, which differs from Pillow's
BICUBIC: docs/gguf.md reports the measured gap. Videos are not supported (see docs/gguf.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen3emb.constants import (
    VL_EMPTY_TEXT,
    VL_IMAGE_FACTOR,
    VL_MAX_PIXELS,
    VL_MAX_SOURCE_PIXELS,
    VL_MIN_PIXELS,
)
from qwen3emb.errors import BundleError, InputError, Qwen3EmbError
from qwen3emb.manifest import Manifest
from qwen3emb.runtime._llama import (
    NativeHandle,
    embedding_context,
    last_llama_errors,
    llama_library,
    mtmd_library,
)
from qwen3emb.runtime.common import check_dimensions, check_items, truncate_normalize
from qwen3emb.runtime.gguf import resolve_gguf
from qwen3emb.runtime.vl_prompt import format_instruction

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

RESIZE_MODES = ("reference", "llama.cpp")
_ITEM_KEYS = ("text", "image", "video")
_TOKENS_PER_PIXEL_BLOCK = VL_IMAGE_FACTOR * VL_IMAGE_FACTOR
"""Pixels per visual token after the 2x2 merge (32 x 32): llama.cpp counts limits in tokens."""


class GGUFVLEmbedder(NativeHandle):
    """Qwen3-VL-Embedding on llama.cpp: unit-norm float32 vectors for text and image items.

    One llama.cpp context per instance, so an instance is not thread-safe.

    Args:
        bundle: a bundle directory with GGUF models (``--format gguf``).
        gguf_type: which text GGUF to load; default the highest precision present. Its
            manifest entry names the mmproj it pairs with.
        n_threads: llama.cpp threads; default all cores.
        resize: ``"reference"`` (host BICUBIC resize, matches the reference) or
            ``"llama.cpp"`` (llama.cpp's own resize; measured gap in docs/gguf.md).
        min_pixels, max_pixels: image pixel budget (reference: 4096 and 1843200); multiples
            of 1024 (one visual token).
        max_tokens: longest prompt in tokens (default and upper bound: the bundle's).
        max_source_pixels: refuse decoded images larger than this (decompression bombs).

    Raises:
        MissingDependencyError: llama-cpp-python (with libmtmd) is not installed.
        BundleError: no GGUF pair in the bundle, or llama.cpp cannot load it.
        InputError: a bad option.
    """

    def __init__(self, bundle: str | os.PathLike[str], *, gguf_type: str | None = None,
                 n_threads: int | None = None, resize: str = "reference",
                 min_pixels: int = VL_MIN_PIXELS, max_pixels: int = VL_MAX_PIXELS,
                 max_tokens: int | None = None,
                 max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> None:
        self._model: Any = None
        self._mtmd_ctx: Any = None
        self._ctx: Any = None
        self._ctx_size = 0
        if resize not in RESIZE_MODES:
            raise InputError(f"resize={resize!r} is not a resize mode",
                             hint=f"Choose one of {', '.join(RESIZE_MODES)}")
        if not 0 < min_pixels <= max_pixels or min_pixels % _TOKENS_PER_PIXEL_BLOCK \
                or max_pixels % _TOKENS_PER_PIXEL_BLOCK:
            raise InputError(f"pixel limits {min_pixels}..{max_pixels} are not a valid range",
                             hint="Use 0 < min_pixels <= max_pixels, both multiples of 1024")
        path, manifest = resolve_gguf(bundle, gguf_type)
        if manifest is None or "vision" not in manifest.data:
            raise BundleError(f"'{bundle}' is not a Qwen3-VL bundle directory",
                              hint="Pass the bundle directory; use GGUFTextEmbedder for text")
        entry = next(a for a in manifest.models("gguf").values()
                     if manifest.root / a["path"] == path)
        if not entry.get("mmproj"):
            raise BundleError(f"'{path}' has no mmproj listed in the manifest",
                              hint="Re-export the bundle with --format gguf")
        self.path, self.mmproj_path = path, manifest.root / entry["mmproj"]
        self.precision = str(entry["precision"])
        self.manifest: Manifest = manifest
        self.resize, self.min_pixels, self.max_pixels = resize, min_pixels, max_pixels
        self.max_source_pixels = max_source_pixels
        limit = manifest.max_length
        if max_tokens is not None and not 16 <= max_tokens <= limit:
            raise InputError(f"max_tokens={max_tokens} is outside 16..{limit} for this bundle")
        self.max_tokens = max_tokens or limit
        self.dim = int(manifest.embedding["output_dim"])
        self.hidden = int(manifest.embedding["dim"])
        self.mrl_min = manifest.mrl_min
        self.n_threads = int(n_threads or os.cpu_count() or 1)
        self._lib = lib = llama_library()
        self._mtmd = mtmd = mtmd_library()
        self._model = lib.llama_model_load_from_file(str(path).encode(),
                                                     lib.llama_model_default_params())
        if not self._model:
            raise BundleError(f"llama.cpp could not load '{path}': "
                              f"{last_llama_errors() or 'no message'}",
                              hint="Re-export the GGUF with this version of qwen3emb-export")
        if int(lib.llama_model_n_embd(self._model)) != self.hidden:
            self.close()
            raise BundleError(f"'{path}' has width {lib.llama_model_n_embd(self._model)}, the "
                              f"manifest says {self.hidden}", hint="Re-export the bundle")
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = self.n_threads
        # llama.cpp ignores clip.vision.image_{min,max}_pixels for Qwen-VL projectors and
        # applies 8..4096 tokens unless told otherwise (ggml-org/llama.cpp#16842).
        params.image_min_tokens = min_pixels // _TOKENS_PER_PIXEL_BLOCK
        params.image_max_tokens = max_pixels // _TOKENS_PER_PIXEL_BLOCK
        self._mtmd_ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model,
                                                  params)
        if not self._mtmd_ctx:
            message = last_llama_errors() or "no message"
            self.close()
            raise BundleError(f"libmtmd could not load '{self.mmproj_path}': {message}",
                              hint="Re-export the bundle with this version of qwen3emb-export")
        if not mtmd.mtmd_support_vision(self._mtmd_ctx):
            self.close()
            raise BundleError(f"'{self.mmproj_path}' has no vision encoder",
                              hint="Re-export the bundle")
        self._marker = mtmd.mtmd_default_marker().decode()

    # --- public API, like VLEmbedder -----------------------------------------------------
    def encode(self, items: Sequence[Mapping[str, Any]], *, instruction: str | None = None,
               dimensions: int | None = None) -> np.ndarray:
        """Embed items: dicts with ``text`` and/or ``image`` (path, bytes or PIL image).

        Args:
            items: the inputs; an empty dict embeds the text ``NULL`` like the reference.
            instruction: system instruction (default ``Represent the user's input.``).
            dimensions: Matryoshka width (``mrl_min..dim``).

        Returns:
            float32 [len(items), dimensions or dim], unit L2 norm per row.

        Raises:
            ItemErrors: after processing every item, when some failed (a video, a bad image);
                it carries the embeddings of the others.
            InputError: an empty list, a bare dict, bad ``dimensions``.
        """
        from qwen3emb.runtime.vl import ItemErrors

        out, errors = self.encode_with_errors(items, instruction=instruction,
                                              dimensions=dimensions)
        if errors:
            raise ItemErrors(errors, out)
        return out

    def encode_with_errors(self, items: Sequence[Mapping[str, Any]], *,
                           instruction: str | None = None, dimensions: int | None = None
                           ) -> tuple[np.ndarray, dict[int, str]]:
        """Like :meth:`encode`, but returns ``(embeddings, errors)``; failed rows are NaN."""
        items = check_items(items, "'text' or 'image'")
        width = check_dimensions(dimensions, dim=self.dim, mrl_min=self.mrl_min)
        system = format_instruction(instruction)
        out = np.full((len(items), self.dim), np.nan, dtype=np.float32)
        errors: dict[int, str] = {}
        for i, item in enumerate(items):
            try:
                out[i] = self._embed_item(item, i, system)[:self.dim]
            except Qwen3EmbError as e:
                errors[i] = e.one_line()
        good = ~np.isnan(out).any(axis=1)
        cut = np.full((len(items), width), np.nan, dtype=np.float32)
        if good.any():
            cut[good] = truncate_normalize(out[good], width)
        return cut, errors

    def close(self) -> None:
        """Free the llama.cpp context, the mtmd context and the model."""
        lib, mtmd = getattr(self, "_lib", None), getattr(self, "_mtmd", None)
        if getattr(self, "_ctx", None) and lib is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_mtmd_ctx", None) and mtmd is not None:
            mtmd.mtmd_free(self._mtmd_ctx)
            self._mtmd_ctx = None
        if getattr(self, "_model", None) and lib is not None:
            lib.llama_model_free(self._model)
            self._model = None

    # --- preprocessing ---------------------------------------------------------------------
    def prompt(self, item: Mapping[str, Any], index: int, system: str) -> tuple[str, Any]:
        """The prompt (with the media marker where the image goes) and the RGB image or None.

        Raises:
            InputError: naming the item and what is wrong with it.
        """
        from qwen3emb.runtime.vl_vision import load_image, resize_image, smart_resize

        if not isinstance(item, Mapping):
            raise InputError(f"item {index} is a {type(item).__name__}, not a dict",
                             hint="Pass dicts with 'text' and/or 'image'")
        unknown = sorted(set(item) - set(_ITEM_KEYS))
        if unknown:
            raise InputError(f"item {index} has unknown keys {unknown}",
                             hint="Use 'text' and 'image'")
        if item.get("video") is not None:
            raise InputError(
                f"item {index} has a video, which the GGUF runtime does not embed (llama.cpp "
                "cannot reproduce the reference's timestamped 2-frame groups)",
                hint="Embed videos with the ONNX VLEmbedder")
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError(f"item {index} text is a {type(text).__name__}, not a string")
        image = None
        if item.get("image") is not None:
            name = f"item {index} image"
            image = load_image(item["image"], name=name, max_source_pixels=self.max_source_pixels)
            height, width = smart_resize(image.height, image.width, min_pixels=self.min_pixels,
                                         max_pixels=self.max_pixels, name=name)
            if self.resize == "reference":
                image = resize_image(image, height, width)
        if text is None and image is None:  # an empty string is text (the released rule)
            text = VL_EMPTY_TEXT
        user = (self._marker if image is not None else "") + (text or "")
        return (f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"), image

    # --- llama.cpp plumbing --------------------------------------------------------------
    def _embed_item(self, item: Mapping[str, Any], index: int, system: str) -> np.ndarray:
        mtmd, lib = self._mtmd, self._lib
        prompt, image = self.prompt(item, index, system)
        data = prompt.encode("utf-8")
        text = mtmd.mtmd_input_text(data, len(data), True, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)()
        n_bitmaps = 0
        if image is not None:
            rgb = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
            pixels = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmaps[0] = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
            n_bitmaps = 1
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            status = mtmd.mtmd_tokenize(self._mtmd_ctx, chunks, ctypes.byref(text), bitmaps,
                                        n_bitmaps)
            if status != 0:
                raise InputError(f"item {index}: libmtmd could not tokenize it (status "
                                 f"{status}): {last_llama_errors() or 'no message'}")
            n_tokens = int(mtmd.mtmd_helper_get_n_tokens(chunks))
            if n_tokens > self.max_tokens:
                raise InputError(f"item {index} needs {n_tokens} tokens, above max_tokens="
                                 f"{self.max_tokens}",
                                 hint="Shorten the text, lower max_pixels or raise max_tokens")
            ctx = self._context(n_tokens)
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            n_past = lib.llama_pos(0)
            status = mtmd.mtmd_helper_eval_chunks(self._mtmd_ctx, ctx, chunks, 0, 0,
                                                  self._ctx_size, True, ctypes.byref(n_past))
            if status != 0:
                raise Qwen3EmbError(f"item {index}: llama.cpp failed to evaluate it (status "
                                    f"{status}): {last_llama_errors() or 'no message'}")
            pooled = lib.llama_get_embeddings_seq(ctx, 0)
            if not pooled:
                raise Qwen3EmbError("llama.cpp returned no pooled embedding",
                                    hint="Check that the GGUF has qwen3vl.pooling_type = 3")
            return np.ctypeslib.as_array(pooled, shape=(self.hidden,)).astype(np.float32)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            if n_bitmaps:
                mtmd.mtmd_bitmap_free(bitmaps[0])

    def _context(self, n_tokens: int) -> Any:
        """A context whose n_ctx = n_batch = n_ubatch holds the whole prompt in one pass."""
        lib = self._lib
        if self._ctx and n_tokens <= self._ctx_size:
            return self._ctx
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        size = -(-max(n_tokens, 256) // 256) * 256
        self._ctx = embedding_context(lib, self._model, size, 1, self.n_threads,
                                      hint="Lower max_pixels or max_tokens, or free memory")
        self._ctx_size = size
        return self._ctx


def gguf_vl_pairs(bundle: str | os.PathLike[str]) -> dict[str, tuple[Path, Path]]:
    """Text GGUF and mmproj path per GGUF type listed in a VL bundle's manifest."""
    from qwen3emb.manifest import read_manifest

    manifest = read_manifest(bundle)
    return {t: (manifest.root / a["path"], manifest.root / a["mmproj"])
            for t, a in manifest.models("gguf").items() if a.get("mmproj")}
