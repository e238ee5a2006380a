"""Accuracy-driven int8 / int4: measure, build, score on calibration texts, escalate.

1. **Measure** (:mod:`qwen3emb.export.quant.sensitivity`): every weight MatMul's output error
   under each treatment, from input rows sampled during calibration (one read of each weight),
   and the embedding table's per-column error (one read of the table).
2. **Plan**: start from the fixed recipe's choices (:func:`planned.initial_plan`); a MatMul
   whose error is out of line with its peers' (``OUT_OF_LINE`` x the median of its tier) is
   escalated before anything is built; embedding outlier columns go to an fp32 side table.
3. **Score** (:mod:`qwen3emb.export.quant.scoring`): build the variant and run it on the
   calibration texts (never the validator's probes, which stay an independent check) against
   the fp32 graph's outputs kept by calibration; the figure is the minimum cosine over texts.
4. **Escalate** while the score misses the precision's target: the most sensitive MatMuls
   (largest measured error reduction per added byte) move one step along
   the precision's ladder (:data:`planned.LADDERS`: int8 straight to fp32, or to 8-bit
   weights with int8 activations per 32-block where fp32 would not fit; int4 through 8-bit
   weights with fp32 activations), 1/8 of the candidates first, then 1/4, 1/2, all; never
   beyond the precision's size budget; where int8's ladder misses the target, the size ladder
   too. At most ``MAX_BUILDS`` builds a ladder, each one pass over the weights, each timed
   (:class:`qwen3emb.export.quant.choice.BuildClock`).
5. **Choose** (:func:`qwen3emb.export.quant.choice.choose_plan`): the fastest plan that
   reaches the target; where none does, the most faithful that is past halfway from floor to
   target and faster than fp32.

If the floor itself cannot be reached within the budget, the export stops with one line: the
best fidelity reached and what keeping the sensitive MatMuls in fp32 would cost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import (
    ATTENTION_MASK,
    EXTERNAL_DATA_SUFFIX,
    INPUT_IDS,
)
from qwen3emb.errors import OutputError
from qwen3emb.export.onnx.lazy import LazyGraph
from qwen3emb.export.quant import planned
from qwen3emb.export.quant import quantize as q
from qwen3emb.export.quant.calibrate import Calibration
from qwen3emb.export.quant.choice import _LADDER_NAMES, BuildClock, choose_plan
from qwen3emb.export.quant.ops import token_embedding, weight_matmuls
from qwen3emb.export.quant.scoring import (
    COSINE,
    SCORE_BATCH,
    Metric,
    score,
    scoring_feeds,
)
from qwen3emb.export.quant.sensitivity import (
    ActivationSamples,
    EmbeddingReport,
    measure_embedding,
    measure_matmul,
)
from qwen3emb.export.quant.variants import Variant, variant_path

logger = logging.getLogger(__name__)

SIZE_BUDGET: dict[str, float] = {"int8": 0.40, "int4": 0.32}
"""Largest variant, as a fraction of the fp32 weights (MatMuls and embedding table)."""
SCORE_SIZE_BUDGET = 1.0
"""A reranker's budget: any MatMul may go back to fp32. Users threshold the score itself, so
a variant that misses its score floor is worse than a slower one; the settings record what
each escalation cost."""
OUT_OF_LINE = 4.0
"""A MatMul whose measured error exceeds this x the median of its tier is escalated up front."""
OUT_OF_LINE_MIN_ERROR = 0.02
CEILING: dict[str, float] = {"int8": 0.04, "int8-row": 0.04, "int4": 0.2}
"""Measured output error above which a MatMul leaves its tier up front, whatever its peers do.
Per-tensor dynamic int8 measures ~1 % on Gaussian inputs and 1-3 % on the normal and deep
fixtures; on the outlier fixtures MatMuls above 4 % were the ones that failed on texts the
calibration never saw (probe cosine 0.69 with one such MatMul left at int8, 0.995 without)."""
MAX_BUILDS = 5
MAX_SCORE_BUILDS = 8
"""A reranker's builds per ladder: its budget lets every MatMul go back to fp32, and five
builds can end short of the target with candidates left (the deep high-variance reranker's
int4: calibration 0.047 against a 0.025 target after five, 0.063 on the validator's probes,
above the 0.05 floor); the extra builds take the remaining ladder steps."""
ROUND_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
MEASURED_TIERS = ("int4", "int8", "int8-row", "nbits8", "nbits8-128")


class Measurements:
    """Per-MatMul errors per tier, weight sizes, and the embedding table's report.

    ``batch``: how many calibration feeds share one call's dynamic activation scale at run
    time (token graphs: a padded batch; the vision graph: 1, one image or video per call).
    """

    def __init__(self, source: Path, samples: ActivationSamples, calibration: Calibration,
                 smoothing: list[q.Smoothing], batch: int = SCORE_BATCH) -> None:
        start = time.perf_counter()
        graph = LazyGraph(source)
        factors = {item.activation: item.factors for item in smoothing}
        if smoothing:
            q.apply_smoothing(graph, smoothing, calibration.ranges)
        self.errors: dict[str, dict[str, float]] = {}
        self.sizes: dict[str, int] = {}
        for node in weight_matmuls(graph):
            k, n = graph.shape(node.input[1])
            self.sizes[node.name] = k * n
            if node.input[0] not in samples.rows:
                continue
            x, bounds = samples.inputs(node.input[0], factors.get(node.input[0]), batch)
            self.errors[node.name] = measure_matmul(x, bounds, graph.read(node.input[1]),
                                                    MEASURED_TIERS)
        self.embedding: EmbeddingReport | None = None
        self.embedding_shape: tuple[int, int] = (0, 0)
        table = _embedding_table(graph)
        if table is not None:
            array = graph.read(table)
            self.embedding_shape = array.shape
            if array.shape[1] % q.EMBEDDING_BLOCK_SIZE == 0:
                self.embedding = measure_embedding(array, q.EMBEDDING_BLOCK_SIZE)
            del array
        self.seconds = time.perf_counter() - start
        logger.info("measured %d MatMuls under %d treatments in %.1f s", len(self.errors),
                    len(MEASURED_TIERS), self.seconds)

    def error(self, name: str, tier: str) -> float:
        return 0.0 if tier == "fp32" else self.errors.get(name, {}).get(tier, 0.0)

    def fp32_bytes(self) -> float:
        rows, width = self.embedding_shape
        return 4.0 * (sum(self.sizes.values()) + rows * width)


def _embedding_table(graph: LazyGraph) -> str | None:
    gather = token_embedding(graph)
    return None if gather is None else gather.input[0]


def next_tier(name: str, tier: str, measurements: Measurements, ladder: dict[str, str]
              ) -> str:
    """The next tier up ``ladder`` from ``tier`` whose measured error for ``name`` is under its
    ``CEILING`` (a 4-bit MatMul whose int8 error is out of bounds goes straight past int8)."""
    nxt = ladder[tier]
    while nxt in ladder and measurements.error(name, nxt) > CEILING.get(nxt, 1.0):
        nxt = ladder[nxt]
    return nxt


def rank_escalations(plan: dict[str, str], measurements: Measurements,
                     ladder: dict[str, str]) -> list[str]:
    """MatMuls that can move up a tier, the best error reduction per added byte first."""

    def value(name: str) -> float:
        tier, nxt = plan[name], next_tier(name, plan[name], measurements, ladder)
        gain = measurements.error(name, tier) - measurements.error(name, nxt)
        cost = (planned.TIERS[nxt].bytes_per_weight() - planned.TIERS[tier].bytes_per_weight())
        return gain / max(cost, 1e-3)

    return sorted((n for n, t in plan.items() if t in ladder), key=lambda n: -value(n))


def _escalate(plan: dict[str, str], ranked: list[str], count: int,
              measurements: Measurements, budget: float, fixed_bytes: float,
              ladder: dict[str, str]) -> dict[str, str]:
    """Move the first ``count`` of ``ranked`` one tier up, to the cheaper fallback tier when
    the budget refuses the next one, skipping what the budget refuses entirely."""
    new = dict(plan)
    sizes = measurements.sizes
    for name in ranked[:count]:
        nxt = next_tier(name, new[name], measurements, ladder)
        for tier in (nxt, planned.fallback_of(ladder).get(nxt)):
            if tier is None or tier == new[name]:
                continue
            trial = {**new, name: tier}
            if planned.plan_bytes(trial, sizes) + fixed_bytes <= budget:
                new = trial
                break
    return new


def search_variant(source: Path, precision: str, *, scheme: str, calibration: Calibration,
                   measurements: Measurements, smoothing: list[q.Smoothing],
                   feeds: Sequence[dict[str, np.ndarray]], external: bool,
                   target: float | None = None, metric: Metric = COSINE) -> Variant:
    """Build ``precision`` of ``source`` at the smallest escalation that meets its target.

    Args:
        source: the optimized fp32 graph.
        precision: ``int8`` or ``int4``.
        scheme: the int8 recipe the plan starts from.
        calibration: ranges and the fp32 outputs of ``feeds``.
        measurements: :class:`Measurements` of ``source`` under ``smoothing``.
        smoothing: the smoothing plan (folded into every build).
        feeds: the calibration inputs.
        external: write weights to ``<name>_data``.
        target: calibration min cosine to reach (default ``TARGETS[precision]``); with the
            ``score`` metric, the largest |score difference| (default ``SCORE_TARGETS``).
        metric: what a build is scored on (:class:`Metric`).

    Returns:
        The written variant; its settings record every decision.

    Raises:
        OutputError: the floor is out of reach within the size budget.
    """
    target, floor = metric.target(precision, target), metric.floor(precision)
    ranges = dict(calibration.ranges)
    smoothed = q.apply_smoothing(LazyGraph(source), smoothing, ranges) if smoothing else ranges
    plan = planned.initial_plan(LazyGraph(source), precision, scheme, smoothed)
    start_plan = dict(plan)
    sizes = measurements.sizes
    columns: tuple[int, ...] | None = (measurements.embedding.outlier_columns
                                       if measurements.embedding else ())
    rows, width = measurements.embedding_shape
    # The embedding table: codes, block scales and zero points, plus the fp32 side table.
    fixed = rows * width * (1 + 5 / q.EMBEDDING_BLOCK_SIZE) + 4 * rows * len(columns or ())
    budget = (SIZE_BUDGET[precision] if metric.name == "cosine"
              else SCORE_SIZE_BUDGET) * measurements.fp32_bytes()
    out_of_line = _out_of_line(plan, measurements)
    target_path = variant_path(source, precision)
    rounds: list[dict[str, Any]] = []
    best = -1.0
    started = time.perf_counter()
    scoring = scoring_feeds(feeds)
    table_check: dict[str, Any] | None = None
    if metric.name == "score" and rows:
        # A score is one number: the 8-bit table's error reaches it unaveraged. Measured
        # alone (every MatMul fp32); where it takes more than half the target, the table stays
        # fp32, which costs size, not time (a Gather).
        files = planned.build_planned(source, target_path, {n: "fp32" for n in plan},
                                      smoothing, calibration.ranges, columns, external)
        alone = score(target_path, scoring, calibration.outputs, metric)
        for path in files:
            path.unlink(missing_ok=True)
        keep = 1.0 - alone > (1.0 - target) / 2
        table_check = {"table_alone": metric.shown(alone), "table_fp32": keep}
        if keep:
            columns, fixed = None, 4.0 * rows * width
        logger.info("%s %s: the 8-bit table alone gives %s %.5f: table %s", source.name,
                    precision, metric.label, metric.shown(alone), "fp32" if keep else "8-bit")
    # The precision's own ladder first; where the budget stops it short of the target (fp32
    # escalations are 4 bytes a weight), the size ladder is tried too and the best plan kept.
    ladders = [planned.LADDERS[precision]]
    if ladders[0] is not planned.SIZE_LADDER:
        ladders.append(planned.SIZE_LADDER)
    scored: dict[frozenset[tuple[str, str]], float] = {}
    timed: dict[frozenset[tuple[str, str]], float] = {}
    clock = BuildClock(source, scoring) if metric.name == "cosine" else None
    files: list[Path] = []
    on_disk: frozenset[tuple[str, str]] | None = None
    for ladder in ladders:
        plan = _escalate(dict(start_plan), out_of_line, len(out_of_line), measurements, budget,
                         fixed, ladder)
        builds = MAX_BUILDS if metric.name == "cosine" else MAX_SCORE_BUILDS
        for build in range(builds):
            key = frozenset(plan.items())
            reused = key in scored  # the second ladder starts where the first did
            if not reused:
                # The previous build is scored: remove it first, so the disk holds the fp32
                # graph and one variant (an 8B: 30 GB + ~10 GB), not two.
                for path in files:
                    path.unlink(missing_ok=True)
                files = planned.build_planned(source, target_path, plan, smoothing,
                                              calibration.ranges, columns, external)
                on_disk = key
                scored[key] = score(target_path, scoring, calibration.outputs, metric)
                if clock is not None and (seconds := clock.time(target_path)) is not None:
                    timed[key] = seconds
            fidelity = scored[key]
            best = max(best, fidelity)
            rounds.append({metric.key: round(metric.shown(fidelity), 6),
                           "ladder": _LADDER_NAMES[id(ladder)],
                           **({"score_reused": True} if reused else {}),
                           **({"ms": round(timed[key] * 1e3, 1)} if key in timed else {}),
                           "tiers": planned.plan_summary(plan),
                           "weight_mb": round((planned.plan_bytes(plan, sizes) + fixed) / 1e6,
                                              3)})
            logger.info("%s %s build %d: calibration %s %.5f (%s)", source.name, precision,
                        len(rounds), metric.label, metric.shown(fidelity),
                        planned.plan_summary(plan))
            if fidelity >= target or build == builds - 1:
                break
            ranked = rank_escalations(plan, measurements, ladder)
            count = math.ceil(len(ranked) * ROUND_FRACTIONS[min(build, len(ROUND_FRACTIONS) - 1)])
            new = _escalate(plan, ranked, count, measurements, budget, fixed, ladder)
            if new == plan:
                break  # nothing left to escalate within the budget
            plan = new
        if best >= target:
            break
    chosen = choose_plan(scored, timed, target, floor,
                         clock.fp32_seconds if clock is not None else None)
    plan = dict(chosen)
    fidelity = scored[chosen]
    if frozenset(plan.items()) != on_disk:  # the kept plan is not the last one written
        for path in files:
            path.unlink(missing_ok=True)
        files = planned.build_planned(source, target_path, plan, smoothing, calibration.ranges,
                                      columns, external)
        fidelity = score(target_path, scoring, calibration.outputs, metric)
        rounds.append({metric.key: round(metric.shown(fidelity), 6), "rebuilt_best": True,
                       "tiers": planned.plan_summary(plan),
                       "weight_mb": round((planned.plan_bytes(plan, sizes) + fixed) / 1e6, 3)})
    if fidelity < floor:
        for path in files:
            path.unlink(missing_ok=True)
        everything = {n: "fp32" for n in plan}
        cost = (planned.plan_bytes(everything, sizes) + fixed) / 1e6
        raise OutputError(
            f"{source.name} {precision}: best {metric.label} on the calibration texts is "
            f"{metric.shown(best):.4f}, short of the {metric.shown(floor):g} floor, within "
            f"its size budget of "
            f"{budget / 1e6:.1f} MB; fp32 MatMuls would cost {cost:.1f} MB",
            hint="Export fp16 instead, or force a recipe with --int8-scheme")
    if fidelity < best:
        logger.info("%s %s: kept calibration %s %.5f over the most faithful plan's %.5f, "
                    "which runs slower (choose_plan)", source.name, precision, metric.label,
                    metric.shown(fidelity), metric.shown(best))
    if fidelity < target:
        logger.warning("%s %s: calibration %s %.5f meets the %g floor but not the %g "
                       "target (size budget reached)", source.name, precision, metric.label,
                       metric.shown(fidelity), metric.shown(floor), metric.shown(target))
    escalated = {n: f"{start_plan[n]}->{t}" for n, t in plan.items() if t != start_plan[n]}
    table = "; 8-bit embedding table" if measurements.embedding_shape[0] else ""
    embedding: dict[str, Any] = {"treatment": "none (no token-embedding table)"}
    if table and columns is None:
        table = "; fp32 embedding table"
        embedding = {"treatment": "fp32 (the 8-bit table alone missed half the target)",
                     **(table_check or {})}
    elif table:
        embedding = {"treatment": f"8-bit GatherBlockQuantized, block {q.EMBEDDING_BLOCK_SIZE}"
                     + ("; outlier columns in an fp32 side table" if columns else ""),
                     **(measurements.embedding.to_dict() if measurements.embedding else {}),
                     **(table_check or {})}
    settings: dict[str, Any] = {
        "search": "accuracy-driven (qwen3emb.export.quant.search)",
        # The fixed recipe the search started from (what --int8-scheme would force).
        **({"scheme": scheme} if precision == "int8" else {
            "bits": 4, "block_size": q.INT4_BLOCK_SIZE, "accuracy_level": q.INT4_ACCURACY_LEVEL,
            "8bit_matmuls": list(q.INT4_8BIT_MATMULS)}),
        "metric": metric.name,
        "calibration_fidelity": round(metric.shown(fidelity), 6),
        "target": metric.shown(target),
        "target_reached": fidelity >= target,
        "size_budget_mb": round(budget / 1e6, 3),
        "rounds": rounds,
        "search_seconds": round(time.perf_counter() - started, 1),
        **({"timed_on": clock.describe()} if clock is not None and timed else {}),
        "measure_seconds": round(measurements.seconds, 1),
        "tiers": {name: planned.TIERS[name].description for name in planned.plan_summary(plan)},
        "escalated": escalated,
        "out_of_line": sorted(out_of_line),
        "matmuls": {n: [t, round(measurements.error(n, t), 5)] for n, t in plan.items()},
        # Only per-tensor dynamic int8 shares a scale across the rows (texts) of a call.
        "batch_independent": all(planned.TIERS[t].per_row or planned.TIERS[t].kind != "dynamic"
                                 for t in plan.values()),
        "smoothed_norms": len(smoothing), "alpha": q.SMOOTH_ALPHA,
        "outlier_ratio": q.OUTLIER_RATIO,
        "embedding": embedding,
        "calibration": calibration.describe(),
    }
    summary = ", ".join(f"{k} {v}" for k, v in planned.plan_summary(plan).items())
    scheme_text = (f"accuracy-searched {precision}: MatMuls {summary}{table}"
                   + (f" with {len(columns)} outlier columns in fp32" if columns else "")
                   + f"; calibration {metric.label} {metric.shown(fidelity):.4g}")
    return Variant(precision, tuple(files), scheme_text, settings)


def search_variants(source: Path, precisions: Sequence[str], *, scheme: str,
                    calibration: Calibration, samples: ActivationSamples,
                    feeds: Sequence[dict[str, np.ndarray]],
                    targets: dict[str, float] | None = None,
                    metric: Metric = COSINE) -> list[Variant]:
    """:func:`search_variant` for each of ``precisions`` (``int8``, ``int4``), sharing one
    smoothing plan and one measurement per smoothing choice; ``targets`` replaces
    :data:`TARGETS` per precision.

    Raises:
        OutputError: a precision's floor is out of reach within its size budget.
    """
    from qwen3emb.export.quant.variants import EXTERNAL_DATA_THRESHOLD

    plan = q.plan_smoothing(LazyGraph(source), calibration.ranges, q.SMOOTH_ALPHA)
    batch = SCORE_BATCH if feeds and set(feeds[0]) == {INPUT_IDS, ATTENTION_MASK} else 1
    measured: dict[bool, Measurements] = {}
    variants = []
    for precision in precisions:
        smooth = precision == "int4" or scheme in q.SMOOTHED_INT8_SCHEMES
        if smooth not in measured:
            measured[smooth] = Measurements(source, samples, calibration,
                                            plan if smooth else [], batch)
        measurements = measured[smooth]
        external = (source.with_name(source.name + EXTERNAL_DATA_SUFFIX).exists()
                    or SIZE_BUDGET[precision] * measurements.fp32_bytes()
                    > EXTERNAL_DATA_THRESHOLD)
        variants.append(search_variant(source, precision, scheme=scheme,
                                       calibration=calibration, measurements=measurements,
                                       smoothing=plan if smooth else [], feeds=feeds,
                                       external=external,
                                       target=(targets or {}).get(precision),
                                       metric=metric))
    return variants


def _out_of_line(plan: dict[str, str], measurements: Measurements) -> list[str]:
    """MatMuls whose error is far above the median of the MatMuls sharing their tier, or
    above the tier's ``CEILING``."""
    flagged = []
    for tier in set(plan.values()) - {"fp32"}:
        names = [n for n, t in plan.items() if t == tier and n in measurements.errors]
        if not names:
            continue
        median = float(np.median([measurements.error(n, tier) for n in names]))
        flagged += [n for n in names if measurements.error(n, tier)
                    > min(max(OUT_OF_LINE * median, OUT_OF_LINE_MIN_ERROR),
                          CEILING.get(tier, 1.0))]
    return sorted(flagged, key=lambda n: -measurements.error(n, plan[n]))
