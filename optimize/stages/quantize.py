"""The quantize stage: calibration-driven mixed precision through `onnxruntime.quantization`.

1. Find the quantizable layers: MatMuls whose weight is a constant (activation x activation
   products in attention stay float: quantizing them costs accuracy for little speed).
2. Sensitivity: quantize one layer alone and measure how far the output moves on held-out
   calibration texts (1 - cosine_mean vs the reference). One cheap probe per layer.
3. Plan: `int8` / `int4` put every layer in that precision; `auto` starts from all-int8 and keeps
   layers in float along a ranking (sensitivity per weight by default, so cheap layers are kept
   before the wide feed-forward ones; or sensitivity alone), searching the number kept (first guess
   from the measured loss, then bisection) within `max_evals` full evaluations of the stage's gate.
   Every candidate is recorded. A plan file (`plan:`) skips the search.
4. A candidate that is not at least `min_speedup` (10%) faster than the float input model fails,
   whatever its quality; both are timed in turns (interleaved rounds) so a slow spell cannot decide.
5. A fixed precision (`int8`, `int4`) that fails its gate gets a sensitivity pass after all, so the
   failure names the layers that broke it and the recipe change to try.

int8 weights are chosen per CPU (`method: {weights: auto}`): full-range int8 where the CPU has int8
dot products with 32-bit sums (VNNI, AMX, ARM dotprod), and 7-bit weights (`reduce_range`)
elsewhere, where onnxruntime's AVX2 kernel sums uint8 x int8 pairs in 16 bits and full-range
weights saturate (see `optimize/cpu.py`). The choice and the CPU are recorded in the manifest.

How layers are put in low precision is the stage's `method` (`optimize/stages/methods.py`):
`dynamic` or `static` int8, `rtn` / `hqq` / `gptq` int4. Kept layers stay fp32 on CPU (fp16 is
slower there).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from optimize import cpu
from optimize.errors import GateFailed, UsageError
from optimize.model import ModelHandle
from optimize.runtime import on_openvino
from optimize.stages.base import StageBase, StageContext, StageResult
from optimize.stages.methods import (
    WEIGHT_INPUT,
    Dynamic,
    Method,
    MethodBase,
    Static,
    default_method,
    int8_weight_range,
    openvino_available,
)

FLOAT = "fp32"


class QuantizeStage(StageBase):
    order: ClassVar[int] = 1

    kind: Literal["quantize"] = "quantize"
    precision: Literal["auto", "int8", "int4", "fp16"] = "auto"
    method: Method | None = Field(None, description="how layers are quantized; default: dynamic (int8), rtn (int4)")
    max_evals: int = Field(4, ge=1, le=20, description="full gate evaluations the auto search may spend")
    rank_by: Literal["cost", "sensitivity"] = Field(
        "cost", description="auto: keep layers in float by sensitivity per weight (cost), or by sensitivity alone"
    )
    plan: str | None = Field(None, description="a plan JSON {layer: precision} to use instead of searching")
    formulations: Literal["auto"] | list[Method] | None = Field(
        None,
        description="int8: measure these formulations (auto: the list for this CPU) and fp32 in turns, and keep "
        "the fastest that passes the gate; fp32 ships when int8 does not pay (optimize/stages/formulations.py)",
    )
    min_gain: float = Field(0.05, ge=0, lt=1, description="formulations: how much faster a later one must be")
    require_speedup: bool = Field(True, description="fail a plan that is not faster than the float model")
    min_speedup: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="how much faster (0.1 = 10%) a plan must be than the float model, timed in turns at batch 1",
    )

    @model_validator(mode="after")
    def _method_matches_precision(self) -> QuantizeStage:
        if self.method is not None and self.precision in ("int8", "int4") and self.method.precision != self.precision:
            raise ValueError(
                f"method {self.method.name} makes {self.method.precision}, but precision is {self.precision}"
            )
        if self.formulations is not None:
            if self.precision != "int8" or self.method is not None or self.plan is not None:
                raise ValueError("formulations are whole-model int8 methods: use precision int8, no method or plan")
            if isinstance(self.formulations, list) and any(m.precision != "int8" for m in self.formulations):
                raise ValueError("formulations: int8 methods only (dynamic, static, nbits8, openvino)")
        if any(on_openvino(m.engine) for m in self._listed()) and not openvino_available():
            raise ValueError("method openvino needs OpenVINO and NNCF: pip install openvino nncf")
        return self

    def _listed(self) -> list[MethodBase]:
        """The methods the recipe names (its method, or its formulation list)."""
        listed: list[MethodBase] = [self.method] if self.method is not None else []
        return listed + (list(self.formulations) if isinstance(self.formulations, list) else [])

    @property
    def low(self) -> str:
        """The low precision layers go to: the method's, else int4 for `precision: int4`, else int8."""
        return self.method.precision if self.method is not None else ("int4" if self.precision == "int4" else "int8")

    @property
    def quantizer(self) -> MethodBase:
        return self.method or default_method(self.low)

    def problems(self, target: str) -> list[tuple[tuple[str | int, ...], str]]:
        if target != "cpu" and any(on_openvino(m.engine) for m in self._listed()):
            return [(("method",), f"method openvino runs on CPUs (OpenVINO's), and this recipe compiles for {target}")]
        if self.precision != "fp16":
            return []
        if target == "cpu":
            return [
                (
                    ("precision",),
                    "fp16 is slower than fp32 on CPUs, and this recipe compiles for cpu; use int8, int4 or auto",
                )
            ]
        return [
            (
                ("precision",),
                f"fp16 on {target} is the compile stage's `fp16: true` (the provider runs float "
                "layers in fp16); use int8, int4 or auto here",
            )
        ]

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def quantizable_layers(path: Path, precision: str) -> dict[str, int]:
    """Ops with a constant weight (MatMul; with int8 also embedding Gathers and the fused Attention and
    EmbedLayerNormalization), each with its weight's element count: what keeping it in float costs,
    in size and (for a MatMul) in multiply-adds per token. int4 (MatMulNBits) takes MatMuls only."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer}
    kinds = WEIGHT_INPUT if precision != "int4" else {"MatMul": 1}
    return {
        n.name: sizes[n.input[kinds[n.op_type]]]
        for n in model.graph.node
        if n.op_type in kinds and len(n.input) > kinds[n.op_type] and n.input[kinds[n.op_type]] in sizes
    }


class _Calibration:
    """onnxruntime's CalibrationDataReader over tokenized calibration texts, one text per batch."""

    def __init__(self, ctx: StageContext, model: ModelHandle, limit: int = 64):
        import onnxruntime as ort

        from optimize.runtime import Tokenizer

        session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        tokenizer = Tokenizer(model.checkpoint / "tokenizer.json", ctx.seq_len)
        self.feeds = [
            {n: v for n, v in tokenizer([text]).items() if n in names} for text in ctx.calibration_texts[:limit]
        ]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def build(
    config: QuantizeStage,
    source: ModelHandle,
    plan: dict[str, str],
    out: Path,
    ctx: StageContext | None,
    method: MethodBase | None = None,
) -> ModelHandle:
    """Write the model for `plan` ({layer: int8 | int4 | fp32}) to `out` with `method` (by default
    the stage's)."""
    assert source.onnx_path is not None
    chosen = {p for p in plan.values() if p != FLOAT}
    layers = [n for n, p in plan.items() if p != FLOAT]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not layers:
        import shutil

        shutil.copyfile(source.onnx_path, out)
        return source.with_onnx(out)
    method = method or config.quantizer
    if chosen != {method.precision}:
        raise UsageError(
            f"quantize: method {getattr(method, 'name', '?')} makes {method.precision}; the plan asks "
            f"for {', '.join(sorted(chosen))} (a plan mixes one low precision with {FLOAT})"
        )

    def calibration(limit: int = 64) -> _Calibration:
        assert ctx is not None, "a calibrated method needs the stage context"
        return _Calibration(ctx, source, limit)

    method.build(source.onnx_path, out, layers, calibration)
    return source.with_onnx(out, engine=method.engine)


def sensitivity(
    config: QuantizeStage, source: ModelHandle, layers: list[str], low: str, ctx: StageContext
) -> dict[str, float]:
    """1 - cosine_mean of the model with only `layer` in `low` precision, for each layer."""
    from rich.progress import Progress

    scores = {}
    with Progress(transient=True, console=ctx.console) as progress:
        task = progress.add_task("sensitivity", total=len(layers))
        for i, layer in enumerate(layers):
            plan = {n: (low if n == layer else FLOAT) for n in layers}
            candidate = build(config, source, plan, ctx.workdir / "sensitivity" / f"{i}.onnx", ctx)
            scores[layer] = round(1.0 - ctx.probe(candidate)["cosine_mean"], 8)
            candidate.onnx_path.unlink()  # type: ignore[union-attr]
            progress.advance(task)
    return scores


def _preprocessed_name(method: MethodBase) -> str:
    """The file `_preprocess` writes for `method`: one per kind of preprocessing, not per method."""
    return "fused.onnx" if isinstance(method, Dynamic) and method.fuse else "preprocessed.onnx"


def _preprocess(model: ModelHandle, ctx: StageContext, method: MethodBase) -> ModelHandle:
    """onnxruntime's recommended step before quantizing: ONNX shape inference and ORT's basic graph
    optimization (constant folding, redundant node removal), so fewer, larger ops get quantized.
    With `fuse`, onnxruntime.transformers' fusions instead (their contrib ops defeat ONNX shape
    inference). Not a default: on the 3-layer distilled MiniLM (AVX-512 VNNI CPU), fused int8 ran
    at 84.3 ms vs 73.8 ms unfused at batch 32 (5.35 vs 3.05 ms at batch 1), same run.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from optimize.stages.compile import fuse

    assert model.onnx_path is not None
    out = ctx.workdir / _preprocessed_name(method)
    if out.name == "fused.onnx":
        try:
            fuse(model.onnx_path, out, model.checkpoint)
        except ValueError as exc:
            raise UsageError(f"quantize: method.fuse: {exc}; set fuse: false") from None
        return model.with_onnx(out)
    # Symbolic shape inference does not complete on every transformer export; ONNX's does.
    quant_pre_process(str(model.onnx_path), str(out), skip_symbolic_shape=True)
    return model.with_onnx(out)


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


def _first_guess(checks: list[dict[str, Any]], ranking: list[str], scores: dict[str, float]) -> int:
    """How many of the most sensitive layers to keep in float so the failing checks would hold, if
    each layer's loss added up in proportion to its sensitivity."""
    fraction = 0.0
    for check in checks:
        if check["passed"] or check.get("reference") is None or check["threshold"] is None:
            continue
        loss = abs(check["reference"] - check["value"])
        allowed = abs(check["reference"] - check["threshold"])
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


def run(config: QuantizeStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    """Three modes: formulations (every int8 form, timed), a fixed plan (all-low or a plan file), or
    the search for the smallest set of layers to keep in float."""
    assert model.onnx_path is not None
    if config.formulations is not None:
        return _formulations(config, model, ctx)
    model = _preprocess(model, ctx, config.quantizer)
    assert model.onnx_path is not None
    costs = quantizable_layers(model.onnx_path, config.low)
    if not costs:
        raise UsageError(f"quantize: {model.onnx_path.name} has no MatMul with constant weights to quantize")
    trials = _Trials(config, model, ctx, list(costs))
    if config.plan or config.precision != "auto":
        return _fixed(trials)
    return _search(trials, costs)


@dataclass
class _Trials:
    """Plans built and judged against the stage's gate (and timed in turns with the float model
    when the stage requires a speed-up), recorded in `info` for the manifest."""

    config: QuantizeStage
    model: ModelHandle  # the preprocessed float model
    ctx: StageContext
    layers: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        float_metrics, _ = self.ctx.judge(self.model)
        here = cpu.current()
        method = self.config.quantizer
        self.info.update(
            layers=len(self.layers),
            float_latency_p50_ms=float_metrics["latency_p50_ms"],
            cpu=here.summary(),
            candidates=[],
            method=method.model_dump(mode="json"),
        )
        if isinstance(method, Dynamic | Static):
            self.info["int8_weights"] = int8_weight_range(method.weights, here)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.info["candidates"]
        return found

    def evaluate(self, plan: dict[str, str], label: str) -> tuple[ModelHandle, dict[str, Any]]:
        from optimize.evaluate import time_in_turns

        config, ctx = self.config, self.ctx
        handle = build(config, self.model, plan, ctx.workdir / f"candidate-{len(self.candidates)}.onnx", ctx)
        metrics, gate = ctx.judge(handle)
        record: dict[str, Any] = {
            "label": label,
            "kept_float": sorted(n for n, p in plan.items() if p == FLOAT),
            "metrics": metrics,
            "gate_passed": gate["passed"],
        }
        faster = True
        if config.require_speedup:
            # One timing on a shared machine can be a slow spell: the candidate and the float model are
            # timed in turns, and the candidate must win by a real margin, not by noise.
            record["timed_in_turns_ms"] = timed = time_in_turns(
                [handle, self.model], ctx.calibration_texts, ctx.seq_len
            )
            faster = timed[0] <= timed[1] * (1 - config.min_speedup)
        record.update(faster_than_float=faster, passed=gate["passed"] and faster, checks=gate["checks"])
        self.candidates.append(record)
        return handle, record


def _fixed(trials: _Trials) -> StageResult:
    """All layers in the low precision, or the plan a file gives; on a failed gate, the most
    sensitive layers and what to try."""
    config, layers, low, info = trials.config, trials.layers, trials.config.low, trials.info
    plan = _read_plan(Path(config.plan), layers) if config.plan else {n: low for n in layers}
    handle, record = trials.evaluate(plan, "given plan" if config.plan else f"all {low}")
    advice = None
    if not record["gate_passed"] and not config.plan:
        scores = sensitivity(config, trials.model, layers, low, trials.ctx)
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
    return StageResult(handle, info, precision_plan=plan, advice=advice)


def _search(trials: _Trials, costs: dict[str, int]) -> StageResult:
    """The fewest layers kept in float (ranked by sensitivity per weight) for which the gate holds:
    a guess from the first failure, then bisection, within `max_evals` evaluations."""
    config, ctx, layers, low, info = trials.config, trials.ctx, trials.layers, trials.config.low, trials.info
    scores = sensitivity(config, trials.model, layers, low, ctx)
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
    return StageResult(best[1], info, precision_plan=plan_keeping(best[0]))


def _formulations(config: QuantizeStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    from optimize.stages.formulations import for_cpu, search

    methods = for_cpu(cpu.current()) if config.formulations == "auto" else config.formulations
    assert methods is not None
    plans: dict[Path, dict[str, str]] = {}
    prepared: dict[str, ModelHandle] = {}  # formulations share a preprocessed graph: made once each

    def make(method: MethodBase, out: Path) -> ModelHandle:
        name = _preprocessed_name(method)
        source = prepared[name] = prepared.get(name) or _preprocess(model, ctx, method)
        assert source.onnx_path is not None
        plans[out] = {n: "int8" for n in quantizable_layers(source.onnx_path, "int8")}
        return build(config, source, plans[out], out, ctx, method)

    result = search(methods, model, ctx, make, config.min_speedup, config.min_gain)
    plan = plans.get(result.model.onnx_path, {}) if result.model.onnx_path else {}
    return StageResult(result.model, result.decisions, precision_plan=plan, runtime=result.runtime)


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
