"""VLEmbedder: run a Qwen3-VL bundle (vision.onnx + decoder.onnx) with onnxruntime. No torch.

    >>> from qwen3emb.runtime import VLEmbedder
    >>> embedder = VLEmbedder("bundle/")                  # or precision="fp16" / "int8" / "int4"
    >>> vectors = embedder.encode([{"text": "a cat"}, {"image": "cat.png"}])

Errors in one item never lose the others: :meth:`VLEmbedder.encode` processes every item and
then raises one :class:`ItemErrors` that lists each bad item and carries the embeddings of the
good ones; :meth:`VLEmbedder.encode_with_errors` returns both without raising.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen3emb.constants import (
    ATTENTION_MASK,
    DEEPSTACK_EMBEDS,
    INPUT_IDS,
    MROPE_POSITION_IDS,
    PIXEL_PATCHES,
    POS_EMBED_INDICES,
    POS_EMBED_WEIGHTS,
    VISION_POSITION_IDS,
    VISUAL_EMBEDS,
    VL_MAX_PIXELS,
    VL_MAX_SOURCE_PIXELS,
    VL_MIN_PIXELS,
)
from qwen3emb.errors import BundleError, InputError, Qwen3EmbError
from qwen3emb.manifest import Manifest, read_manifest
from qwen3emb.runtime.common import (
    check_dimensions,
    check_items,
    check_loadable,
    length_batches,
    truncate_normalize,
)
from qwen3emb.runtime.session import open_session
from qwen3emb.runtime.vl_prompt import (
    format_instruction,
    item_text,
    mrope_positions,
    render_prompt,
)
from qwen3emb.runtime.vl_video import VideoOptions, video_input
from qwen3emb.runtime.vl_vision import VisionGeometry, VisualInput, image_input, vision_tables

logger = logging.getLogger(__name__)

ITEM_KEYS = ("text", "image", "video")


class ItemErrors(InputError):
    """Some items could not be embedded. ``errors`` maps item index → one-line reason;
    ``embeddings`` holds every row (NaN for failed items) and ``ok`` marks the good rows."""

    def __init__(self, errors: dict[int, str], embeddings: np.ndarray) -> None:
        first = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{len(errors)} of {len(embeddings)} item(s) failed: {first[1]}{more}",
                         hint="The other items were embedded: see .embeddings and .errors")
        self.errors = errors
        self.embeddings = embeddings
        self.ok = ~np.isnan(embeddings).any(axis=1)


@dataclass
class PreparedItem:
    """One item after host-side preprocessing: token ids, M-RoPE positions, its visuals."""

    ids: list[int]
    positions: np.ndarray
    visuals: list[VisualInput] = field(default_factory=list)
    truncated: bool = False
    """The prompt was longer than ``max_tokens`` and was cut on the right."""


def choose_graphs(manifest: Manifest, precision: str, vision_precision: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest entries of the decoder of ``precision`` and of the vision graph it runs
    with: ``vision_precision`` if given, else the one the exporter paired with it
    (``vision_precision`` of the decoder entry; fp32 in bundles that predate the key).

    Raises:
        InputError: the bundle has no such decoder or vision graph, listing those it has.
    """
    onnx_graphs = [a for a in manifest.artifacts if a.get("kind") == "onnx"]
    decoders = {a["precision"]: a for a in onnx_graphs if a.get("graph") == "decoder"}
    visions = {a["precision"]: a for a in onnx_graphs if a.get("graph") == "vision"}
    if precision not in decoders:
        raise InputError(f"bundle has no '{precision}' ONNX decoder",
                         hint=f"Available precisions: {', '.join(sorted(decoders))}")
    wanted = vision_precision or str(decoders[precision].get("vision_precision", "fp32"))
    if wanted not in visions:
        raise InputError(f"bundle has no '{wanted}' ONNX vision graph",
                         hint=f"Available vision precisions: {', '.join(sorted(visions))}")
    return decoders[precision], visions[wanted]


def check_vl_bundle(manifest: Manifest, bundle: Any, task: str) -> None:
    """Refuse what is not an ONNX Qwen3-VL bundle of ``task`` (``embed`` or ``rerank``)."""
    if "vision" not in manifest.data or "onnx" not in manifest.data:
        raise BundleError(f"'{bundle}' holds a '{manifest.family}' bundle without a vision "
                          "graph", hint="Use TextEmbedder or Reranker for text bundles")
    if manifest.task != task:
        what, other = (("reranker", "VLReranker") if manifest.task == "rerank"
                       else ("embedder", "VLEmbedder"))
        raise BundleError(f"'{bundle}' holds a Qwen3-VL {what}; load it with {other}",
                          hint=f"{other}('{bundle}')")


def vision_geometry(manifest: Manifest) -> VisionGeometry:
    """The patch geometry and pixel normalization of a bundle's vision tower."""
    vision = manifest.data["vision"]
    return VisionGeometry(
        patch_size=int(vision["patch_size"]), merge_size=int(vision["merge_size"]),
        temporal_patch_size=int(vision["temporal_patch_size"]),
        position_table_side=int(vision["position_table_side"]),
        mean=tuple(vision["image_mean"]), std=tuple(vision["image_std"]))


def vision_feeds(visual: VisualInput, geometry: VisionGeometry) -> dict[str, np.ndarray]:
    """The vision graph's inputs for one image or video (or a stack of same-size images)."""
    indices, weights, rotary = vision_tables(visual.grid[1], visual.grid[2], geometry)
    return {PIXEL_PATCHES: visual.patches.astype(np.float32, copy=False),
            POS_EMBED_INDICES: indices, POS_EMBED_WEIGHTS: weights,
            VISION_POSITION_IDS: rotary}


class VLInputs:
    """Everything before the decoder: prompts, token ids, M-RoPE positions, and images and
    videos through the vision graph, with the bundle's preprocessing parameters.

    :class:`VLEmbedder` is this plus the decoder; the exporter uses it alone to build the int8
    decoder's calibration inputs, exactly as the runtime will feed them.

    Args:
        manifest: the bundle's manifest (read from disk, or being written).
        vision_graph: the manifest entry of the vision graph to run.
        providers, threads, spinning, min_pixels, max_pixels, max_frames, fps, video_max_pixels,
        max_tokens, max_source_pixels: as for :class:`VLEmbedder`.

    Raises:
        InputError: a limit out of range.
        BundleError: the tokenizer does not load or does not match the manifest.
    """

    def __init__(self, manifest: Manifest, vision_graph: Mapping[str, Any],
                 providers: Sequence[str] | str | None = None, *, threads: int | None = None,
                 spinning: bool = True,
                 min_pixels: int = VL_MIN_PIXELS, max_pixels: int = VL_MAX_PIXELS,
                 max_frames: int | None = None, fps: float | None = None,
                 video_max_pixels: int | None = None, max_tokens: int | None = None,
                 max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> None:
        if not 0 < min_pixels <= max_pixels:
            raise InputError(f"pixel limits {min_pixels}..{max_pixels} are not a valid range",
                             hint="Use 0 < min_pixels <= max_pixels")
        limit = manifest.max_length
        if max_tokens is not None and not 16 <= max_tokens <= limit:
            raise InputError(f"max_tokens={max_tokens} is outside 16..{limit} for this bundle")
        vision = manifest.data["vision"]
        video = vision.get("video", {})
        self.manifest = manifest
        self.geometry = vision_geometry(manifest)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_source_pixels = max_source_pixels
        self.video_options = VideoOptions(
            fps=fps or float(video.get("fps", 1.0)),
            max_frames=max_frames or int(video.get("max_frames", 64)),
            min_pixels=int(video.get("min_pixels", 128 * 32 * 32)),
            max_pixels=video_max_pixels or int(video.get("max_pixels", 768 * 32 * 32)),
            total_pixels=int(video.get("total_pixels", 10 * 768 * 32 * 32)),
            max_source_pixels=max_source_pixels)
        self.max_tokens = max_tokens or limit
        info = manifest.tokenizer
        self.image_token_id = int(info["image_token_id"])
        self.video_token_id = int(info["video_token_id"])
        self.deepstack = int(vision["deepstack_layers"])
        self.hidden = int(vision.get("decoder_hidden_size") or manifest.embedding["dim"])
        self.tokenizer = self._load_tokenizer()
        self.vision_precision = str(vision_graph["precision"])
        self.vision = open_session(manifest.root / vision_graph["path"], providers, threads,
                                   spinning=spinning)

    @property
    def providers(self) -> list[str]:
        """Where the vision graph runs (onnxruntime providers, or ``openvino:CPU``)."""
        return list(self.vision.get_providers())

    def _load_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        path = self.manifest.root / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise BundleError(f"cannot load '{path}': {e}", hint="Re-run the export") from e
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if tokenizer.token_to_id("<|image_pad|>") != self.image_token_id:
            raise BundleError("tokenizer.json and the manifest disagree on <|image_pad|>",
                              hint="The bundle's files do not belong together; re-export")
        return tokenizer

    # --- preprocessing --------------------------------------------------------------------

    def prepare(self, item: Mapping[str, Any], index: int, instruction: str) -> PreparedItem:
        """Preprocess one item (videos, then images, then text; empty → ``NULL``).

        Raises:
            InputError: naming the item and the input that failed.
        """
        text, visuals = self.item_parts(item, f"item {index}")
        text = item_text(text, bool(visuals))
        ids = self.tokenizer.encode(render_prompt(instruction, visuals, text)).ids
        if len(ids) > self.max_tokens:
            needed = sum(v.tokens for v in visuals)
            if needed and self._visual_count(ids[:self.max_tokens]) < needed:
                raise InputError(
                    f"item {index} needs {len(ids)} tokens, above max_tokens={self.max_tokens}, "
                    "and cutting it would cut its image/video",
                    hint="Lower max_pixels / max_frames, or raise max_tokens")
        truncated = len(ids) > self.max_tokens
        ids = ids[:self.max_tokens]  # the reference truncates on the right too
        positions = mrope_positions(ids, visuals, image_token_id=self.image_token_id,
                                    video_token_id=self.video_token_id,
                                    merge_size=self.geometry.merge_size)
        return PreparedItem(ids, positions, visuals, truncated)

    def item_parts(self, item: Any, name: str) -> tuple[str | None, list[VisualInput]]:
        """An item's text and its visuals (video, then image) through the host preprocessing.

        Raises:
            InputError: not a dict, unknown keys, non-string text, a bad image or video;
                the message starts with ``name``.
        """
        if not isinstance(item, Mapping):
            raise InputError(f"{name} is a {type(item).__name__}, not a dict",
                             hint="Pass dicts with 'text', 'image' and/or 'video'")
        unknown = sorted(set(item) - set(ITEM_KEYS))
        if unknown:
            raise InputError(f"{name} has unknown keys {unknown}",
                             hint="Use 'text', 'image' and 'video'")
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{name} text is a {type(text).__name__}, not a string")
        visuals: list[VisualInput] = []
        if item.get("video") is not None:
            visuals.append(video_input(item["video"], geometry=self.geometry,
                                       options=self.video_options, name=f"{name} video"))
        if item.get("image") is not None:
            visuals.append(image_input(item["image"], geometry=self.geometry,
                                       min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                       name=f"{name} image",
                                       max_source_pixels=self.max_source_pixels))
        return text, visuals

    def _visual_count(self, ids: Sequence[int]) -> int:
        arr = np.asarray(ids)
        return int(((arr == self.image_token_id) | (arr == self.video_token_id)).sum())

    # --- graphs ---------------------------------------------------------------------------

    def run_vision(self, patches: np.ndarray, grid_h: int, grid_w: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Run vision.onnx on [groups, h*w, 1536] patches of one grid → (embeds, deepstack)."""
        indices, weights, rotary = vision_tables(grid_h, grid_w, self.geometry)
        embeds, deepstack = self.vision.run(None, {
            PIXEL_PATCHES: patches.astype(np.float32, copy=False), POS_EMBED_INDICES: indices,
            POS_EMBED_WEIGHTS: weights, VISION_POSITION_IDS: rotary})
        return np.asarray(embeds, np.float32), np.asarray(deepstack, np.float32)

    def encode_visuals(self, items: list[PreparedItem]) -> dict[int, tuple[np.ndarray, ...]]:
        """Vision features per visual (keyed by id()); same-size images share one call, and
        a visual several items share runs once."""
        out: dict[int, tuple[np.ndarray, ...]] = {}
        images: dict[tuple[int, int], list[VisualInput]] = {}
        seen: set[int] = set()
        for item in items:
            for visual in item.visuals:
                if id(visual) in seen:  # shared by several items (a reranker's query): once
                    continue
                seen.add(id(visual))
                if visual.kind == "image":
                    images.setdefault(visual.grid[1:], []).append(visual)
                else:
                    out[id(visual)] = self.run_vision(visual.patches, *visual.grid[1:])
        for (gh, gw), stack in images.items():
            embeds, deepstack = self.run_vision(np.concatenate([v.patches for v in stack]), gh, gw)
            step = stack[0].tokens
            for i, visual in enumerate(stack):
                rows = slice(i * step, (i + 1) * step)
                out[id(visual)] = (embeds[rows], deepstack[:, rows])
        return out

    def decoder_inputs(self, batch: list[PreparedItem],
                       features: dict[int, tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
        """The decoder graph's inputs for ``batch`` (right-padded) and its vision features."""
        width = max(len(item.ids) for item in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        positions = np.zeros((3, len(batch), width), dtype=np.int64)
        embeds = [np.zeros((0, self.hidden), np.float32)]
        deepstack = [np.zeros((self.deepstack, 0, self.hidden), np.float32)]
        for row, item in enumerate(batch):
            n = len(item.ids)
            ids[row, :n], mask[row, :n], positions[:, row, :n] = item.ids, 1, item.positions
            kept = self._visual_count(item.ids)
            for visual in item.visuals:
                e, d = features[id(visual)]
                embeds.append(e)
                deepstack.append(d)
            if kept != sum(v.tokens for v in item.visuals):  # pragma: no cover - prepare() checks
                raise InputError("visual tokens were cut by truncation")
        return {INPUT_IDS: ids, ATTENTION_MASK: mask, MROPE_POSITION_IDS: positions,
                VISUAL_EMBEDS: np.concatenate(embeds),
                DEEPSTACK_EMBEDS: np.concatenate(deepstack, axis=1)}


class VLEmbedder(VLInputs):
    """Embed text, images, videos and mixtures with a Qwen3-VL bundle.

    Args:
        bundle: the bundle directory (``qwen3emb-export export`` of a qwen3_vl checkpoint).
        providers: onnxruntime providers (``"cpu"``, ``"cuda"``, ...); CPU when ``None``.
        precision: which decoder of the bundle to run (``"fp32"``, ``"fp16"``, ``"int8"``,
            ``"int4"``: those the bundle lists).
        vision_precision: which vision graph feeds it (``"fp32"`` or ``"fp16"``); default: the
            one the exporter paired with that decoder and validated with it (the fp16 vision
            for the fp16 decoder, fp32 for the others).
        verify: check every file's sha256 against the manifest on load.
        strict: refuse bundles whose recorded parity check failed.
        threads: onnxruntime intra-op threads.
        spinning: let those threads spin-wait between runs (off for servers).
        min_pixels, max_pixels: image pixel budget (reference: 4096 and 1843200).
        max_frames, fps: video sampling (reference: 64 frames at 1 fps).
        video_max_pixels: per-frame pixel cap for videos (reference: 786432).
        max_tokens: longest prompt in tokens (default and upper bound: the bundle's).
        max_source_pixels: refuse decoded images/frames larger than this (decompression bombs).

    Raises:
        BundleError: missing/corrupt bundle, not a VL bundle, failed parity with ``strict``.
        InputError: a limit out of range, or a precision the bundle does not hold.
    """

    def __init__(self, bundle: str | os.PathLike[str], providers: Sequence[str] | str | None = None,
                 *, precision: str = "fp32", vision_precision: str | None = None,
                 verify: bool = True, strict: bool = True, threads: int | None = None,
                 spinning: bool = True,
                 min_pixels: int = VL_MIN_PIXELS, max_pixels: int = VL_MAX_PIXELS,
                 max_frames: int | None = None, fps: float | None = None,
                 video_max_pixels: int | None = None, max_tokens: int | None = None,
                 max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> None:
        manifest = read_manifest(bundle)
        check_vl_bundle(manifest, bundle, "embed")
        check_loadable(manifest, bundle, verify=verify, strict=strict)
        decoder, vision_graph = choose_graphs(manifest, precision, vision_precision)
        super().__init__(manifest, vision_graph, providers, threads=threads, spinning=spinning,
                         min_pixels=min_pixels, max_pixels=max_pixels, max_frames=max_frames,
                         fps=fps, video_max_pixels=video_max_pixels, max_tokens=max_tokens,
                         max_source_pixels=max_source_pixels)
        self.precision = precision
        self.dim = int(manifest.embedding["output_dim"])
        self.mrl_min = manifest.mrl_min
        self.decoder = open_session(manifest.root / decoder["path"], providers, threads,
                                    spinning=spinning, precision=precision if strict else None)

    @property
    def providers(self) -> list[str]:
        """Where the decoder runs (the vision graph runs on the same)."""
        return list(self.decoder.get_providers())

    def run_decoder(self, batch: list[PreparedItem], features: dict[int, tuple[np.ndarray, ...]]
                    ) -> np.ndarray:
        """Right-pad ``batch`` and run the decoder graph → [len(batch), dim]."""
        feeds = self.decoder_inputs(batch, features)
        return np.asarray(self.decoder.run(None, feeds)[0], dtype=np.float32)

    def embed_prepared(self, prepared: Sequence[PreparedItem], *, batch_size: int = 8
                       ) -> np.ndarray:
        """Run the vision and decoder graphs on items from :meth:`prepare`.

        Batches group similar lengths, so an item's batch mates depend only on ``prepared``.

        Returns:
            float32 [len(prepared), dim] (full width), unit L2 norm per row.
        """
        out = np.empty((len(prepared), self.dim), dtype=np.float32)
        for batch in length_batches([len(p.ids) for p in prepared], batch_size):
            chosen = [prepared[j] for j in batch]
            out[batch] = self.run_decoder(chosen, self.encode_visuals(chosen))
        return out

    # --- public API -----------------------------------------------------------------------

    def encode_with_errors(self, items: Sequence[Mapping[str, Any]], *,
                           instruction: str | None = None, dimensions: int | None = None,
                           batch_size: int = 8) -> tuple[np.ndarray, dict[int, str]]:
        """Like :meth:`encode`, but returns ``(embeddings, errors)`` instead of raising.

        Rows of failed items are NaN; ``errors`` maps their index to a one-line reason.
        """
        items = check_items(items, "'text', 'image' or 'video'")
        width = check_dimensions(dimensions, dim=self.dim, mrl_min=self.mrl_min)
        system = format_instruction(instruction)
        prepared: dict[int, PreparedItem] = {}
        errors: dict[int, str] = {}
        for i, item in enumerate(items):
            try:
                prepared[i] = self.prepare(item, i, system)
            except Qwen3EmbError as e:
                errors[i] = e.one_line()
        out = np.full((len(items), self.dim), np.nan, dtype=np.float32)
        if prepared:
            out[list(prepared)] = self.embed_prepared(list(prepared.values()),
                                                      batch_size=batch_size)
        if width != self.dim:
            good = ~np.isnan(out).any(axis=1)
            cut = np.full((len(items), width), np.nan, dtype=np.float32)
            if good.any():
                cut[good] = truncate_normalize(out[good], width)
            out = cut
        return out, errors

    def encode(self, items: Sequence[Mapping[str, Any]], *, instruction: str | None = None,
               dimensions: int | None = None, batch_size: int = 8) -> np.ndarray:
        """Embed items: dicts with any of ``text``, ``image`` (path, bytes or PIL image) and
        ``video`` (file path or list of frames).

        Args:
            items: the inputs; an empty dict embeds the text ``NULL`` like the reference.
            instruction: system instruction (default ``Represent the user's input.``).
            dimensions: Matryoshka width (``mrl_min..dim``).
            batch_size: items per decoder call.

        Returns:
            float32 [len(items), dimensions or dim], unit L2 norm per row.

        Raises:
            ItemErrors: after processing every item, when some failed; it carries the
                embeddings of the others.
            InputError: an empty list, a bare dict, bad ``dimensions``.
        """
        out, errors = self.encode_with_errors(items, instruction=instruction,
                                              dimensions=dimensions, batch_size=batch_size)
        if errors:
            raise ItemErrors(errors, out)
        return out
