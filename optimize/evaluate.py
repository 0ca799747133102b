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

from optimize import runtime
from optimize.model import ModelHandle, load_torch
from optimize.suites import LoadedSuite, run_suite

Inputs = dict[str, np.ndarray]


def threads() -> int:
    return os.cpu_count() or 1


class TorchModel:
    """A transformers checkpoint behind the same `run(inputs)` / `embed(texts)` interface as the runtime."""

    def __init__(self, handle: ModelHandle, seq_len: int):
        import torch

        torch.set_num_threads(threads())
        self.model = load_torch(handle)
        self.tokenizer = runtime.Tokenizer(handle.checkpoint / "tokenizer.json", seq_len)
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in inspect.signature(self.model.forward).parameters]
        self.provider = "torch-cpu"

    def run(self, inputs: Inputs) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(**{n: torch.from_numpy(inputs[n]) for n in self.input_names})
        return out[0].float().numpy()

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return runtime.embed(self.run, self.tokenizer, texts, batch_size)


def open_model(handle: ModelHandle, seq_len: int) -> TorchModel | runtime.OnnxModel:
    if handle.onnx_path is not None:
        return runtime.OnnxModel(handle.onnx_path, handle.checkpoint / "tokenizer.json", seq_len,
                                 threads=threads(), available=["CPUExecutionProvider"])
    return TorchModel(handle, seq_len)


def size_mb(handle: ModelHandle) -> float:
    if handle.onnx_path is not None:
        files = [handle.onnx_path, *handle.onnx_path.parent.glob(handle.onnx_path.name + ".data")]
    else:
        files = list(handle.checkpoint.glob("*.safetensors")) or list(handle.checkpoint.glob("*.bin"))
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


@dataclass(frozen=True)
class SpeedSettings:
    batch_size: int = 1
    seq_len: int = 128
    warmup: int = 5
    runs: int = 30


def latency(run: Callable[[Inputs], object], inputs: Inputs, settings: SpeedSettings) -> tuple[dict[str, float], dict[str, float]]:
    """Wall time of `run(inputs)` after a warm-up: the metrics (percentiles, throughput) and the spread."""
    for _ in range(settings.warmup):
        run(inputs)
    times = []
    for _ in range(settings.runs):
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
    spread = {"min_ms": round(float(ms.min()), 3), "max_ms": round(float(ms.max()), 3),
              "std_ms": round(float(ms.std()), 3),
              "iqr_ms": round(float(np.percentile(ms, 75) - np.percentile(ms, 25)), 3)}
    return metrics, spread


def speed_inputs(tokenizer: runtime.Tokenizer, texts: Sequence[str], settings: SpeedSettings) -> Inputs:
    """A batch of real texts padded to exactly `seq_len`, so every model sees the same shape."""
    batch = [texts[i % len(texts)] for i in range(settings.batch_size)]
    return tokenizer(batch, pad_to=settings.seq_len)


def fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine between each sentence embedding and the reference's for the same sentence."""
    a = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = np.clip((a * b).sum(axis=1), -1.0, 1.0)
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}


@dataclass
class Evaluator:
    """Measures models on fixed texts and suites; the first model measured is the reference, and
    later ones are compared to it (fidelity) in the same run."""

    texts: Sequence[str]
    speed: SpeedSettings | None
    suites: Sequence[LoadedSuite] = ()
    seq_len: int = 128
    reference_embeddings: np.ndarray | None = None
    conditions: dict[str, object] = field(default_factory=dict)
    _cache: dict[tuple[object, ...], tuple[dict[str, float], dict[str, object]]] = field(default_factory=dict)

    def probe(self, handle: ModelHandle) -> dict[str, float]:
        """Fidelity on the held-out texts only: the cheap signal for per-layer sensitivity."""
        assert self.reference_embeddings is not None, "measure the reference first"
        model = open_model(handle, self.speed.seq_len if self.speed else self.seq_len)
        return fidelity(model.embed(self.texts), self.reference_embeddings)

    def measure(self, handle: ModelHandle) -> tuple[dict[str, float], dict[str, object]]:
        """The metrics of DESIGN.md for this model, and the details behind them (spread, provider).
        An ONNX file already measured in this run (same path, size and time) is not measured again."""
        key = None
        if handle.onnx_path is not None:
            stat = handle.onnx_path.stat()
            key = (str(handle.onnx_path), stat.st_size, stat.st_mtime_ns)
            if key in self._cache:
                return self._cache[key]
        result = self._measure(handle)
        if key is not None:
            self._cache[key] = result
        return result

    def _measure(self, handle: ModelHandle) -> tuple[dict[str, float], dict[str, object]]:
        model = open_model(handle, self.speed.seq_len if self.speed else self.seq_len)
        metrics: dict[str, float] = {}
        details: dict[str, object] = {"provider": model.provider}
        if self.texts and handle.task == "feature-extraction":
            embeddings = model.embed(self.texts)
            if self.reference_embeddings is None:
                self.reference_embeddings = embeddings
            metrics.update(fidelity(embeddings, self.reference_embeddings))
        for suite in self.suites:
            metrics.update(run_suite(model, handle.task, suite))
        if self.speed is not None:
            speed_metrics, details["latency_spread"] = latency(
                model.run, speed_inputs(model.tokenizer, self.texts or ["hello world"], self.speed), self.speed)
            metrics.update(speed_metrics)
            self.conditions = {"threads": threads(), "batch_size": self.speed.batch_size,
                               "seq_len": self.speed.seq_len, "runs": self.speed.runs,
                               "fidelity_texts": len(self.texts)}
        metrics["size_mb"] = size_mb(handle)
        return metrics, details


def bench(handle: ModelHandle, batch_size: int, seq_len: int, warmup: int, runs: int) -> dict[str, object]:
    """Speed and size of one model on real sentences; peak RSS is this process's high-water mark."""
    import resource

    from optimize.data import read_rows
    from optimize.recipe import SHIPPED, SOURCE_TREE

    texts_file = next(p for p in (SOURCE_TREE / "calibration" / "default.jsonl",
                                  SHIPPED / "calibration" / "default.jsonl") if p.exists())
    texts = [str(r["text"]) for r in read_rows(texts_file)]
    settings = SpeedSettings(batch_size, seq_len, warmup, runs)
    model = open_model(handle, seq_len)
    metrics, spread = latency(model.run, speed_inputs(model.tokenizer, texts, settings), settings)
    metrics["size_mb"] = size_mb(handle)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    conditions = {"threads": threads(), "batch_size": batch_size, "seq_len": seq_len, "runs": runs,
                  "warmup": warmup, "provider": model.provider}
    return {"metrics": metrics, "spread": spread, "conditions": conditions}


def max_abs_diff(a: ModelHandle, b: ModelHandle, texts: Sequence[str], seq_len: int) -> float:
    """Largest absolute difference of the raw outputs (e.g. last hidden states) on real inputs."""
    first, second = open_model(a, seq_len), open_model(b, seq_len)
    inputs = first.tokenizer(texts)
    return float(np.abs(first.run(inputs) - second.run(inputs)).max())
