"""Which int8 formulation (or float) is fastest on the CPU that runs it, chosen by measuring.

Which int8 kernel wins depends on the instruction set (u8s8 with VNNI or AMX; without them, 7-bit
weights or u8u8 so onnxruntime's AVX2 kernel does not saturate), on the batch and on the sequence
length, and on some CPUs int8 does not pay at all. So `quantize` with `formulations:` builds every
listed formulation of the whole model, holds each to the stage's gate, times the passing ones and
the float model in turns at batch 1 and batch 32 in the shipped runtime, and keeps the one whose
worse ratio to float is lowest. The float model wins when no formulation is `min_speedup` faster
than it at both batch sizes: the stage then ships float and says so, rather than failing.

`formulations: auto` takes the list for this CPU (`for_cpu`); a recipe may list methods itself.
Earlier entries win ties: a later one must be `min_gain` faster, so a rerun on the same machine
picks the same formulation unless the timings really moved (both are recorded).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from optimize import cpu
from optimize.models.handle import ModelHandle
from optimize.runtime import family
from optimize.runtime.engines import DEFAULT_ENGINE
from optimize.runtime.manifest import CheckResult, CpuSummary, GateResult, JsonObject, RuntimeSettings
from optimize.stages.base import Choice, StageContext, StageResult
from optimize.stages.quantize_methods import (
    Dynamic,
    MethodBase,
    OpenVINOStatic,
    Static,
    WeightOnly8,
    openvino_available,
)

BATCHES = (1, 32)
FLOAT_LABEL = "fp32 (no int8)"
FLOAT_ON = "fp32 on"  # the float model run by another engine: "fp32 on openvino"


class _Named(TypedDict):
    formulation: str  # its label
    method: JsonObject  # its fields


class FormulationTried(_Named, total=False):
    """One formulation built (or not: `error`), judged, and timed when it held the gate."""

    error: str
    metrics: dict[str, float]
    gate_passed: bool
    checks: list[CheckResult]
    latency_ms: dict[str, float]  # b1, b32
    worst_ratio_to_fp32: float


class _Timed(TypedDict):
    formulations: list[FormulationTried]
    fp32_latency_ms: dict[str, float]
    chosen: str  # a formulation's label, or FLOAT_LABEL
    cpu: CpuSummary


class FormulationDecisions(_Timed, total=False):
    engines: dict[str, str]  # engine family -> the formulation its file ships
    why: str  # when the float model ships


def for_cpu(info: cpu.CpuInfo, openvino: bool | None = None) -> list[MethodBase]:
    """The formulations worth measuring on this CPU, the usual winner first. With int8 dot products
    and OpenVINO installed (`openvino`: whether it is), NNCF's static int8 for OpenVINO's kernels too."""
    if info.int8_dot:  # VNNI / AMX / dotprod: full-range s8 weights with u8 activations
        methods: list[MethodBase] = [
            Dynamic(weights="s8"),
            Dynamic(weights="s8", fuse=True),
            Static(name="static", weights="s8"),
            Static(name="static", weights="s8", format="qoperator"),
            WeightOnly8(name="nbits8"),
        ]
        if openvino_available() if openvino is None else openvino:
            methods.append(OpenVINOStatic(name="openvino"))
        return methods
    # AVX2 only: 7-bit weights or u8u8, which sum without saturating; int8 may not pay at all.
    return [
        Dynamic(weights="s8-reduced"),
        Dynamic(weights="u8"),
        Dynamic(weights="s8-reduced", fuse=True),
        Static(name="static", weights="s8-reduced"),
        WeightOnly8(name="nbits8"),
    ]


def per_engine(
    engines: Sequence[str],
    floats: Sequence[bool],
    timed: Sequence[dict[int, float]],
    float_ms: dict[int, float],
    min_speedup: float,
    min_gain: float,
) -> dict[str, int | None]:
    """For each engine family (`engines[i]`: formulation i's), the index of the formulation its file
    ships, by `choose` against the family's own float model (`floats[i]`: formulation i is it): None
    for onnxruntime's, the stage's input. A family without a float model of its own keeps its
    fastest formulation."""
    found: dict[str, int | None] = {DEFAULT_ENGINE: None}
    for engine in dict.fromkeys(engines):
        members = [i for i, e in enumerate(engines) if e == engine and not floats[i]]
        base = next((i for i, e in enumerate(engines) if e == engine and floats[i]), None)
        baseline = float_ms if base is None else timed[base]
        speedup = min_speedup if engine == DEFAULT_ENGINE or base is not None else -math.inf
        chosen, _ = choose(baseline, [timed[i] for i in members], speedup, min_gain)
        if chosen is not None:
            found[engine] = members[chosen]
        elif base is not None:
            found[engine] = base
    return found


def score(ms: dict[int, float], float_ms: dict[int, float]) -> float:
    """A formulation's worst ratio of latency to float's over the batch sizes (lower is faster)."""
    return round(max(ms[b] / float_ms[b] for b in float_ms), 4)


def choose(
    float_ms: dict[int, float], timed: Sequence[dict[int, float]], min_speedup: float, min_gain: float
) -> tuple[int | None, list[float]]:
    """The index of the formulation to keep (None: float), and each one's score: its worst ratio of
    latency to float's over the batch sizes. Earlier formulations win unless a later one scores
    `min_gain` better; float wins unless the best is `min_speedup` faster at every batch size."""
    scores = [score(ms, float_ms) for ms in timed]
    best: int | None = None
    for index, ratio in enumerate(scores):
        if best is None or ratio < scores[best] * (1 - min_gain):
            best = index
    if best is None or scores[best] > 1 - min_speedup:
        return None, scores
    return best, scores


def choices(decided: FormulationDecisions) -> list[Choice]:
    """The float baseline and each formulation, as the reports show them."""
    fp32 = decided["fp32_latency_ms"]
    baseline = Choice(
        label=FLOAT_LABEL,
        outcome="latency " + ", ".join(f"{k} {v} ms" for k, v in fp32.items()),
        passed=True,
        chosen=decided["chosen"] == FLOAT_LABEL,
        latency_ms=fp32.get("b1"),
        fidelity=1.0,
    )

    def outcome(row: FormulationTried) -> str:
        if row.get("error"):
            return f"error: {row.get('error', '')[:60]}"
        if "latency_ms" in row:
            return "latency " + ", ".join(f"{k} {v} ms" for k, v in row["latency_ms"].items())
        return "gate failed"

    return [
        baseline,
        *(
            Choice(
                label=row["formulation"],
                outcome=outcome(row),
                passed=bool(row.get("gate_passed")),
                chosen=row["formulation"] == decided["chosen"],
                latency_ms=row.get("latency_ms", {}).get("b1"),
                fidelity=row.get("metrics", {}).get("cosine_mean"),
            )
            for row in decided["formulations"]
        ),
    ]


def _summary(records: list[FormulationTried], float_ms: dict[int, float], label: str) -> str:
    """One line: each formulation's latency as a ratio to fp32 per batch size (or why it has none)."""
    shown = "; ".join(
        f"{r['formulation']} "
        + (
            "/".join(f"{v / float_ms[int(k[1:])]:.2f}" for k, v in r["latency_ms"].items())
            if "latency_ms" in r
            else r.get("error") or "gate failed"
        )
        for r in records
    )
    batches = "/".join(map(str, BATCHES))
    return f"quantize: formulations on this CPU (latency vs fp32, batch {batches}): {shown}; kept: {label}"


def _build_and_judge(
    made: list[tuple[FormulationTried, Callable[[], ModelHandle]]], ctx: StageContext, records: list[FormulationTried]
) -> tuple[list[tuple[FormulationTried, ModelHandle]], list[tuple[dict[str, float], GateResult]]]:
    """Each formulation built and held to the gate, recorded in `records` (a build that fails is
    recorded with its error); returns those that pass and what `ctx.judge` measured of each."""
    passing: list[tuple[FormulationTried, ModelHandle]] = []
    gates: list[tuple[dict[str, float], GateResult]] = []
    for record, make in made:
        records.append(record)
        with ctx.console.status(f"quantize: building {record['formulation']}"):
            try:
                handle = make()
            except Exception as exc:  # a formulation onnxruntime cannot make of this graph is recorded
                record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            metrics, gate = ctx.judge(handle)
        record["metrics"], record["gate_passed"], record["checks"] = metrics, gate["passed"], gate["checks"]
        if gate["passed"]:
            passing.append((record, handle))
            gates.append((metrics, gate))
    return passing, gates


def _timed(
    model: ModelHandle, passing: list[ModelHandle], ctx: StageContext
) -> tuple[dict[int, float], list[dict[int, float]]]:
    """fp32's latency and each passing formulation's, per batch size, measured in turns."""
    from optimize.evaluate.measure import time_in_turns

    timings: dict[int, list[float]] = {}
    with ctx.console.status(f"quantize: timing {len(passing)} formulations and fp32 in turns"):
        for batch in BATCHES:
            timings[batch] = time_in_turns([model, *passing], ctx.calibration_texts, ctx.seq_len, batch_size=batch)
    return {b: timings[b][0] for b in BATCHES}, [{b: timings[b][i + 1] for b in BATCHES} for i in range(len(passing))]


def _float_ships(min_speedup: float) -> str:
    batches = " and ".join(map(str, BATCHES))
    return (
        f"no int8 formulation passed the gate and was {min_speedup:.0%} faster than fp32 at batch {batches} "
        "on this CPU: the float model ships"
    )


def search(
    methods: Sequence[MethodBase],
    model: ModelHandle,
    ctx: StageContext,
    build: Callable[[MethodBase, Path], ModelHandle],
    min_speedup: float,
    min_gain: float,
    float_on: Sequence[str] = (),
) -> StageResult:
    """Build, gate and time every formulation of `model` (all layers low) and, on each engine of
    `float_on`, the float model; keep the fastest for each engine family (`per_engine`): the fastest
    of them is the stage's model, the others its `alternates`."""

    assert model.onnx_path is not None
    records: list[FormulationTried] = []
    made: list[tuple[FormulationTried, Callable[[], ModelHandle]]] = [
        (
            {"formulation": method.label(), "method": method.model_dump(mode="json")},
            functools.partial(build, method, ctx.workdir / f"formulation-{index}.onnx"),
        )
        for index, method in enumerate(methods)
    ]
    # The float model on another engine (OpenVINO's own kernels): that engine's baseline, and its file
    # where no low-precision formulation beats it.
    made += [
        (
            {"formulation": f"{FLOAT_ON} {engine}", "method": {"engine": engine}},
            functools.partial(model.with_onnx, model.onnx_path, engine),
        )
        for engine in float_on
    ]
    passing, gates = _build_and_judge(made, ctx, records)
    float_ms, timed = _timed(model, [h for _, h in passing], ctx)
    scores = [score(ms, float_ms) for ms in timed]
    for (record, _), ms, ratio in zip(passing, timed, scores, strict=True):
        record["latency_ms"], record["worst_ratio_to_fp32"] = {f"b{b}": v for b, v in ms.items()}, ratio
    engines = [family(handle.engine) for _, handle in passing]
    floats = [record["formulation"].startswith(FLOAT_ON) for record, _ in passing]
    winners = per_engine(engines, floats, timed, float_ms, min_speedup, min_gain)
    # The runtime's model is the fastest of the engines' winners (onnxruntime's float model scores 1.0).
    shipped = {e: 1.0 if i is None else scores[i] for e, i in winners.items()}
    main = min(shipped, key=shipped.__getitem__)  # onnxruntime first: it wins a tie
    labels = {e: FLOAT_LABEL if i is None else passing[i][0]["formulation"] for e, i in winners.items()}
    ctx.console.print(_summary(records, float_ms, labels[main]))
    decisions: FormulationDecisions = {
        "formulations": records,
        "fp32_latency_ms": {f"b{b}": v for b, v in float_ms.items()},
        "chosen": labels[main],
        "engines": labels,
        "cpu": cpu.current().summary(),
    }
    runtime: RuntimeSettings = {"tuned_on": cpu.current().summary()}
    handles = {e: model if i is None else passing[i][1] for e, i in winners.items()}
    alternates = {e: h for e, h in handles.items() if e != main}
    judged = {e: gates[i] for e, i in winners.items() if e != main and i is not None}
    if winners[main] is None:
        decisions["why"] = _float_ships(min_speedup)
        ctx.console.print(f"quantize: {decisions['why']}")
        return StageResult(model, decisions, precision_plan={}, runtime=runtime, alternates=alternates, judged=judged)
    return StageResult(handles[main], decisions, runtime=runtime, alternates=alternates, judged=judged)
