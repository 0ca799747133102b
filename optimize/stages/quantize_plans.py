"""Precision plans for the quantize stage: one plan judged (all layers low, or a plan file), or the
search for the fewest layers kept in float: each layer's sensitivity (1 - cosine_mean with only it
quantized), a ranking by sensitivity per weight, a first guess from the first failure, then
bisection within `max_evals` evaluations. `quantize.run` picks the mode; this is its arithmetic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

from optimize import cpu
from optimize.errors import GateFailed, UsageError
from optimize.models.handle import ModelHandle
from optimize.runtime.manifest import CheckResult, CpuSummary, JsonObject
from optimize.stages.base import Choice, StageContext, StageResult
from optimize.stages.quantize_methods import Dynamic, MethodBase, Static, int8_weight_range

FLOAT = "fp32"  # what a layer kept out of the low precision is


class Settings(Protocol):
    """The quantize stage's fields a plan reads (`QuantizeStage` has them)."""

    @property
    def plan(self) -> str | None: ...
    @property
    def max_evals(self) -> int: ...
    @property
    def rank_by(self) -> str: ...
    @property
    def require_speedup(self) -> bool: ...
    @property
    def min_speedup(self) -> float: ...
    @property
    def low(self) -> str: ...
    @property
    def quantizer(self) -> MethodBase: ...


# build(source, plan, out) -> the quantized model: the quantize stage's builder, its config bound
Build = Callable[[ModelHandle, dict[str, str], Path], ModelHandle]


class _Judged(TypedDict):
    label: str
    kept_float: list[str]  # the layers this plan keeps in float
    metrics: dict[str, float]
    gate_passed: bool
    checks: list[CheckResult]


class PlanTried(_Judged, total=False):
    """One plan judged against the stage's gate (and timed, when a speed-up is required)."""

    timed_in_turns_ms: list[float]  # [the candidate, the float model]
    faster_than_float: bool
    passed: bool  # held the gate and was faster


class _Searched(TypedDict):
    layers: int
    float_latency_p50_ms: float
    cpu: CpuSummary
    candidates: list[PlanTried]
    method: JsonObject  # the quantizer's fields


class PlanDecisions(_Searched, total=False):
    """What a plan search (or a fixed plan) decided, as the manifest records it."""

    int8_weights: str  # s8 | s8-reduced | u8, for this CPU
    sensitivity: dict[str, float]  # layer -> 1 - cosine_mean with only it quantized, ranked
    weights: dict[str, int]  # layer -> its weight count
    chosen: str  # the chosen plan's label


@dataclass
class Trials:
    """Plans built and judged against the stage's gate (and timed in turns with the float model
    when the stage requires a speed-up), recorded in `info` for the manifest."""

    config: Settings
    build: Build
    model: ModelHandle  # the preprocessed float model
    ctx: StageContext
    layers: list[str]
    info: PlanDecisions = field(init=False)
    candidates: list[PlanTried] = field(init=False)

    def __post_init__(self) -> None:
        float_metrics, _ = self.ctx.judge(self.model)
        here = cpu.current()
        method = self.config.quantizer
        self.candidates = []
        self.info = {
            "layers": len(self.layers),
            "float_latency_p50_ms": float_metrics["latency_p50_ms"],
            "cpu": here.summary(),
            "candidates": self.candidates,
            "method": method.model_dump(mode="json"),
        }
        if isinstance(method, Dynamic | Static):
            self.info["int8_weights"] = int8_weight_range(method.weights, here)

    def evaluate(self, plan: dict[str, str], label: str) -> tuple[ModelHandle, PlanTried]:
        from optimize.evaluate.measure import time_in_turns

        config, ctx = self.config, self.ctx
        handle = self.build(self.model, plan, ctx.workdir / f"candidate-{len(self.candidates)}.onnx")
        metrics, gate = ctx.judge(handle)
        record: PlanTried = {
            "label": label,
            "kept_float": sorted(n for n, p in plan.items() if p == FLOAT),
            "metrics": metrics,
            "gate_passed": gate["passed"],
            "checks": gate["checks"],
        }
        faster = True
        if config.require_speedup:
            # One timing on a shared machine can be a slow spell: the candidate and the float model are
            # timed in turns, and the candidate must win by a real margin, not by noise.
            record["timed_in_turns_ms"] = timed = time_in_turns(
                [handle, self.model], ctx.calibration_texts, ctx.seq_len
            )
            faster = timed[0] <= timed[1] * (1 - config.min_speedup)
        record["faster_than_float"], record["passed"] = faster, gate["passed"] and faster
        self.candidates.append(record)
        return handle, record


def choices(decided: PlanDecisions) -> list[Choice]:
    """Each plan judged, as the reports show them."""

    def outcome(row: PlanTried) -> str:
        verdict = "passed" if row.get("passed") else "not faster than float" if row["gate_passed"] else "gate failed"
        return f"{len(row['kept_float'])} kept in {FLOAT}, cosine_mean {row['metrics'].get('cosine_mean')}, {verdict}"

    return [
        Choice(
            label=row["label"],
            outcome=outcome(row),
            passed=bool(row.get("passed")),
            chosen=row["label"] == decided.get("chosen"),
            latency_ms=row["timed_in_turns_ms"][0] if row.get("timed_in_turns_ms") else None,
            fidelity=row["metrics"].get("cosine_mean"),
        )
        for row in decided["candidates"]
    ]


def fixed(trials: Trials) -> StageResult:
    """All layers in the low precision, or the plan a file gives; on a failed gate, the most
    sensitive layers and what to try."""
    config, layers, low, info = trials.config, trials.layers, trials.config.low, trials.info
    plan = _read_plan(Path(config.plan), layers) if config.plan else {n: low for n in layers}
    handle, record = trials.evaluate(plan, "given plan" if config.plan else f"all {low}")
    advice = None
    if not record["gate_passed"] and not config.plan:
        scores = sensitivity(trials, low)
        info["sensitivity"] = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
        advice = _advice(scores, low)
    elif not record["faster_than_float"]:
        candidate_ms, float_ms = record["timed_in_turns_ms"]
        raise GateFailed(
            f"quantize: the {low} model ({candidate_ms} ms) is not {config.min_speedup:.0%} faster "
            f"than the float model ({float_ms} ms) on this CPU ({cpu.current().model}), timed in turns; "
            "try `precision: auto`, or `require_speedup: false` for a size-only goal",
            metrics=record["metrics"],
            checks=record["checks"],
            details=info,
        )
    info["chosen"] = record["label"]
    return StageResult(handle, info, precision_plan=plan, advice=advice)


def search(trials: Trials, costs: dict[str, int]) -> StageResult:
    """The fewest layers kept in float (ranked by sensitivity per weight) for which the gate holds:
    a guess from the first failure, then bisection, within `max_evals` evaluations."""
    config, ctx, layers, low, info = trials.config, trials.ctx, trials.layers, trials.config.low, trials.info
    scores = sensitivity(trials, low)
    ranking = _rank(layers, scores, costs, config.rank_by)
    info["sensitivity"] = {n: scores[n] for n in ranking}
    info["weights"] = {n: costs[n] for n in ranking}
    _print_sensitivity(ctx, ranking, scores, costs, low, config.rank_by)

    def plan_keeping(kept: int) -> dict[str, str]:
        return {n: (FLOAT if n in ranking[:kept] else low) for n in layers}

    best: tuple[int, ModelHandle] | None = None
    lo, hi = -1, len(layers)  # lo: largest count known to fail; hi: smallest known (or assumed) to pass
    kept = 0
    while len(trials.candidates) < config.max_evals:
        handle, record = trials.evaluate(plan_keeping(kept), f"{kept} most sensitive kept in {FLOAT}")
        if record["passed"]:
            hi, best = kept, (kept, handle)
        else:
            lo = kept
            if not record["faster_than_float"]:
                break  # keeping more layers in float only gets slower
        if hi - lo <= 1:
            break
        if best is None and lo == 0:
            kept = min(_first_guess(record["checks"], ranking, scores), hi - 1)
        else:
            kept = (lo + hi) // 2 if best is not None else min(hi - 1, max(lo + 1, math.ceil(lo * 2)))
    if best is None:
        tried = trials.candidates
        closest = max(tried, key=lambda c: (c["faster_than_float"], c["metrics"].get("cosine_mean", 0)))
        raise GateFailed(
            f"quantize: no plan passed in {len(tried)} evaluations; the best kept "
            f"{len(closest['kept_float'])} layers in {FLOAT}: "
            + ", ".join(f"{k} {v}" for k, v in closest["metrics"].items())
            + "; raise `max_evals`, or loosen the gate if the float model itself is close to it",
            metrics=closest["metrics"],
            checks=closest["checks"],
            details=info,
        )
    info["chosen"] = f"{best[0]} most sensitive kept in {FLOAT}"
    return StageResult(best[1], info, precision_plan=plan_keeping(best[0]))


def sensitivity(trials: Trials, low: str) -> dict[str, float]:
    """1 - cosine_mean of the model with only `layer` in `low` precision, for each layer."""
    from rich.progress import Progress

    ctx, layers = trials.ctx, trials.layers
    scores = {}
    with Progress(transient=True, console=ctx.console) as progress:
        task = progress.add_task("sensitivity", total=len(layers))
        for i, layer in enumerate(layers):
            plan = {n: (low if n == layer else FLOAT) for n in layers}
            candidate = trials.build(trials.model, plan, ctx.workdir / "sensitivity" / f"{i}.onnx")
            scores[layer] = round(1.0 - ctx.probe(candidate)["cosine_mean"], 8)
            candidate.onnx_path.unlink()  # type: ignore[union-attr]
            progress.advance(task)
    return scores


def _print_sensitivity(
    ctx: StageContext,
    ranking: list[str],
    scores: dict[str, float],
    costs: dict[str, int],
    low: str,
    rank_by: str,
    shown: int = 12,
) -> None:
    from rich.table import Table

    table = Table(
        title=f"sensitivity: 1 - cosine_mean with only that layer in {low}; the first "
        f"{shown} of {len(ranking)} to keep in float (ranked by {rank_by})",
        title_justify="left",
    )
    table.add_column("rank", justify="right")
    table.add_column("layer")
    table.add_column("score", justify="right")
    table.add_column("weights", justify="right")
    for rank, name in enumerate(ranking[:shown], start=1):
        table.add_row(str(rank), name, f"{scores[name]:.3g}", f"{costs[name]:,}")
    ctx.console.print(table)


def _first_guess(checks: list[CheckResult], ranking: list[str], scores: dict[str, float]) -> int:
    """How many of the most sensitive layers to keep in float so the failing checks would hold, if
    each layer's loss added up in proportion to its sensitivity."""
    fraction = 0.0
    for check in checks:
        reference, value, threshold = check.get("reference"), check["value"], check["threshold"]
        if check["passed"] or reference is None or value is None or threshold is None:
            continue
        loss = abs(reference - value)
        allowed = abs(reference - threshold)
        if loss > 0:
            fraction = max(fraction, 1 - allowed / loss)
    total = sum(scores.values()) or 1.0
    kept, removed = 0, 0.0
    while kept < len(ranking) and removed / total < min(1.0, fraction * 1.25):
        removed += scores[ranking[kept]]
        kept += 1
    return max(kept, 1)


def _rank(layers: list[str], scores: dict[str, float], costs: dict[str, int], rank_by: str) -> list[str]:
    """The order in which layers are kept in float. By cost (the default), a layer kept in float buys
    the most quality per weight it keeps large and slow: attention projections before the 4x wider
    feed-forward layers, small tables before the word embeddings. By sensitivity alone, the most
    sensitive layers go first whatever they cost."""
    if rank_by == "cost":
        return sorted(layers, key=lambda n: -scores[n] / max(costs[n], 1))
    return sorted(layers, key=lambda n: -scores[n])


def _advice(scores: dict[str, float], low: str) -> str:
    worst = sorted(scores, key=lambda n: -scores[n])[:5]
    named = ", ".join(f"{n} ({scores[n]:.3g})" for n in worst)
    return (
        f"all {low} did not hold the gate; the most sensitive layers (1 - cosine_mean with only that layer "
        f"in {low}) are {named}. Try `precision: auto` in the recipe (`--precision auto`), which keeps the "
        "most sensitive layers in fp32 until the gate holds."
    )


def _read_plan(path: Path, layers: list[str]) -> dict[str, str]:
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the plan ({exc})") from None
    plan = plan.get("precision_plan", plan) if isinstance(plan, dict) else plan
    if not isinstance(plan, dict) or not set(plan.values()) <= {"int8", "int4", FLOAT}:
        raise UsageError(f"{path}: a plan maps layer names to int8, int4 or {FLOAT}")
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise UsageError(f"{path}: layers not in this model: {', '.join(unknown[:5])}")
    return {n: plan.get(n, FLOAT) for n in layers}
