"""The compile stage: an ONNX graph optimized offline for a target, chosen by measuring.

Target `cpu`: candidate graphs are built and measured in this run: the input as it is, ONNX
Runtime's basic and extended offline optimizations, and onnxruntime.transformers' fusions
(Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization; they fire on exports made
with eager attention). A candidate must agree with the input (sentence cosine >= `agreement` on
held-out texts); those that agree are timed in turns (interleaved rounds, batch 1) and the fastest
is kept, and every candidate is recorded. Fusions are not
assumed to help: on a 2-core CPU the fused fp32 MiniLM was not faster, so they must win on time.
The choice depends on measured time; a recipe that pins `variants: [basic]` is byte-reproducible.

Targets `cuda` and `tensorrt`: offline optimizations beyond `basic` are tied to the provider that
made them (onnxruntime's documentation), so the graph gets the basic level only, then becomes a
strongly typed fp16 graph where the gate allows it (`stages/fp16.py`: TensorRT 10/11 take precision
from the graph, not from builder flags); the runtime's provider options carry the TensorRT engine and
timing caches. Measured here on the CPU; speed on the GPU is not claimed (`bench/gpu_check.py`).

A model for the `openvino` engine (quantize's `openvino` method) is kept as it is: OpenVINO
compiles the graph itself when it loads it, and onnxruntime's offline graphs hold ops it cannot read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar, Literal, TypedDict, cast

import numpy as np
from pydantic import Field

from optimize import tasks
from optimize.errors import GateFailed
from optimize.models.checkpoint import read_config
from optimize.models.handle import ModelHandle
from optimize.runtime.engines import DEFAULT_ENGINE
from optimize.runtime.manifest import JsonObject
from optimize.stages.base import Choice, StageBase, StageContext, StageResult

Variant = Literal["as-is", "basic", "extended", "fused"]


class VariantTried(TypedDict, total=False):
    """One candidate graph as the decisions record it."""

    variant: str
    fused: dict[str, int]  # operator -> fusions made ("fused")
    error: str  # the variant could not be built for this graph
    agreement_cosine_min: float  # against the stage's input model
    agrees: bool
    latency_p50_ms: float  # timed in turns with the others that agree


class CompileDecisions(TypedDict, total=False):
    variant: str  # the one chosen
    candidates: list[VariantTried]
    why: str


class CompileStage(StageBase):
    order: ClassVar[int] = 2
    repeatable: ClassVar[bool] = False
    keeps_alternates: ClassVar[bool] = True

    kind: Literal["compile"] = "compile"
    target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    variants: list[Variant] = Field(
        ["as-is", "basic", "extended", "fused"], min_length=1, description="candidate graphs to measure on cpu"
    )
    agreement: float = Field(0.999, gt=0, le=1, description="min sentence cosine vs the input model")
    fp16: bool = Field(True, description="cuda/tensorrt: an fp16 graph (norms kept fp32) where the gate holds")
    min_speedup: float = Field(0.05, ge=0, description="a later variant must be this much faster to be kept")

    @classmethod
    def choices(cls, details: JsonObject) -> list[Choice]:
        decided = cast(CompileDecisions, details)

        def outcome(row: VariantTried) -> str:
            if row.get("error"):
                return f"error: {str(row['error'])[:60]}"
            if "latency_p50_ms" in row:
                return f"latency {row['latency_p50_ms']} ms, agrees (cosine_min {row['agreement_cosine_min']})"
            return f"disagrees with its input (cosine_min {row.get('agreement_cosine_min')})"

        return [
            Choice(
                label=str(row["variant"]),
                outcome=outcome(row),
                passed=bool(row.get("agrees")),
                chosen=row["variant"] == decided.get("variant"),
                latency_ms=row.get("latency_p50_ms"),
                fidelity=row.get("agreement_cosine_min"),
            )
            for row in decided.get("candidates", [])
        ]

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def _optimize(source: Path, out: Path, level: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def fuse(source: Path, out: Path, checkpoint: Path) -> dict[str, int]:
    """onnxruntime.transformers' fusions (Attention, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization) for the model type in config.json; returns the fused-op counts."""

    from onnxruntime.transformers import optimizer

    config = read_config(checkpoint)
    model_type = config.get("model_type", "bert")
    if model_type not in optimizer.MODEL_TYPES:
        raise ValueError(f"onnxruntime has no transformer fusions for model type {model_type!r}")
    fused = optimizer.optimize_model(
        str(source),
        model_type=model_type,
        num_heads=config.get("num_attention_heads", 0),
        hidden_size=config.get("hidden_size", 0),
        opt_level=1,
        use_gpu=False,
    )
    fused.save_model_to_file(str(out))
    return {k: v for k, v in fused.get_fused_operator_statistics().items() if v}


def build(variant: str, model: ModelHandle, out: Path) -> dict[str, int]:
    """Write `variant` of the model to `out`; returns the fusions it made (the "fused" variant)."""
    assert model.onnx_path is not None
    if variant == "as-is":
        shutil.copyfile(model.onnx_path, out)
        return {}
    if variant == "fused":
        return fuse(model.onnx_path, out, model.checkpoint)
    _optimize(model.onnx_path, out, variant)
    return {}


def _outputs(model: ModelHandle, texts: tuple[str, ...], seq_len: int) -> np.ndarray:
    from optimize.evaluate.measure import open_model, outputs

    return outputs(open_model(model, seq_len), model.task, list(texts))


def run(config: CompileStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    if config.target != "cpu":
        from optimize.stages.compile_fp16 import gpu_graph

        out = ctx.workdir / "model.onnx"
        build("basic", model, out)
        return gpu_graph(model, ctx, config.fp16, model.with_onnx(out))
    from optimize.evaluate.measure import fidelity, stepped_logits, time_in_turns

    texts = ctx.calibration_texts[:32]
    reference = _outputs(model, texts, ctx.seq_len)
    # a decoder's graph variants (onnxruntime's: another engine's model is kept as it is) are also
    # checked as generation feeds them
    checks_steps = model.task == tasks.GENERATION and model.engine == DEFAULT_ENGINE
    stepped = stepped_logits(model, ctx.seq_len) if checks_steps else np.empty(0)
    tried: list[VariantTried] = []
    agreeing: list[tuple[VariantTried, ModelHandle]] = []
    variants = config.variants if model.engine == DEFAULT_ENGINE else ["as-is"]
    for variant in dict.fromkeys(variants):
        out = ctx.workdir / f"{variant}.onnx"
        record: VariantTried = {"variant": variant}
        tried.append(record)
        candidate = model.with_onnx(out)
        try:
            fused = build(variant, model, out)
            agreement = fidelity(_outputs(candidate, texts, ctx.seq_len), reference)["cosine_min"]
            if checks_steps:  # and as generation runs it, through its cache
                agreement = min(agreement, fidelity(stepped_logits(candidate, ctx.seq_len), stepped)["cosine_min"])
        except Exception as exc:  # a fusion that does not apply to this graph is a candidate that failed
            record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        if fused:
            record["fused"] = fused
        record["agreement_cosine_min"], record["agrees"] = agreement, agreement >= config.agreement
        if agreement >= config.agreement:
            agreeing.append((record, candidate))
    # The candidates are timed in turns (one after another, for several rounds), so a slow spell of
    # the machine does not pick the winner. Earlier (simpler) variants win ties: a later one must beat
    # the best by `min_speedup`. Pin `variants` for byte-identical releases.
    best: tuple[float, ModelHandle, str] | None = None
    timings = time_in_turns([c for _, c in agreeing], ctx.calibration_texts, ctx.seq_len) if agreeing else []
    for (record, candidate), ms in zip(agreeing, timings, strict=True):
        record["latency_p50_ms"] = ms
        if best is None or ms < best[0] * (1 - config.min_speedup):
            best = (ms, candidate, record["variant"])
    if best is None:
        raise GateFailed(
            "compile: no candidate graph agreed with the input model: "
            + "; ".join(f"{t['variant']}: {t.get('error') or t.get('agreement_cosine_min')}" for t in tried),
            details={"candidates": tried},
        )
    from optimize import cpu

    tuned_on = cpu.current().summary()  # the variant was chosen by timing on this CPU
    decisions: CompileDecisions = {"variant": best[2], "candidates": tried}
    if model.engine != DEFAULT_ENGINE:
        decisions["why"] = f"the {model.engine} engine compiles the graph when it loads it: kept as it is"
    return StageResult(best[1], decisions, runtime={"tuned_on": tuned_on})
