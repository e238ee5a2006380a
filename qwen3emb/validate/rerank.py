"""Parity of a reranker bundle: query/document probes through every model, against
transformers' ``AutoModelForCausalLM`` with the model card's recipe, compared on the score."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qwen3emb.constants import SCORE_FLOORS
from qwen3emb.errors import InputError, Qwen3EmbError
from qwen3emb.progress import bar
from qwen3emb.validate.runners import checked_on, engine_label, engines

logger = logging.getLogger(__name__)

_WORDS = ("retrieval", "ranking", "passage", "evidence", "question", "answer", "index",
          "corpus", "relevance", "judgment", "context", "signal", "model", "vector")

RERANK_PROBES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("capital", "What is the capital of France?", (
        "Paris is the capital and largest city of France.",
        "Berlin is the capital of Germany.",
        "The Eiffel Tower was finished in 1889.",
        "",
    )),
    ("photosynthesis", "How do plants make food?", (
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "Plants need water, light and carbon dioxide.",
        "Le renard brun rapide saute par-dessus le chien paresseux.",
    )),
    ("code", "how to add two numbers in python", (
        "def add(a, b):\n    return a + b",
        '{"key": [1, 2, 3], "nested": {"a": null}}',
        "literal <|endoftext|> and <|im_end|> inside a document",
    )),
    ("multilingual", "東京はどこの首都ですか", (
        "東京は日本の首都です。",
        "敏捷的棕色狐狸跳过了懒狗。",
        "Быстрая коричневая лиса прыгает через ленивую собаку.",
        "العربية لغة جميلة.",
    )),
    ("long", "which passage talks about relevance judgments?", (
        " ".join(_WORDS[i % len(_WORDS)] for i in range(600)),
        " ".join(_WORDS[(3 * i) % len(_WORDS)] for i in range(600)),
        "🚀 launch day 🎉👍🏽",
    )),
    ("empty-query", "", ("An answer without a question.", "")),
)
"""(name, query, documents): short and 600-word documents, several languages, empty strings,
text that looks like special tokens. Independent of any calibration text."""

INSTRUCTION_PROBE = "Given a code search query, retrieve snippets that implement it"


@dataclass
class ScoreResult:
    """What was measured for one reranker artifact against the reference."""

    artifact: str
    kind: str
    precision: str
    floor: float
    """Largest |score - reference score| allowed."""
    score_diffs: dict[str, float] = field(default_factory=dict)
    max_abs_logit_diff: float = 0.0
    kendall_tau: dict[str, float] = field(default_factory=dict)
    top1_agreement: float | None = None
    batch_vs_single_max_diff: float | None = None
    nan_inf: int = 0
    error: str | None = None
    informational: bool = False
    note: str | None = None
    checked_on: str | None = None
    """What ran it (:func:`qwen3emb.validate.runners.checked_on`)."""
    engine: str | None = None
    """The row's engine where not the default onnxruntime (``openvino:CPU``)."""

    @property
    def name(self) -> str:
        return f"{self.artifact} @ {self.engine}" if self.engine else self.artifact

    def add(self, label: str, names: Sequence[str], scores: np.ndarray, logits: np.ndarray,
            ref_scores: np.ndarray, ref_logits: np.ndarray) -> None:
        """Record |Δ score| per probe under ``label:name`` and the largest |Δ logit|."""
        bad = ~np.isfinite(scores) | ~np.isfinite(logits)
        self.nan_inf += int(bad.sum())
        diff = np.where(bad, np.inf, np.abs(scores.astype(np.float64) - ref_scores))
        for name, value in zip(names, diff):
            self.score_diffs[f"{label}:{name}"] = float(value)
        logit = np.where(bad, np.inf, np.abs(logits.astype(np.float64) - ref_logits))
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(logit.max(initial=0.0)))

    @property
    def max_abs_score_diff(self) -> float:
        return max(self.score_diffs.values()) if self.score_diffs else float("nan")

    @property
    def min_kendall_tau(self) -> float | None:
        return min(self.kendall_tau.values()) if self.kendall_tau else None

    @property
    def worst(self) -> list[tuple[str, float]]:
        return sorted(self.score_diffs.items(), key=lambda kv: -kv[1])[:5]

    @property
    def failures(self) -> list[str]:
        out: list[str] = []
        if self.error:
            out.append(self.error)
        if self.nan_inf:
            out.append(f"{self.nan_inf} NaN/Inf values in the output")
        if self.score_diffs and not self.max_abs_score_diff <= self.floor:
            name, value = self.worst[0]
            out.append(f"max |score diff| {value:.2e} > floor {self.floor} (probe {name})")
        if not self.score_diffs and not self.error:
            out.append("no probes were compared")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(max_abs_score_diff=self.max_abs_score_diff,
                    min_kendall_tau=self.min_kendall_tau, passed=self.passed,
                    failures=self.failures,
                    worst=[{"probe": k, "score_diff": v} for k, v in self.worst])
        return data


class ReferenceReranker:
    """The model card's scoring with transformers (left padding, last position, yes vs no).

    Args:
        checkpoint: the reranker checkpoint directory.
        max_length: the pair limit (prompt included).
    """

    def __init__(self, checkpoint: Any, max_length: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qwen3emb.constants import RERANK_NO, RERANK_PREFIX, RERANK_SUFFIX, RERANK_YES

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.yes = self.tokenizer.convert_tokens_to_ids(RERANK_YES)
        self.no = self.tokenizer.convert_tokens_to_ids(RERANK_NO)
        self.prefix = self.tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
        self.max_length = max_length
        self.precision = "float32"

    def scores(self, query: str, documents: Sequence[str], instruction: str | None = None,
               batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(scores, logit differences) of each document, float64."""
        import torch

        from qwen3emb.constants import RERANK_INSTRUCTION, RERANK_TEMPLATE

        task = RERANK_INSTRUCTION if instruction is None else instruction
        pairs = [RERANK_TEMPLATE.format(instruction=task, query=query, document=d)
                 for d in documents]
        scores, logits = [], []
        for start in range(0, len(pairs), batch_size):
            inputs = self.tokenizer(pairs[start:start + batch_size], padding=False,
                                    truncation="longest_first", return_attention_mask=False,
                                    max_length=self.max_length - len(self.prefix)
                                    - len(self.suffix))
            inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
            with warnings.catch_warnings():  # the card's call passes max_length, which pad ignores
                warnings.simplefilter("ignore", UserWarning)
                batch = self.tokenizer.pad(inputs, padding=True, return_tensors="pt",
                                           max_length=self.max_length)
            with torch.no_grad():
                last = self.model(**batch).logits[:, -1, :]
            pair = torch.stack([last[:, self.no], last[:, self.yes]], dim=1)
            scores.append(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().double())
            logits.append((last[:, self.yes] - last[:, self.no]).double())
        return torch.cat(scores).numpy(), torch.cat(logits).numpy()


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ-b of two score lists (1.0 for fewer than two items or no variation)."""
    if len(a) < 2:
        return 1.0
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return 1.0 if not np.isfinite(tau) else float(tau)


def measured(result: ScoreResult, check: Any) -> ScoreResult:
    """Run ``check()`` (open the artifact, compare it) into ``result``: a refusal becomes the
    row's error, not the run's."""
    try:
        check()
    except Qwen3EmbError as e:
        result.error = e.one_line()
    logger.info("%s: max |score diff| %.2e (floor %s)", result.name, result.max_abs_score_diff,
                result.floor)
    return result


def check_reranker(runner: Any, ref: ReferenceReranker, result: ScoreResult) -> None:
    """Every probe through ``runner`` (a :class:`qwen3emb.runtime.Reranker`), in batches, alone,
    and with a non-default instruction."""
    agree = []
    for name, query, documents in RERANK_PROBES:
        ref_scores, ref_logits = ref.scores(query, documents)
        ids, _ = runner.prompt.pair_ids(query, documents)
        scores = runner.score_ids(ids, batch_size=8)
        logits = runner.score_ids(ids, batch_size=8, logits=True)
        labels = [f"{name}/{i}" for i in range(len(documents))]
        result.add("batch", labels, scores, logits, ref_scores, ref_logits)
        singles = np.array([runner.score_ids([row])[0] for row in ids], dtype=np.float32)
        single_logits = np.array([runner.score_ids([row], logits=True)[0] for row in ids])
        result.add("single", labels, singles, single_logits, ref_scores, ref_logits)
        gap = float(np.abs(singles - scores).max())
        result.batch_vs_single_max_diff = max(result.batch_vs_single_max_diff or 0.0, gap)
        result.kendall_tau[name] = kendall_tau(scores, ref_scores)
        agree.append(int(np.argmax(scores)) == int(np.argmax(ref_scores)))
    name, query, documents = RERANK_PROBES[2]
    ref_scores, ref_logits = ref.scores(query, documents, INSTRUCTION_PROBE)
    ids, _ = runner.prompt.pair_ids(query, documents, INSTRUCTION_PROBE)
    result.add("instruction", [f"{name}/{i}" for i in range(len(documents))],
               runner.score_ids(ids), runner.score_ids(ids, logits=True), ref_scores, ref_logits)
    result.top1_agreement = float(np.mean(agree))


class RerankSuite:
    """The reranker probes through every model of a reranker bundle: ONNX on each requested
    engine, GGUF on llama.cpp's rank pooling.

    Same interface as :class:`qwen3emb.validate.text.TextSuite`.
    """

    implementation = "transformers AutoModelForCausalLM (model card recipe)"
    supports_eval_set = True

    def __init__(self, bundle: Any, manifest: Any, checkpoint: Any, *,
                 providers: Any = None, probe_max_length: int | None = None, **_: Any) -> None:
        self.bundle, self.manifest, self.checkpoint = bundle, manifest, checkpoint
        self.providers = providers
        self.limit = probe_max_length or manifest.max_length
        if not 1 <= self.limit <= manifest.max_length:
            raise InputError(f"probe max length {self.limit} is outside "
                             f"1..{manifest.max_length}")
        self.probe_max_length = self.limit
        self.probe_count = sum(len(d) for _, _, d in RERANK_PROBES) + len(RERANK_PROBES[2][2])
        self.precision = "float32"

    def _models(self) -> list[tuple[str, str, dict[str, Any]]]:
        order = list(SCORE_FLOORS)
        return [(kind, p, e) for kind in ("onnx", "gguf")
                for p, e in sorted(self.manifest.models(kind).items(),
                                   key=lambda kv: order.index(kv[0]))]

    def held_precisions(self) -> list[str]:
        return [m[1] for m in self._models()]

    def open(self, kind: str, precision: str, engine: Any, limit: int) -> Any:
        """The runtime of one artifact: ONNX on ``engine``'s providers, GGUF on llama.cpp."""
        from qwen3emb.runtime.gguf_rerank import GGUFReranker
        from qwen3emb.runtime.rerank import Reranker

        if kind == "onnx":
            return Reranker(self.bundle, engine, precision=precision, max_length=limit,
                            strict=False, verify=False)
        return GGUFReranker(self.bundle, gguf_type=precision, max_length=limit)

    def run(self, precisions: Sequence[str] | None, progress: bool = False
            ) -> list[ScoreResult]:
        ref = ReferenceReranker(self.checkpoint.path, self.limit)
        models = [m for m in self._models() if not precisions or m[1] in precisions]
        results: list[ScoreResult] = []
        with bar(len(models), "validate", progress, unit="artifact") as ticker:
            for kind, precision, entry in models:
                for engine in engines(self.providers) if kind == "onnx" else [None]:
                    result = ScoreResult(artifact=entry["path"], kind=kind, precision=precision,
                                         floor=SCORE_FLOORS[precision],
                                         engine=engine_label(engine))

                    def check(result: ScoreResult = result, kind: str = kind,
                              precision: str = precision, engine: Any = engine) -> None:
                        runner = self.open(kind, precision, engine, self.limit)
                        result.checked_on = checked_on(runner, kind, precision)
                        check_reranker(runner, ref, result)

                    results.append(measured(result, check))
                ticker.update(1)
        return results
