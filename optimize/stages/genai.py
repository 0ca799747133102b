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
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import ClassVar, Literal, TypedDict, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimize import costs, tasks
from optimize.errors import DependencyError, ResourceError, UsageError
from optimize.formats import genai_prequantized as prequantize
from optimize.models import memory, routes
from optimize.models.checkpoint import read_config
from optimize.models.handle import ModelHandle
from optimize.runtime import Tokenizer
from optimize.runtime.generation import Sampling, open_engine
from optimize.runtime.manifest import GateResult, JsonObject, RuntimeSettings
from optimize.stages.base import Choice, StageBase, StageContext, StageResult

# What the builder prints when an allocation fails (Python, C++, onnxruntime's arena)
OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "Failed to allocate memory", "bad allocation")

# The checkpoint's own tokenizer and config replace what the builder re-saves, so the reference and
# every candidate tokenize alike (a re-saved tokenizer may add a BOS token).
KEPT = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Literal["fp32", "int8", "int4"]
    block_size: int = Field(32, description="int4/int8: weights per quantization block (16-256)")
    accuracy_level: Literal[1, 2, 3, 4] = Field(4, description="int4/int8 activations: 4 int8, 3 bf16, 1 fp32")
    algorithm: Literal["default", "rtn", "k_quant", "minmax"] = Field(
        "default",
        description="int4: the builder's (default, rtn, k_quant), or minmax (optimize/formats/minmax.py: each block's "
        "own scale and float minimum; exact for weights dequantized from a Q4_1 GGUF)",
    )
    symmetric: bool = Field(True, description="int4/int8: signed weights around zero, or unsigned with a zero point")
    int8: list[Literal["last_matmul", "mixed_layers"]] = Field(
        default_factory=list,
        description="int4: MatMul groups kept at int8 (the LM head; llama.cpp's most sensitive layers)",
    )

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value not in (16, 32, 64, 128, 256):
            raise ValueError("block_size: one of 16, 32, 64, 128, 256")
        return value

    def label(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        kept = f", {'+'.join(self.int8)} int8" if self.int8 else ""
        asymmetric = " asym" if not self.symmetric else ""
        return f"{self.precision} {self.algorithm}{asymmetric} b{self.block_size} a{self.accuracy_level}{kept}"

    def prequantized(self, target: str) -> bool:
        """Quantized here a tensor at a time and handed to the builder so (optimize/formats/genai_prequantized.py):
        the builder's own default int4 (symmetric, its default), computed alike, in a fraction of
        its memory."""
        default_int4 = self.precision == "int4" and self.algorithm == "default" and self.symmetric and not self.int8
        return target == "cpu" and default_int4

    def builder_options(self) -> list[str]:
        if self.precision == "fp32" or self.algorithm == "minmax":  # minmax rewrites the fp32 build
            return []
        options = [
            f"block_size={self.block_size}",
            f"accuracy_level={self.accuracy_level}",
            f"algo_config={self.algorithm}",
            f"is_symmetric={str(self.symmetric).lower()}",
        ]
        if self.int8 and self.precision == "int4":
            options.append("matmul_mixed_precision=" + ",".join(f"{group}:int8" for group in self.int8))
        if self.precision == "int8":
            # onnxruntime-genai 0.15's builder writes an int8 graph that does not load when the
            # embedding and LM head share their weights (a tied model): keep them apart.
            options.append("shared_embeddings=false")
        return options


class Tried(GateResult):
    """One candidate the builder made, with its gate (passed, source, checks)."""

    candidate: JsonObject  # the candidate's fields
    label: str
    metrics: dict[str, float]
    reconstruction: dict[str, float]  # minmax: the requantized weights' errors (else empty)


class FormatTried(GateResult):
    """One precision of another format, measured through that format's own loader."""

    format: str
    bits: int
    metrics: dict[str, float]
    limits: list[str]  # what its target engines refuse or run slowly
    loader: str  # what measured it, with its version
    written: JsonObject  # what the writer records of the file (its config, tensor types)


# The formats written beside the onnxruntime-genai folder: the module that writes one (its `BITS`,
# tried smallest first, `write(checkpoint, out, bits)`, `problem(checkpoint)` and `loader()`) and the
# engine its folder is for (`artifact.ENGINE_FILES` names the folder).
FORMATS = {
    "compressed-tensors": ("optimize.formats.compressed_tensors", "compressed-tensors"),  # vLLM, SGLang
    "gguf": ("optimize.formats.gguf", "llama.cpp"),  # llama.cpp, Ollama, LM Studio
    "openvino-genai": ("optimize.formats.openvino_genai", "openvino-genai"),  # OpenVINO GenAI, optimum-intel
}


class _Decided(TypedDict):
    candidates: list[Tried]
    chosen: str
    builder: str  # onnxruntime-genai's version


class Decisions(_Decided, total=False):
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
    formats: list[Literal["compressed-tensors", "gguf", "openvino-genai"]] = Field(
        [],
        description="other formats to ship beside the onnxruntime-genai folder, each at the smallest precision "
        "whose gate holds through its own loader: compressed-tensors (vLLM, SGLang), gguf (llama.cpp, Ollama), "
        "openvino-genai (OpenVINO GenAI's LLMPipeline)",
    )

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

    def check_input(self, model: ModelHandle, base_dir: Path) -> None:
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
            found = _writer(name).problem(model.checkpoint)
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
        decided = cast(Decisions, details)
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


def build(checkpoint: Path, out: Path, candidate: Candidate, target: str, cache: Path) -> dict[str, float]:
    """The builder in a subprocess (it reads sys.argv and writes progress bars); its log kept on failure.
    The default int4 is quantized here first and read by the builder as already quantized (its
    peak memory drops from 4.5x the bf16 checkpoint to about 1.2x); a minmax candidate is built in
    fp32 and then requantized; returns its reconstruction errors."""
    minmax = candidate.algorithm == "minmax"
    source = checkpoint
    if candidate.prequantized(target) and prequantize.applies(checkpoint, candidate.block_size):
        source = out.with_name(out.name + "-input")
        with costs.step(f"quantize {candidate.label()} for the builder"):
            prequantize.write(checkpoint, source, candidate.block_size)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out)]
    command += ["-p", "fp32" if minmax else candidate.precision, "-e", target, "-c", str(cache)]
    options = candidate.builder_options()
    if options:
        command += ["--extra_options", *options]
    returncode, log, seconds = _builder(command, out.with_name(out.name + "-builder.log"))
    if returncode < 0:  # killed by a signal: the kernel's out-of-memory killer, most often
        name = signal.Signals(-returncode).name
        raise ResourceError(
            f"onnxruntime-genai's model builder was killed by {name} after {seconds:.0f} s "
            f"building {candidate.label()}"
            + (": on Linux that is most often the out-of-memory killer (see `dmesg`); " if name == "SIGKILL" else "; ")
            + f"{memory.available_mb() / 1024:.1f} GiB is available now. Try a machine with more memory"
        )
    if returncode != 0 or not (out / "genai_config.json").is_file():
        last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "(no output)")
        said = f"onnxruntime-genai {routes.builder_version()}'s model builder failed for {candidate.label()}: {last}"
        if any(sign in log for sign in OUT_OF_MEMORY):
            raise ResourceError(f"{said}. It ran out of memory: try a machine with more memory")
        raise DependencyError(f"{said}. `kind: compile` (our own ONNX export) is a route for every decoder")
    for name in KEPT:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    if source != checkpoint:
        shutil.rmtree(source)
        prequantize.drop_zero_points(out / "model.onnx")
    if not minmax:
        return {}
    from optimize.formats.minmax import requantize

    return requantize(out / "model.onnx", candidate.accuracy_level, "last_matmul" in candidate.int8)


def _builder(command: list[str], log_path: Path) -> tuple[int, str, float]:
    """The builder run to its end: (exit status, negative for a signal; its output; seconds). Its
    own peak memory goes into the run's costs."""
    start = time.perf_counter()
    with log_path.open("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            status, peak_mb = costs.wait(proc.pid)
        except BaseException:  # Ctrl-C or a timeout here: the builder goes too
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        seconds = time.perf_counter() - start
        costs.worker("onnxruntime-genai model builder", seconds, peak_mb)
        log.seek(0)
        return proc.returncode, log.read(), seconds


def run(config: GenAIStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    tried: list[Tried] = []
    passing: list[tuple[float, int, ModelHandle]] = []
    for index, candidate in enumerate(config.candidates):
        out = ctx.workdir / f"candidate-{index}"
        with ctx.console.status(f"genai: building {candidate.label()}"):
            errors = build(model.checkpoint, out, candidate, config.target, ctx.workdir / "builder-cache")
        handle = ModelHandle(out, model.task, onnx_path=out / "model.onnx", engine="onnxruntime-genai")
        metrics, gate = ctx.judge(handle)
        label = candidate.label()
        tried.append(
            Tried(candidate=candidate.model_dump(), label=label, metrics=metrics, reconstruction=errors, **gate)
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
    decisions: Decisions = {"candidates": tried, "chosen": chosen_label, "builder": builder_version()}
    runtime: RuntimeSettings = {
        "engine": "onnxruntime-genai",
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
            found = _format(name, model, ctx, decisions["formats"])
            if found is not None:
                alternates[found[0].engine], judged[found[0].engine] = found[0], found[1:]
    engines = {"onnxruntime-genai": handle.checkpoint}
    engines |= {
        name: alternates[name].checkpoint
        for name, module in GENERATES_HERE.items()
        if name in alternates and importlib.util.find_spec(module) is not None
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
    return StageResult(handle, decisions, runtime=runtime, advice=advice, alternates=alternates, judged=judged)


# The other formats' engines the runtime generates with (the Python module each needs), timed against
# onnxruntime-genai's folder where installed.
GENERATES_HERE = {"openvino-genai": "openvino_genai", "llama.cpp": "llama_cpp"}
REQUEST_PROMPT, REQUEST_TOKENS, REQUEST_ROUNDS = 128, 48, 3


class EngineSpeed(TypedDict):
    ttft_ms: float  # the prompt to the first token
    decode_tok_s: float  # the tokens after it
    request_ms: float  # the whole request: what orders the engines


def engine_speeds(folders: dict[str, Path], prompt: str) -> dict[str, EngineSpeed]:
    """One greedy request (the first REQUEST_PROMPT tokens of `prompt`, then REQUEST_TOKENS new
    ones) on each engine through the runtime's own engine classes: time to the first token, decode
    speed after it, and the whole request, each the median of REQUEST_ROUNDS rounds taken in turns,
    so the machine's drift falls on all alike. Engines differ in both (onnxruntime-genai's int4
    prefill on AVX2 is several times OpenVINO's), so the request, not decode alone, decides."""
    from statistics import median

    from optimize.evaluate.measure import threads

    ids = Tokenizer(next(iter(folders.values())) / "tokenizer.json", 4096).ids(prompt, special=True)
    # a chat turn's length, within the smallest context (llama.cpp refuses more), cut mid-sentence so
    # that no engine is done at once (each stops at the end-of-sequence token its model has)
    ids = ids[:REQUEST_PROMPT]
    opened = {name: open_engine(name, folder, threads()) for name, folder in folders.items()}
    sampling = Sampling(max_new_tokens=REQUEST_TOKENS)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in opened}  # (ttft s, tok/s)
    for round_ in range(REQUEST_ROUNDS + 1):  # the first round warms each engine up, untimed
        for name, engine in opened.items():
            start = time.perf_counter()
            stream = engine.tokens(ids, sampling, set())
            if next(stream, None) is None:  # done at once: nothing to time this round
                continue
            first = time.perf_counter()
            count = sum(1 for _ in itertools.islice(stream, REQUEST_TOKENS - 1))
            if round_ and count:
                rounds[name].append((first - start, count / (time.perf_counter() - first)))
    speeds: dict[str, EngineSpeed] = {}
    for name, rows in rounds.items():  # an engine that never got past one token is left out (last)
        if rows:
            ttft, rate = median(r[0] for r in rows), median(r[1] for r in rows)
            # a request of exactly REQUEST_TOKENS at the measured rates, wherever an engine stopped early
            whole = ttft + (REQUEST_TOKENS - 1) / rate
            speeds[name] = {
                "ttft_ms": round(ttft * 1000, 1),
                "decode_tok_s": round(rate, 2),
                "request_ms": round(whole * 1000, 1),
            }
    return speeds


def _writer(name: str) -> types.ModuleType:
    return importlib.import_module(FORMATS[name][0])


def _format(
    name: str, model: ModelHandle, ctx: StageContext, tried: list[FormatTried]
) -> tuple[ModelHandle, dict[str, float], GateResult] | None:
    """`name` at the smallest precision whose gate holds, measured as its loader reads it
    (compressed-tensors: transformers, which decompresses it on the CPU; gguf: llama.cpp); every
    attempt recorded; None when none holds (reported, not shipped)."""
    writer, engine = _writer(name), FORMATS[name][1]
    for bits in writer.BITS:
        out = ctx.workdir / f"{name}-int{bits}"
        with ctx.console.status(f"genai: writing {name} int{bits}"):
            written = writer.write(model.checkpoint, out, bits)
        handle = ModelHandle(out, model.task, engine=engine)
        metrics, gate = ctx.judge(handle)
        listed = written.pop("limits", [])
        limits = [str(line) for line in listed] if isinstance(listed, list) else []
        tried.append(
            FormatTried(
                format=name, bits=bits, metrics=metrics, limits=limits, loader=writer.loader(), written=written, **gate
            )
        )
        shown = ", ".join(f"{c['metric']} {c['value']}" for c in gate.get("checks", []))
        ctx.console.print(f"genai: {name} int{bits}: {shown}: gate {'passed' if gate['passed'] else 'failed'}")
        if gate["passed"]:
            return handle, metrics, gate
    ctx.console.print(f"genai: {name} did not hold the gate at int{' or int'.join(map(str, writer.BITS))}: not shipped")
    return None


def builder_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("onnxruntime-genai-cuda", "onnxruntime-genai"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "missing"
