"""Measuring a model: fidelity against the reference, speed and size, in the runtime that ships.

ONNX models are measured through `optimize.runtime` (the code bundled in the artifact); torch
checkpoints through transformers with the very same tokenization, so a difference between the two
is a difference of the models, not of the preprocessing.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from optimize import costs, runtime, tasks
from optimize.evaluate.suites import LoadedSuite, run_suite, standard_error
from optimize.formats.table import BY_ENGINE, Measured
from optimize.models import memory, projection
from optimize.models.handle import ModelHandle
from optimize.models.loading import load_torch
from optimize.models.routes import STEPPED_IDS
from optimize.runtime.engines import DEFAULT_ENGINE
from optimize.runtime.untyped import Json

Inputs = dict[str, np.ndarray]


def threads() -> int:
    return os.cpu_count() or 1


class TorchModel:
    """A transformers checkpoint behind the same `run(inputs)` / `embed(texts)` interface as the runtime."""

    def __init__(self, handle: ModelHandle, seq_len: int):
        import torch

        torch.set_num_threads(threads())
        self.model = load_torch(handle, lean=True)  # the reference: one copy, a 16-bit checkpoint kept in 16 bits
        self.tokenizer = runtime.Tokenizer(
            handle.checkpoint / "tokenizer.json", runtime.model_seq_len(handle.checkpoint, seq_len)
        )
        # A decoder is fed as generation feeds it, without token types: GPT-2 takes them and adds
        # the embedding of token 0 to every position when given zeros (its logits then moved by 1.3)
        names = ("input_ids", "attention_mask", *(() if handle.task == tasks.GENERATION else ("token_type_ids",)))
        self.input_names = [n for n in names if n in inspect.signature(self.model.forward).parameters]
        self.caches = "use_cache" in inspect.signature(self.model.forward).parameters
        self.provider = "torch-cpu"
        self.projection = projection.read(handle.checkpoint) if tasks.embeds(handle.task) else None
        self.pooling = runtime.Pooling.of(handle.checkpoint)

    def run(self, inputs: Inputs) -> np.ndarray:
        import torch

        feeds: dict[str, torch.Tensor | bool] = {n: torch.from_numpy(inputs[n]) for n in self.input_names}
        if self.caches:
            feeds["use_cache"] = False  # a window's keys and values are not read again: not kept
        with torch.inference_mode():
            out = self.model(**feeds)
        first = np.asarray(out[0].float().numpy())
        return first if self.projection is None else projection.apply(first, self.projection)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return runtime.embed(self.run, self.tokenizer, texts, batch_size, self.pooling)


Opened = TorchModel | runtime.OnnxModel | Measured


def open_model(handle: ModelHandle, seq_len: int) -> Opened:
    """`handle` in the engine that runs it: the runtime for ONNX, llama.cpp (or transformers) for a
    GGUF folder, transformers for a checkpoint."""
    written = BY_ENGINE.get(handle.engine)
    if written is not None and written.measure is not None:
        return written.measure(handle.checkpoint, seq_len, threads())
    if handle.onnx_path is not None:
        return runtime.OnnxModel(
            handle.onnx_path,
            handle.checkpoint / "tokenizer.json",
            seq_len,
            threads=threads(),
            available=["CPUExecutionProvider"],
            settings={"engine": handle.engine},
        )
    return TorchModel(handle, seq_len)


def size_mb(handle: ModelHandle) -> float:
    if handle.onnx_path is not None:
        files = [handle.onnx_path, *handle.onnx_path.parent.glob(handle.onnx_path.name + ".data")]
    else:
        files = [
            f
            for pattern in ("*.safetensors", "model.gguf", "openvino_model.bin")
            for f in handle.checkpoint.glob(pattern)
        ]
        files = files or list(handle.checkpoint.glob("*.bin"))
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


@dataclass(frozen=True)
class SpeedSettings:
    batch_size: int = 1
    seq_len: int = 128
    warmup: int = 5
    runs: int = 30


# A model whose calls are long is timed within BUDGET_S, at least MIN_RUNS calls: at 1B parameters
# on 2 cores a call is 0.5 to 2 s and its spread small (bench/scale.py's 1.04B Llama: the torch
# reference 1,938 ms with a std of 90, the int4 candidate 540 with 6), so more calls cost seconds
# each and move the median little.
BUDGET_S, MIN_RUNS = 2.0, 3
ROWS = 64  # output rows compared at a time


def latency(
    run: Callable[[Inputs], object], inputs: Inputs, settings: SpeedSettings
) -> tuple[dict[str, float], dict[str, float]]:
    """Wall time of `run(inputs)` after a warm-up: the metrics (percentiles, throughput) and the spread.
    A model whose calls take long (billions of parameters on a CPU) is timed within BUDGET_S after
    its first call (the warm-up), with at least MIN_RUNS."""
    start = time.perf_counter()
    run(inputs)
    first = time.perf_counter() - start
    warmup, runs = settings.warmup, settings.runs
    if first * (warmup + runs) > BUDGET_S:
        warmup, runs = 1, max(MIN_RUNS, min(runs, int(BUDGET_S / first)))
    for _ in range(warmup - 1):
        run(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - start) * 1000)
    ms = np.array(times)
    metrics = {
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 3),
        "latency_p90_ms": round(float(np.percentile(ms, 90)), 3),
        "latency_p99_ms": round(float(np.percentile(ms, 99)), 3),
        "throughput_per_s": round(settings.batch_size * 1000 / float(ms.mean()), 2),
    }
    spread = {
        "min_ms": round(float(ms.min()), 3),
        "max_ms": round(float(ms.max()), 3),
        "std_ms": round(float(ms.std()), 3),
        "iqr_ms": round(float(np.percentile(ms, 75) - np.percentile(ms, 25)), 3),
    }
    return metrics, spread


def speed_inputs(tokenizer: runtime.Tokenizer, texts: Sequence[str], settings: SpeedSettings) -> Inputs:
    """A batch of real texts padded to exactly `seq_len`, so every model sees the same shape."""
    batch = [texts[i % len(texts)] for i in range(settings.batch_size)]
    return tokenizer(batch, pad_to=settings.seq_len)


MAX_LOGIT_ROWS = 512  # a decoder's per-token logits are vocabulary-wide: compare this many tokens


def outputs(model: Opened, task: str, texts: Sequence[str]) -> np.ndarray:
    """What fidelity compares, one row per item: sentence embeddings (feature extraction), class
    logits (classification), or next-token logits at each real token of the texts (causal LM)."""
    if tasks.embeds(task):
        return model.embed(texts)
    rows: list[np.ndarray] = []
    count = 0
    for start in range(0, len(texts), 16):
        inputs = model.tokenizer(texts[start : start + 16])
        logits = model.run(inputs).astype(np.float32)
        if logits.ndim == 3:
            logits = logits[inputs["attention_mask"].astype(bool)]
        rows.append(logits)
        count += len(logits)
        if count >= MAX_LOGIT_ROWS:
            break
    return np.concatenate(rows)[:MAX_LOGIT_ROWS]


def latency_rounds(
    models: Sequence[Opened], texts: Sequence[str], settings: SpeedSettings, rounds: int
) -> list[list[float]]:
    """p50 latency of each model in each round, the models taking turns so that a slow spell of a
    shared machine hits them alike: how models are compared fairly within one run."""
    inputs = [speed_inputs(model.tokenizer, texts or ["hello world"], settings) for model in models]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, feed, row in zip(models, inputs, times, strict=True):
            row.append(latency(model.run, feed, settings)[0]["latency_p50_ms"])
    return times


def time_in_turns(
    models: Sequence[ModelHandle],
    texts: Sequence[str],
    seq_len: int,
    rounds: int = 5,
    runs: int = 10,
    batch_size: int = 1,
) -> list[float]:
    """Median over `latency_rounds` at `batch_size` of each model (fewer runs per round for big batches)."""
    runs = max(2, runs * 4 // (4 + batch_size)) if batch_size > 1 else runs
    settings = SpeedSettings(batch_size=batch_size, seq_len=seq_len, warmup=1 if batch_size > 1 else 2, runs=runs)
    times = latency_rounds([open_model(m, seq_len) for m in models], texts, settings, rounds)
    return [round(float(np.median(t)), 3) for t in times]


def fidelity(candidate: np.ndarray, reference: np.ndarray, task: str = tasks.EMBEDDING) -> dict[str, float]:
    """Cosine between each output row and the reference's for the same input; for logits also how
    often the top-1 class or token agrees and the mean KL divergence KL(reference || candidate).
    Rows are taken ROWS at a time (a decoder's are vocabulary-wide, and float64 copies of them all
    would hold more memory than a small model's weights); every figure is per row, then averaged."""
    from scipy.special import log_softmax

    cos, kl = np.empty(len(candidate)), np.empty(len(candidate))
    for start in range(0, len(candidate), ROWS):
        c, r = candidate[start : start + ROWS], reference[start : start + ROWS]
        a = c / np.linalg.norm(c, axis=1, keepdims=True)
        b = r / np.linalg.norm(r, axis=1, keepdims=True)
        cos[start : start + ROWS] = np.clip((a * b).sum(axis=1), -1.0, 1.0)
        if not tasks.embeds(task):
            log_p, log_q = log_softmax(r.astype(np.float64), axis=1), log_softmax(c.astype(np.float64), axis=1)
            kl[start : start + ROWS] = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    result = {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}
    if not tasks.embeds(task):
        result["top1_agreement"] = round(float((candidate.argmax(1) == reference.argmax(1)).mean()), 6)
        result["kl_div"] = round(float(kl.mean()), 8)
    return result


@dataclass
class Evaluator:
    """Measures models on fixed texts and suites. Fidelity is always against `reference`, named
    when the evaluator is made (the run's input model): its outputs are computed the first time a
    figure needs them, whatever was measured before, so a run that reuses cached steps compares a
    stage with the same model a cold run does."""

    texts: Sequence[str]
    speed: SpeedSettings | None
    suites: Sequence[LoadedSuite] = ()
    seq_len: int = 128
    reference: ModelHandle | None = None  # what fidelity is measured against; None: no fidelity
    conditions: dict[str, object] = field(default_factory=dict)
    _cache: dict[tuple[object, ...], tuple[dict[str, float], dict[str, object]]] = field(default_factory=dict)
    _outputs: dict[tuple[object, ...], np.ndarray] = field(default_factory=dict)
    _losses: dict[tuple[object, ...], dict[str, np.ndarray]] = field(default_factory=dict)  # per-token, per metric

    @property
    def _seq_len(self) -> int:
        return self.speed.seq_len if self.speed else self.seq_len

    def outputs_of(self, handle: ModelHandle, model: Opened | None = None, keep: bool = True) -> np.ndarray:
        """`handle`'s outputs on the held-out texts; kept for the run when `keep` (the models others
        are compared with: a decoder's rows are vocabulary-wide, so candidates are not kept). An
        ONNX file rewritten in place by a search is a new model: its size and time are in the key."""
        key = _identity(handle)
        found = self._outputs.get(key)
        if found is None:
            found = outputs(model or open_model(handle, self._seq_len), handle.task, self.texts)
            if keep:
                self._outputs[key] = found
        return found

    def agreement(self, candidate: ModelHandle, base: ModelHandle) -> dict[str, float]:
        """Fidelity of `candidate` to `base` on the held-out texts: to the reference, or (after
        distillation) to the newest trained model, or (distillation's own gate) to the teacher."""
        return fidelity(self.outputs_of(candidate, keep=False), self.outputs_of(base), candidate.task)

    def probe(self, handle: ModelHandle) -> dict[str, float]:
        """Fidelity to the reference on the held-out texts only: the cheap signal for per-layer sensitivity."""
        assert self.reference is not None, "an evaluator without a reference measures no fidelity"
        return self.agreement(handle, self.reference)

    def losses(self, handle: ModelHandle) -> dict[str, np.ndarray]:
        """Per-token losses behind `handle`'s perplexity, as measured (or `keep_losses` put back)."""
        return self._losses.get(_identity(handle), {})

    def keep_losses(self, handle: ModelHandle, losses: dict[str, np.ndarray]) -> None:
        self._losses[_identity(handle)] = losses

    def resolution(self, handle: ModelHandle) -> dict[str, dict[str, float]]:
        """Per metric measured on tokens: its standard error, and its ratio's to the reference."""
        reference = self.losses(self.reference) if self.reference is not None else {}
        return {
            metric: standard_error(values, None if handle == self.reference else reference.get(metric))
            for metric, values in self.losses(handle).items()
        }

    def measure(self, handle: ModelHandle) -> tuple[dict[str, float], dict[str, object]]:
        """The metrics of DESIGN.md for this model, and the details behind them (spread, provider).
        An ONNX file already measured in this run (same path, size and time) is not measured again."""
        key = _identity(handle) if handle.onnx_path is not None else None
        if key is not None and key in self._cache:
            return self._cache[key]
        engine = handle.engine if handle.onnx_path or handle.engine != DEFAULT_ENGINE else "torch"
        with costs.step(f"measure {handle.checkpoint.name} ({engine})"):
            result = self._measure(handle)
            memory.release()  # the model measured is dropped: its memory goes back before the next step
        if key is not None:
            self._cache[key] = result
        return result

    def _measure(self, handle: ModelHandle) -> tuple[dict[str, float], dict[str, object]]:
        model = open_model(handle, self._seq_len)
        metrics: dict[str, float] = {}
        details: dict[str, object] = {"provider": model.provider}
        if self.texts and self.reference is not None:
            rows = self.outputs_of(handle, model, keep=handle == self.reference)
            metrics.update(fidelity(rows, self.outputs_of(self.reference), handle.task))
        losses = self._losses.setdefault(_identity(handle), {})
        for suite in self.suites:
            metrics.update(run_suite(model, handle.task, suite, losses))
        if self.speed is not None:
            speed_metrics, details["latency_spread"] = latency(
                model.run, speed_inputs(model.tokenizer, self.texts or ["hello world"], self.speed), self.speed
            )
            metrics.update(speed_metrics)
            self.conditions = {
                "threads": threads(),
                "batch_size": self.speed.batch_size,
                "seq_len": self.speed.seq_len,
                "runs": self.speed.runs,
                "fidelity_texts": len(self.texts),
            }
        metrics["size_mb"] = size_mb(handle)
        return metrics, details


def _identity(handle: ModelHandle) -> tuple[object, ...]:
    """A handle with its ONNX file's size and time: the same path rewritten is another model."""
    if handle.onnx_path is None:
        return (handle,)
    stat = handle.onnx_path.stat()
    return (handle, stat.st_size, stat.st_mtime_ns)


def bench(handle: ModelHandle, batch_size: int, seq_len: int, warmup: int, runs: int) -> Json:
    """Speed and size of one model on real sentences; peak RSS is this process's high-water mark."""
    import resource

    from optimize.data import read_rows
    from optimize.paths import find

    texts = [str(r["text"]) for r in read_rows(find("default.jsonl", "calibration"))]
    settings = SpeedSettings(batch_size, seq_len, warmup, runs)
    model = open_model(handle, seq_len)
    metrics, spread = latency(model.run, speed_inputs(model.tokenizer, texts, settings), settings)
    metrics["size_mb"] = size_mb(handle)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    conditions = {
        "threads": threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "runs": runs,
        "warmup": warmup,
        "provider": model.provider,
    }
    return {"metrics": metrics, "spread": spread, "conditions": conditions}


def stepped_logits(handle: ModelHandle, seq_len: int) -> np.ndarray:
    """A decoder graph's logits on STEPPED_IDS fed as generation feeds it: the first half in one
    pass, then one token at a time through its cache (`runtime.OnnxModel.stepped_logits`)."""
    opened = open_model(handle, seq_len)
    if not isinstance(opened, runtime.OnnxModel):
        raise ValueError(f"{handle.onnx_path}: not a graph the runtime steps through")
    return opened.stepped_logits(STEPPED_IDS)
