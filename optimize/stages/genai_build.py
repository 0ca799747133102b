"""onnxruntime-genai's model builder, run for one candidate (a precision and its options) in a
subprocess whose memory is watched, or handed weights quantized here (`formats.genai_prequantized`,
`formats.minmax`); what it prints when it fails is reported as a dependency failing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimize import costs
from optimize.errors import DependencyError, ResourceError, UsageError
from optimize.formats import genai_prequantized as prequantize
from optimize.formats import int4
from optimize.models import memory, routes
from optimize.models.checkpoint import CONFIG, TOKENIZER, copy_present
from optimize.runtime.engines import BUILDER
from optimize.runtime.manifest import GateResult, JsonObject

ENGINE = BUILDER  # what runs the folder the builder writes
CALIBRATED = ("gptq", "awq")  # int4 rounded here over the calibration texts (formats/int4.py)
# What the builder prints when an allocation fails (Python, C++, onnxruntime's arena)
OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "Failed to allocate memory", "bad allocation")


# The checkpoint's own tokenizer and config replace what the builder re-saves, so the reference and
# every candidate tokenize alike (a re-saved tokenizer may add a BOS token).
KEPT = (*CONFIG, *TOKENIZER)


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Literal["fp32", "int8", "int4"]
    block_size: int = Field(32, description="int4/int8: weights per quantization block (16-256)")
    accuracy_level: Literal[1, 2, 3, 4] = Field(4, description="int4/int8 activations: 4 int8, 3 bf16, 1 fp32")
    algorithm: Literal["default", "rtn", "k_quant", "minmax", "gptq", "awq"] = Field(
        "default",
        description="int4: the builder's (default, rtn, k_quant); minmax (optimize/formats/minmax.py: each block's "
        "own scale and float minimum; exact for weights dequantized from a Q4_1 GGUF); or gptq / awq over the "
        "recipe's calibration texts (optimize/formats/int4.py), symmetric, handed to the builder as quantized",
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
        """Quantized here and handed to the builder so (optimize/formats/genai_prequantized.py): the
        builder's own default int4 (symmetric, its default), computed alike a tensor at a time in a
        fraction of its memory; gptq and awq, which the builder does not have."""
        default_int4 = self.precision == "int4" and self.algorithm == "default" and self.symmetric and not self.int8
        return (target == "cpu" and default_int4) or self.calibrated()

    def calibrated(self) -> bool:
        """Rounded here over the calibration texts (`CALIBRATED`)."""
        return self.precision == "int4" and self.algorithm in CALIBRATED

    def builder_options(self) -> list[str]:
        if self.precision == "fp32" or self.algorithm == "minmax":  # minmax rewrites the fp32 build
            return []
        options = [
            f"block_size={self.block_size}",
            f"accuracy_level={self.accuracy_level}",
            f"algo_config={'default' if self.calibrated() else self.algorithm}",  # calibrated: read as quantized
            f"is_symmetric={str(self.symmetric).lower()}",
        ]
        if self.int8 and self.precision == "int4":
            options.append("matmul_mixed_precision=" + ",".join(f"{group}:int8" for group in self.int8))
        if self.precision == "int8" or "last_matmul" in self.int8:
            # onnxruntime-genai's builder (0.15, still 0.18) writes an int8 LM head that does not load
            # when the embedding and LM head share their weights (a tied model): "Node input
            # 'lm_head.MatMul.weight_Q8G64' is not a graph input": keep them apart.
            options.append("shared_embeddings=false")
        return options


class CandidateTried(GateResult):
    """One candidate the builder made, with its gate (passed, source, checks)."""

    candidate: JsonObject  # the candidate's fields
    label: str
    metrics: dict[str, float]
    reconstruction: dict[str, float]  # minmax: the requantized weights' errors (else empty)


def build(
    checkpoint: Path, out: Path, candidate: Candidate, target: str, cache: Path, texts: Sequence[str] = ()
) -> dict[str, float]:
    """The builder in a subprocess (it reads sys.argv and writes progress bars); its log kept on failure.
    The default int4 is quantized here first and read by the builder as already quantized (its
    peak memory drops from 4.5x the bf16 checkpoint to about 1.2x), as are gptq and awq over the
    calibration `texts`; a minmax candidate is built in fp32 and then requantized; returns its
    reconstruction errors."""
    minmax = candidate.algorithm == "minmax"
    source = checkpoint
    if candidate.calibrated():
        source = out.with_name(out.name + "-input")
        with costs.step(f"quantize {candidate.label()} for the builder"):
            _calibrated(checkpoint, source, candidate, texts)
    elif candidate.prequantized(target) and prequantize.applies(checkpoint, candidate.block_size):
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
    copy_present(checkpoint, out, KEPT)
    if source != checkpoint:
        shutil.rmtree(source)
        prequantize.drop_zero_points(out / "model.onnx")
    if not minmax:
        return {}
    from optimize.formats.minmax import requantize

    return requantize(out / "model.onnx", candidate.accuracy_level, "last_matmul" in candidate.int8)


def _calibrated(checkpoint: Path, out: Path, candidate: Candidate, texts: Sequence[str]) -> None:
    """`checkpoint` rounded by the candidate's gptq or awq (`formats.int4`) in the layout the builder
    reads as quantized: the model on the grid in float (with AWQ's scales folded into its norms) in
    a scratch folder, then its codes and scales written as they are."""
    if not prequantize.applies(checkpoint, candidate.block_size):
        raise UsageError(
            f"genai: {candidate.label()}: block_size {candidate.block_size} does not divide every linear layer's "
            "input width of this model (or its weights are not float): try 32"
        )
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train(False)
    names = int4.linears(model)
    scales = int4.round_model(model, names, checkpoint, texts, candidate.algorithm, candidate.block_size)
    rounded = out.with_name(out.name + "-rounded")
    model.save_pretrained(rounded)
    copy_present(checkpoint, rounded, KEPT)
    del model
    try:
        prequantize.write(rounded, out, candidate.block_size, {f"{n}.weight": s.numpy() for n, s in scales.items()})
    finally:
        shutil.rmtree(rounded, ignore_errors=True)


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


def builder_version() -> str:
    """The builder's distribution and version, as the manifest records it."""
    release = routes.builder_release()
    return " ".join(release) if release else "missing"
