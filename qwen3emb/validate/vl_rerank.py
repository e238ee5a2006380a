"""Parity of a Qwen3-VL reranker bundle: query/document pairs of text, images and videos through
every decoder (with its paired vision graph), against transformers'
``Qwen3VLForConditionalGeneration`` run as the released ``Qwen3VLReranker`` runs it, compared on
the score.

The reference builds each pair's conversation as ``format_mm_instruction`` does, renders it with
the checkpoint's own chat template, expands image and video placeholders with
``Qwen3VLProcessor``'s code, cuts all but the last five tokens to ``max_length`` keeping the
tokenizer's ``all_special_ids``, and scores one pair at a time (as the released ``process``
does): ``sigmoid((lm_head[yes] − lm_head[no]) · last_hidden_state[:, -1])``. Images and videos
are preprocessed by the VL embedder's reference (:mod:`qwen3emb.validate.vl_reference`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import SCORE_FLOORS
from qwen3emb.errors import CheckpointError, InputError
from qwen3emb.progress import bar
from qwen3emb.validate.rerank import ScoreResult, kendall_tau, measured
from qwen3emb.validate.runners import checked_on, engine_label, engines
from qwen3emb.validate.vl_reference import VIDEO_BLOCK, ReferenceVLEmbedder

logger = logging.getLogger(__name__)

# The released reranker's constants, written out here so a typo in constants.py cannot hide.
REF_SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the "
              'Instruct provided. Note that the answer can only be "yes" or "no".')
REF_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
REF_MAX_LENGTH = 10240
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"

TRUNCATION_LENGTH = 96
"""The ``max_length`` of the truncation probe: a 600-word document beside an image is cut to it,
keeping every special token."""


def vl_rerank_probes(workdir: Path) -> list[tuple[str, Any, list[Any], str | None]]:
    """(name, query, documents, instruction): text against text, images and videos, images
    against text, mixtures on both sides, empty sides, a long document, another instruction.
    Images are synthetic and none is a calibration image."""
    from qwen3emb.convert._corpus import synthetic_image
    from qwen3emb.validate.vl_probes import write_test_video

    video = str(write_test_video(workdir / "rerank-probe.mp4"))
    frames = [synthetic_image(64, 48, seed=300 + i) for i in range(5)]
    image = synthetic_image(224, 160, seed=11)
    words = ("sofa", "cat", "window", "light", "red", "street", "photo", "garden")
    long_text = " ".join(words[(5 * i) % len(words)] for i in range(600))
    return [
        ("text", "a cat sitting on a red sofa", [
            "A cat sleeps on a red sofa by the window.", "Stock prices fell on Monday.",
            "", "敏捷的棕色狐狸 — le renard brun 🦊"], None),
        ("text-to-image", "a red sofa", [
            {"image": image}, {"image": synthetic_image(20, 12, seed=12)},
            {"image": synthetic_image(1200, 40, seed=13)},
            {"image": synthetic_image(120, 90, mode="RGBA", seed=14)}], None),
        ("image-to-text", {"image": image}, [
            "A photo of a sofa.", "A spreadsheet of quarterly results.", {}], None),
        ("text-to-video", "moving stripes", [{"video": frames}, {"video": video},
                                             {"text": "a still life"}], None),
        ("mixed", {"text": "this room", "image": synthetic_image(96, 64, seed=15)}, [
            {"text": "a living room", "image": synthetic_image(160, 120, seed=16)},
            {"text": "a clip", "video": frames[:4]}, {"text": ""}], None),
        ("empty-query", {}, ["An answer without a question.", {"image": image}], None),
        ("long", "which passage mentions the garden?", [long_text, "garden"], None),
        ("instruction", "red sofa", [{"image": image}, "a red sofa"],
         "Retrieve images that match the query"),
    ]


class ReferenceVLReranker(ReferenceVLEmbedder):
    """The released ``Qwen3VLReranker`` recipe on transformers, one pair at a time.

    Args:
        checkpoint: the reranker checkpoint directory.
        max_length: the recipe's ``max_length`` (the prompt before its last five tokens).
    """

    def __init__(self, checkpoint: Path, max_length: int = REF_MAX_LENGTH) -> None:
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        try:
            lm = Qwen3VLForConditionalGeneration.from_pretrained(
                checkpoint, dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"transformers cannot load the reference '{checkpoint}': {e}",
                                  hint="Pass the checkpoint the bundle was exported from") from e
        super().__init__(checkpoint, model=lm.model)
        vocab = self.tokenizer.get_vocab()
        weight = lm.lm_head.weight.detach()
        self.head = (weight[vocab["yes"]] - weight[vocab["no"]]).float()
        self.special = set(self.tokenizer.all_special_ids)
        self.max_length = max_length

    def limited(self, max_length: int) -> ReferenceVLReranker:
        """The same model and processors, cutting prompts at ``max_length``."""
        other = copy.copy(self)
        other.max_length = max_length
        return other

    @staticmethod
    def side(value: Any, prefix: str) -> list[dict[str, Any]]:
        """``format_mm_content``: the prefix, then videos, images, texts; ``NULL`` if none."""
        item = {"text": value} if isinstance(value, str) else dict(value)
        content: list[dict[str, Any]] = [{"type": "text", "text": prefix}]
        kinds = [("video", "video"), ("image", "image"), ("text", "text")]
        parts = [{"type": t, t: item[k]} for k, t in kinds if item.get(k) is not None]
        return content + (parts or [{"type": "text", "text": "NULL"}])

    def conversation(self, query: Any, document: Any, instruction: str | None
                     ) -> list[dict[str, Any]]:
        """``format_mm_instruction`` of one pair."""
        contents = [{"type": "text", "text": "<Instruct>: " + (instruction or REF_INSTRUCTION)},
                    *self.side(query, "<Query>:"), *self.side(document, "\n<Document>:")]
        return [{"role": "system", "content": [{"type": "text", "text": REF_SYSTEM}]},
                {"role": "user", "content": contents}]

    def pair_inputs(self, query: Any, document: Any, instruction: str | None
                    ) -> dict[str, Any]:
        from transformers.video_utils import VideoMetadata

        torch = self.torch
        conversation = self.conversation(query, document, instruction)
        text = str(self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=True))
        visuals = [c for c in conversation[1]["content"] if c["type"] in ("image", "video")]
        images, videos, image_grids, video_grids = [], [], [], []
        image_text, video_text = [], []
        for content in visuals:
            if content["type"] == "video":
                frames, indices, fps = self.fetch_video(content["video"])
                patches, grid = self.video_patches(frames)
                meta = VideoMetadata(total_num_frames=len(indices), fps=fps,
                                     frames_indices=indices)
                video_text.append(self._processor.replace_video_token(
                    self._shim,  # type: ignore[arg-type]
                    {"video_grid_thw": torch.tensor([grid]), "video_metadata": [meta]}, 0))
                videos.append(torch.from_numpy(patches))
                video_grids.append(grid)
            else:
                out = self.images(images=[self.fetch_image(content["image"])], do_resize=False,
                                  return_tensors="np")
                grid = torch.from_numpy(out["image_grid_thw"])
                image_text.append("<|vision_start|>" + self._processor.replace_image_token(
                    self._shim, {"image_grid_thw": grid}, 0) + "<|vision_end|>")  # type: ignore[arg-type]
                images.append(torch.from_numpy(out["pixel_values"]))
                image_grids.append(grid[0].tolist())
        text = _expand(_expand(text, VIDEO_BLOCK, video_text), IMAGE_BLOCK, image_text)
        ids = self.tokenizer(text)["input_ids"]
        ids = _truncate(ids[:-5], self.max_length, self.special) + ids[-5:]
        tensor = torch.tensor([ids])
        kwargs: dict[str, Any] = {}
        if images:
            kwargs.update(pixel_values=torch.cat(images), image_grid_thw=torch.tensor(image_grids))
        if videos:
            kwargs.update(pixel_values_videos=torch.cat(videos),
                          video_grid_thw=torch.tensor(video_grids))
        if kwargs:
            kwargs["mm_token_type_ids"] = ((tensor == self.image_id).int()
                                           + 2 * (tensor == self.video_id).int())
        return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor), **kwargs}

    def scores(self, query: Any, documents: Sequence[Any], instruction: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, logit differences) of each document, float64."""
        torch = self.torch
        scores, logits = [], []
        for document in documents:
            with torch.no_grad():
                hidden = self.model(**self.pair_inputs(query, document, instruction)
                                    ).last_hidden_state[0, -1]
            logit = float(hidden.float() @ self.head)
            logits.append(logit)
            scores.append(float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))))
        return np.asarray(scores), np.asarray(logits)


def _expand(text: str, block: str, expansions: list[str]) -> str:
    """Replace the ``block`` placeholders of ``text``, in order, by ``expansions``."""
    parts = text.split(block)
    if len(parts) != len(expansions) + 1:  # pragma: no cover - the conversation made both
        raise InputError(f"{len(parts) - 1} placeholders for {len(expansions)} visuals")
    return parts[0] + "".join(e + p for e, p in zip(expansions, parts[1:]))


def _truncate(tokens: list[int], max_length: int, special: set[int]) -> list[int]:
    """``Qwen3VLReranker.truncate_tokens_optimized``."""
    if len(tokens) <= max_length:
        return tokens
    keep = max_length - sum(1 for t in tokens if t in special)
    out, kept = [], 0
    for t in tokens:
        if t in special:
            out.append(t)
        elif kept < keep:
            out.append(t)
            kept += 1
    return out


def check_vl_reranker(runner: Any, truncating: Any, ref: ReferenceVLReranker,
                      short_ref: ReferenceVLReranker, probes: list[Any],
                      result: ScoreResult) -> None:
    """Every probe through ``runner`` (a :class:`qwen3emb.runtime.VLReranker`) in one batch and
    alone, and the long probe through ``truncating`` (the same model at
    :data:`TRUNCATION_LENGTH`) against ``short_ref``."""
    agree = []
    for name, query, documents, instruction in probes:
        ref_scores, ref_logits = ref.scores(query, documents, instruction)
        prepared = runner.prepare_pairs(query, documents, instruction)
        scores, logits = runner.score_prepared(prepared, batch_size=8)
        labels = [f"{name}/{i}" for i in range(len(documents))]
        result.add("batch", labels, scores, logits, ref_scores, ref_logits)
        alone = [runner.score_prepared([p]) for p in prepared]
        singles = np.array([s[0][0] for s in alone], dtype=np.float32)
        result.add("single", labels, singles, np.array([s[1][0] for s in alone]),
                   ref_scores, ref_logits)
        gap = float(np.abs(singles - scores).max())
        result.batch_vs_single_max_diff = max(result.batch_vs_single_max_diff or 0.0, gap)
        result.kendall_tau[name] = kendall_tau(scores, ref_scores)
        agree.append(int(np.argmax(scores)) == int(np.argmax(ref_scores)))
    name, query, documents, _ = next(p for p in probes if p[0] == "long")
    image = next(p for p in probes if p[0] == "text-to-image")[2][0]["image"]
    cut = [{"text": documents[0], "image": image}, documents[0]]
    ref_scores, ref_logits = short_ref.scores(query, cut)
    prepared = truncating.prepare_pairs(query, cut)
    scores, logits = truncating.score_prepared(prepared)
    result.add(f"truncated-{TRUNCATION_LENGTH}", [f"{name}+image", name], scores, logits,
               ref_scores, ref_logits)
    result.top1_agreement = float(np.mean(agree))


class VLRerankSuite:
    """The VL reranker probes through every decoder of a Qwen3-VL reranker bundle, each with
    the vision graph the exporter paired with it, on each requested engine.

    Same interface as :class:`qwen3emb.validate.text.TextSuite`.
    """

    implementation = ("transformers Qwen3VLForConditionalGeneration (released "
                      "Qwen3VLReranker recipe)")

    def __init__(self, bundle: Any, manifest: Any, checkpoint: Any, *, providers: Any = None,
                 **_: Any) -> None:
        self.bundle, self.manifest, self.checkpoint = bundle, manifest, checkpoint
        self.providers = providers
        self.probe_max_length = manifest.max_length
        self.probe_count = 0
        self.precision = "float32"

    def _decoders(self) -> list[dict[str, Any]]:
        from qwen3emb.validate.vl_onnx import onnx_graphs

        return onnx_graphs(self.manifest)[0]

    def held_precisions(self) -> list[str]:
        return [e["precision"] for e in self._decoders()]

    def open(self, precision: str, engine: Any, max_length: int | None = None) -> Any:
        from qwen3emb.runtime.vl_rerank import VLReranker

        return VLReranker(self.bundle, engine, precision=precision, max_length=max_length,
                          strict=False, verify=False)

    def run(self, precisions: Sequence[str] | None, progress: bool = False
            ) -> list[ScoreResult]:
        ref = ReferenceVLReranker(self.checkpoint.path, self.manifest.max_length)
        short_ref = ref.limited(TRUNCATION_LENGTH)
        decoders = [e for e in self._decoders() if not precisions or e["precision"] in precisions]
        results: list[ScoreResult] = []
        with tempfile.TemporaryDirectory(prefix="qwen3emb-vl-rerank-") as tmp, \
                bar(len(decoders), "validate", progress, unit="artifact") as ticker:
            probes = vl_rerank_probes(Path(tmp))
            self.probe_count = sum(len(p[2]) for p in probes) + 2
            for entry in decoders:
                precision = entry["precision"]
                for engine in engines(self.providers):
                    result = ScoreResult(
                        artifact=entry["path"], kind="onnx", precision=precision,
                        floor=SCORE_FLOORS[precision], engine=engine_label(engine),
                        note=f"with vision graph {entry.get('vision_precision', 'fp32')}")

                    def check(result: ScoreResult = result, precision: str = precision,
                              engine: Any = engine) -> None:
                        runner = self.open(precision, engine)
                        truncating = self.open(precision, engine, TRUNCATION_LENGTH)
                        result.checked_on = checked_on(runner, "onnx", precision)
                        check_vl_reranker(runner, truncating, ref, short_ref, probes, result)

                    results.append(measured(result, check))
                ticker.update(1)
        return results
