"""The genai stage: build a decoder LM into an onnxruntime-genai model folder with its model builder,
searching the precisions it offers against the stage's gate.

The builder makes the graph an engine runs fast (grouped-query attention with rotary embedding
fused, a KV cache updated in place, MatMulNBits int4/int8 weights with int8 activations at accuracy
level 4, a quantized LM head shared with the embedding when the model ties them) and writes
`genai_config.json`; the runtime then generates through onnxruntime-genai's C++ loop. Candidates are
tried in order (cheapest first, as written) and the first whose gate holds is kept, or, with
`pick: fastest`, every candidate is measured and the fastest passing one is kept. Every candidate's
metrics and verdict are recorded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal, TypedDict, cast

from pydantic import Field

from optimize import tasks
from optimize.errors import DependencyError, UsageError
from optimize.formats.int4 import Int4Method
from optimize.formats.llama_cpp import GgufType
from optimize.formats.table import FORMATS, FormatName
from optimize.models import routes
from optimize.models.checkpoint import read_config
from optimize.models.handle import ModelHandle
from optimize.runtime.engines import ENGINES, GENERATING
from optimize.runtime.manifest import GateResult, JsonObject, RuntimeSettings
from optimize.stages.base import Choice, StageBase, StageContext, StageResult
from optimize.stages.genai_build import ENGINE, Candidate, CandidateTried, build, builder_version
from optimize.stages.genai_formats import EngineSpeed, FormatTried, engine_speeds, write_format

# bench/scale.py, quantized here first, the reference kept in bf16: the largest process peaked at
# 1,693 MB for 0.33B (636 MB bf16), 3,357 for 1.04B (1,992), 6,358 for 2.77B (5,280) and 14,906
# for 7.18B (13,697), the model builder's but in the last (the reference's; the builder's 12,752),
# while this process held about 600 MB beside the builder. 2,150 + 0.95 x holds them all, by 256 MB
# at 7.18B, but had fallen 107 MB short there while the reference kept a buffer per weight shape
# (15,269), and a vocabulary of 128k (Llama 3) adds logits these random Llamas (49k) do not have:
# a slope of 1, 941 MB above the 7.18B peak.
PREQUANTIZED_PEAK = (2150.0, 1.0)
# The builder's own quantization, from the float checkpoint: 0.33B (636 MB bf16) peaked at 3,563 MB,
# 1.04B (1,992 MB) at 9,706 MB, the builder's peak both times (a 2.77B one was killed at 23,761 MB).
BUILDER_PEAK = (682.0, 4.53)


class _Decided(TypedDict):
    candidates: list[CandidateTried]
    chosen: str
    builder: str  # onnxruntime-genai's version


class GenAIDecisions(_Decided, total=False):
    formats: list[FormatTried]  # every precision tried of each other format, smallest first
    engine_speed: dict[str, EngineSpeed]  # each decoder engine's time for one request, timed in turns


class GenAIStage(StageBase):
    order: ClassVar[int] = 2
    repeatable: ClassVar[bool] = False
    needs_onnx: ClassVar[bool] = False  # the builder reads the checkpoint itself

    kind: Literal["genai"] = "genai"
    target: Literal["cpu", "cuda"] = Field("cpu", description="the execution provider the graph is built for")
    candidates: list[Candidate] = Field(
        default_factory=lambda: [Candidate(precision="int4")], min_length=1, description="tried in order"
    )
    pick: Literal["first", "fastest"] = Field("first", description="the first passing candidate, or the fastest")
    formats: list[FormatName] = Field(
        [],
        description="other formats to ship beside the onnxruntime-genai folder, each at the smallest precision "
        "whose gate holds through its own loader: compressed-tensors (vLLM, SGLang), gguf (llama.cpp, Ollama), "
        "openvino-genai (OpenVINO GenAI's LLMPipeline)",
    )
    int4_methods: list[Int4Method] = Field(
        ["gptq"],
        min_length=1,
        description="compressed-tensors' symmetric int4, tried in this order before int8 (optimize/formats/int4.py): "
        "gptq (AWQ's activation scales, then GPTQ's error-carrying rounding over the calibration texts), awq (the "
        "scales, then the nearest step) or rtn (the nearest step of each group's absmax, no calibration)",
    )
    gguf_types: list[GgufType] = Field(
        ["Q4_K_M", "Q8_0"],
        min_length=1,
        description="gguf of a checkpoint that did not come as a GGUF: llama.cpp's quantization types to try, "
        "smallest first, each weighted by an importance matrix of the calibration texts (a model read from a "
        "GGUF is written back on its own grid, int4 then int8)",
    )

    def requested(self, name: FormatName) -> list[str]:
        """What the recipe asks of a format's levels: gguf's llama.cpp types, compressed-tensors' int4 methods."""
        asked: dict[str, list[str]] = {"gguf": list(self.gguf_types), "compressed-tensors": list(self.int4_methods)}
        return asked.get(name, [])

    def peak_memory(self) -> tuple[float, float]:
        # bench/scale.py here (one-stage int4 recipe, --no-cache, /usr/bin/time -v, random Llamas):
        # quantized here first (optimize/formats/genai_prequantized.py), PREQUANTIZED_PEAK; else BUILDER_PEAK.
        return PREQUANTIZED_PEAK if self._all_prequantized() else BUILDER_PEAK

    def _all_prequantized(self) -> bool:
        return all(c.prequantized(self.target) for c in self.candidates)

    def scratch_disk(self) -> float:
        # A candidate's build beside the pre-quantized checkpoint it reads (removed after): 0.33B
        # (636 MB bf16) 204 + 269 MB, 0.74x; 7.18B (13,697) 4,283 + 4,649, 0.65x (bench/scale.py's
        # Llamas). A build the builder quantizes itself writes only its graph.
        return 0.8

    def lower_memory(self) -> str:
        if self._all_prequantized():
            return ""
        base, per_mb = PREQUANTIZED_PEAK
        return (
            "The builder quantizes all but the default int4 candidate from an fp32 copy of the model; with "
            "candidates: [{precision: int4}] alone (quantized here a tensor at a time) it needs about "
            f"{base:,.0f} MB + {per_mb} x the bf16 checkpoint. "
        )

    def check_input(self, model: ModelHandle, base_dir: Path, calibration: Sequence[str] = ()) -> None:
        if model.task != tasks.GENERATION:
            raise UsageError(f"genai: builds decoder LMs (text-generation), not {model.task} models")
        if model.is_onnx or not any(model.checkpoint.glob("*.safetensors")):
            raise UsageError(
                f"genai: the model builder reads a checkpoint with safetensors; {model.checkpoint} has none"
            )
        architectures = read_config(model.checkpoint).get("architectures")
        if not architectures or not isinstance(architectures, list):  # what the builder picks its graph by
            raise UsageError(
                f'genai: {model.checkpoint / "config.json"} names no `architectures` (e.g. ["LlamaForCausalLM"]), '
                "which the model builder chooses its graph by; save the checkpoint with save_pretrained"
            )
        refused = routes.builder_refusal(str(architectures[0]))
        if refused:
            raise UsageError(refused)
        for name in self.formats:
            found = FORMATS[name].problem(model.checkpoint, calibration)
            if found:
                raise UsageError(found)

    def problems(self, target: str) -> list[tuple[tuple[str | int, ...], str]]:
        found: list[tuple[tuple[str | int, ...], str]] = [
            (("candidates", i, "int8"), "int8 groups apply to int4 candidates only")
            for i, c in enumerate(self.candidates)
            if c.int8 and c.precision != "int4"
        ]
        for i, c in enumerate(self.candidates):
            if c.algorithm == "minmax" and (c.precision != "int4" or c.block_size != 32 or "mixed_layers" in c.int8):
                found.append((("candidates", i), "minmax is int4 with blocks of 32 (int8: only last_matmul)"))
        return found

    @classmethod
    def choices(cls, details: JsonObject) -> list[Choice]:
        decided = cast(GenAIDecisions, details)
        return [
            Choice(
                label=str(row["label"]),
                outcome=", ".join(f"{c['metric']} {c['value']}" for c in row.get("checks", []))
                + (": gate passed" if row["passed"] else ": gate failed"),
                passed=bool(row["passed"]),
                chosen=row["label"] == decided.get("chosen"),
                latency_ms=row.get("metrics", {}).get("latency_p50_ms"),
                fidelity=row.get("metrics", {}).get("cosine_mean"),
            )
            for row in decided.get("candidates", [])
        ]

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def run(config: GenAIStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    tried: list[CandidateTried] = []
    passing: list[tuple[float, int, ModelHandle]] = []
    for index, candidate in enumerate(config.candidates):
        out = ctx.workdir / f"candidate-{index}"
        with ctx.console.status(f"genai: building {candidate.label()}"):
            errors = build(
                model.checkpoint, out, candidate, config.target, ctx.workdir / "builder-cache", ctx.calibration_texts
            )
        handle = ModelHandle(out, model.task, onnx_path=out / "model.onnx", engine=ENGINE)
        try:
            metrics, gate = ctx.judge(handle)
        except RuntimeError as exc:  # the runtime's: onnxruntime refused the graph the builder wrote
            raise DependencyError(
                f"onnxruntime-genai {builder_version()}'s model builder wrote a graph for {candidate.label()} that "
                f"does not load: {exc}"
            ) from None
        label = candidate.label()
        tried.append(
            CandidateTried(
                candidate=candidate.model_dump(), label=label, metrics=metrics, reconstruction=errors, **gate
            )
        )
        shown = ", ".join(f"{c['metric']} {c['value']}" for c in gate.get("checks", []))
        ctx.console.print(f"genai: {candidate.label()}: {shown}: gate {'passed' if gate['passed'] else 'failed'}")
        if gate["passed"]:
            passing.append((metrics.get("latency_p50_ms", 0.0), index, handle))
            if config.pick == "first":
                break
    if passing:
        _, chosen, handle = min(passing) if config.pick == "fastest" else passing[0]
    else:  # none held: hand on the last (`handle`), whose gate the pipeline then reports as failed
        chosen = len(config.candidates) - 1
    genai_config = json.loads((handle.checkpoint / "genai_config.json").read_text())
    chosen_label = config.candidates[chosen].label()
    decisions: GenAIDecisions = {"candidates": tried, "chosen": chosen_label, "builder": builder_version()}
    runtime: RuntimeSettings = {
        "engine": ENGINE,
        "target": config.target,
        "context_length": genai_config["model"].get("context_length"),
    }
    advice = (
        None
        if passing
        else "add candidates that keep more at int8 (int8: [last_matmul, mixed_layers]) or precision int8"
    )
    alternates: dict[str, ModelHandle] = {}
    judged: dict[str, tuple[dict[str, float], GateResult]] = {}
    if passing and config.formats:
        decisions["formats"] = []
        for name in config.formats:
            found = write_format(name, model, ctx, decisions["formats"], config.requested(name))
            if found is not None:
                alternates[found[0].engine], judged[found[0].engine] = found[0], found[1:]
    _order_engines(handle, alternates, ctx, decisions, runtime)
    return StageResult(handle, decisions, runtime=runtime, advice=advice, alternates=alternates, judged=judged)


def _order_engines(
    handle: ModelHandle,
    alternates: dict[str, ModelHandle],
    ctx: StageContext,
    decisions: GenAIDecisions,
    runtime: RuntimeSettings,
) -> None:
    """One request timed on the builder's folder and each other format's engine that generates here,
    in turns: the runtime generates with the fastest (`runtime.generators`, recorded in `decisions`)."""
    engines = {ENGINE: handle.checkpoint}
    engines |= {  # the other formats' engines that generate here, timed against the builder's folder
        name: handle.checkpoint
        for name, handle in alternates.items()
        if name in GENERATING and importlib.util.find_spec(str(ENGINES[name].module)) is not None
    }
    timed = {}
    if len(engines) > 1:  # the fastest first: what the runtime generates with where it is installed
        with ctx.console.status("genai: timing a request on each engine, in turns"):
            timed = engine_speeds(engines, " ".join(ctx.calibration_texts) or "The capital of France is")
    if timed:
        decisions["engine_speed"] = timed
        runtime["generators"] = sorted(timed, key=lambda name: timed[name]["request_ms"])
        shown = ", ".join(
            f"{name} {row['request_ms']} ms (first token {row['ttft_ms']} ms, then {row['decode_tok_s']} tok/s)"
            for name, row in timed.items()
        )
        ctx.console.print(f"genai: one request: {shown}: the runtime generates with {runtime['generators'][0]}")
