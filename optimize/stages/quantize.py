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

How layers are put in low precision is the stage's `method` (`optimize/stages/quantize_methods.py`):
`dynamic` or `static` int8, `rtn` / `hqq` / `gptq` int4. Kept layers stay fp32 on CPU (fp16 is
slower there).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from optimize import cpu
from optimize.errors import UsageError
from optimize.models.handle import ModelHandle
from optimize.runtime import on_openvino
from optimize.runtime.manifest import JsonObject
from optimize.stages.base import Choice, StageBase, StageContext, StageResult
from optimize.stages.quantize_formulations import FormulationDecisions
from optimize.stages.quantize_formulations import choices as formulation_choices
from optimize.stages.quantize_methods import (
    WEIGHT_INPUT,
    Dynamic,
    Method,
    MethodBase,
    default_method,
    float_engine,
    openvino_available,
)
from optimize.stages.quantize_plans import FLOAT, PlanDecisions, Trials, fixed, search
from optimize.stages.quantize_plans import choices as plan_choices


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
        description="measure these int8 formulations (auto: the list for this CPU) and fp32 in turns, and keep "
        "the fastest that passes the gate; fp32 ships when int8 does not pay "
        "(optimize/stages/quantize_formulations.py). "
        "With precision auto, a model no formulation holds the gate for gets the mixed-plan search",
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
            if self.precision not in ("int8", "auto") or self.method is not None or self.plan is not None:
                raise ValueError(
                    "formulations are whole-model int8 methods: use precision int8 (or auto), no method or plan"
                )
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

    @classmethod
    def choices(cls, details: JsonObject) -> list[Choice]:
        """The formulations it timed, or the precision plans it judged."""
        if "formulations" in details:
            return formulation_choices(cast(FormulationDecisions, details))
        return plan_choices(cast(PlanDecisions, details))

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def quantizable_layers(path: Path, precision: str) -> dict[str, int]:
    """Ops with a constant weight (MatMul; with int8 also embedding Gathers and the fused Attention and
    EmbedLayerNormalization), each with its weight's element count: what keeping it in float costs,
    in size and (for a MatMul) in multiply-adds per token. int4 (MatMulNBits) takes MatMuls only."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    # A MatMul weight of more than two dimensions (the experts of a mixture, stacked: Llama 4) is no
    # layer onnxruntime's quantizers take: its per-channel zero points fail when the graph runs.
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer if len(i.dims) <= 2}
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


def run(config: QuantizeStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    """Three modes: formulations (every int8 form, timed), a fixed plan (all-low or a plan file), or
    the search for the smallest set of layers to keep in float."""
    assert model.onnx_path is not None
    if config.formulations is not None:
        found = _formulations(config, model, ctx)
        tried = cast(FormulationDecisions, found.decisions)["formulations"]
        if config.precision == "int8" or any(r.get("gate_passed") for r in tried):
            return found
        # No whole-model int8 formulation holds the gate: keep the sensitive layers in float instead.
        ctx.console.print("quantize: no int8 formulation held the gate; searching mixed plans")
        planned = _plans(config, model, ctx)
        return dataclasses.replace(planned, decisions={**planned.decisions, "tried_formulations": tried})
    return _plans(config, model, ctx)


def _plans(config: QuantizeStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    """A fixed plan (all-low or a plan file), or the search for the fewest layers kept in float."""
    model = _preprocess(model, ctx, config.quantizer)
    assert model.onnx_path is not None
    costs = quantizable_layers(model.onnx_path, config.low)
    if not costs:
        raise UsageError(f"quantize: {model.onnx_path.name} has no MatMul with constant weights to quantize")

    def make(source: ModelHandle, plan: dict[str, str], out: Path) -> ModelHandle:
        return build(config, source, plan, out, ctx)

    trials = Trials(config, make, model, ctx, list(costs))
    if config.plan or config.precision != "auto":
        return fixed(trials)
    return search(trials, costs)


def _formulations(config: QuantizeStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    from optimize.stages.quantize_formulations import for_cpu, search

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

    # `auto` also measures the float model on OpenVINO: OpenVINO users' file where no int8 one beats it.
    float_on = [float_engine()] if config.formulations == "auto" and openvino_available() else []
    result = search(methods, model, ctx, make, config.min_speedup, config.min_gain, float_on)
    plan = plans.get(result.model.onnx_path, {}) if result.model.onnx_path else {}
    return dataclasses.replace(result, precision_plan=plan)
