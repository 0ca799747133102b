"""The server's model thread and what it shares with the event loop: the request limits, the API's
errors, the Prometheus metrics, and the worker that batches embedding requests and steps decoding
streams (interleaved a token at a time, or through OpenVINO GenAI's continuous batching)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .decoding import Sampling
from .untyped import OvObject

if TYPE_CHECKING:
    from starlette.responses import Response

    from . import OnnxModel
    from .engine_openvino_genai import ContinuousBatching


@dataclass(frozen=True)
class Limits:
    max_queue: int = 64  # requests waiting for the model; past it: 429
    timeout_s: float = 120.0  # a request's whole time; past it: 504
    max_body: int = 1 << 20  # bytes of a request body; past it: 413
    batch_wait_ms: float = 4.0  # how long an embedding request waits for others to batch with
    batch_tokens: int = 16384  # tokens in one embedding batch at most
    max_new_tokens: int = 2048  # what a completion request may ask for


class ApiError(Exception):
    """An error the client caused (or an overload), answered as OpenAI does."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}

    def response(self) -> Response:
        from starlette.responses import JSONResponse

        kind = {401: "authentication_error", 429: "rate_limit_exceeded", 504: "timeout"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Metrics:
    """The server's counters in Prometheus' own client (its text format on /metrics)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "optimize_requests", "requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.queue = prom.Gauge("optimize_queue_depth", "requests waiting for the model", registry=self.registry)
        self.batch = prom.Histogram(
            "optimize_batch_size",
            "texts per embedding batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "optimize_request_seconds", "request latency", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.streams = prom.Histogram(
            "optimize_decode_streams",
            "sequences advanced together per decoding step (continuous batching)",
            buckets=(1, 2, 4, 8, 16),
            registry=self.registry,
        )
        self.tokens = prom.Counter("optimize_tokens", "tokens read and written", ["kind"], registry=self.registry)

    def text(self) -> bytes:
        import prometheus_client as prom

        return bytes(prom.generate_latest(self.registry))


@dataclass
class Job:
    """One request's work for the model thread: an embedding batch entry or a token stream."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[object]  # what the model thread sends: results, pieces, errors, the end
    texts: list[str] = field(default_factory=list)
    tokens: Iterator[int] | None = None  # a stream the model thread draws from a token at a time
    prompt: tuple[list[int], Sampling] | None = None  # or a request for the continuous batcher
    handle: OvObject = None  # the batcher's, once added
    cancelled: bool = False

    def send(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed (the server is stopping): nobody to tell
            self.cancelled = True


class Worker:
    """The one thread that runs the model: embedding batches first, then one step of the continuous
    batcher (every request it holds a token further), or one token of each open stream in turn, so
    no request waits for another's whole answer."""

    def __init__(
        self,
        model: OnnxModel,
        limits: Limits,
        metrics: Metrics,
        batcher: ContinuousBatching | None = None,
        interleave: bool = True,
    ):
        self.model, self.limits, self.metrics, self.batcher = model, limits, metrics, batcher
        self.interleave = interleave  # False: one stream at a time, the next when it ends
        self.ends = model.ends()
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting = 0  # requests not yet answered (bounded by limits.max_queue)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    def admit(self) -> None:
        with self.lock:
            if self.waiting >= self.limits.max_queue:
                raise ApiError(429, "the server is at capacity; retry shortly", headers={"Retry-After": "1"})
            self.waiting += 1
            self.metrics.queue.set(self.waiting)

    def release(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)

    def _run(self) -> None:
        streams: list[Job] = []
        batched: list[Job] = []
        while True:
            jobs = self._take(block=not streams and not batched)
            embeds = [j for j in jobs if j.texts]
            streams += [j for j in jobs if j.tokens is not None]
            if embeds:
                self._embed(embeds)
            for job in jobs:
                if job.prompt is not None and self.batcher is not None and not job.cancelled:
                    try:
                        job.handle = self.batcher.add(*job.prompt, self.ends)
                    except Exception as exc:  # the engine refused it: that request says so
                        job.send(exc)
                        continue
                    batched.append(job)
            if batched:
                self._advance(batched)
                time.sleep(0)
            streams = [j for j in streams if not j.cancelled]
            for job in list(streams) if self.interleave else streams[:1]:
                if not self._step(job):
                    streams.remove(job)
                # onnxruntime-genai holds the GIL through a step: hand it to the event loop between
                # steps, or tokens reach the client in bursts
                time.sleep(0)

    def _take(self, block: bool) -> list[Job]:
        """What arrived: waits for the first when idle, then up to `batch_wait_ms` for the embedding
        requests already admitted to join it (up to `batch_tokens`): a request alone on the server
        runs at once (waiting cost it 4 ms of a 14 ms answer at concurrency 1)."""
        jobs: list[Job] = []
        try:
            jobs.append(self.inbox.get(block=block))
        except queue.Empty:
            return jobs
        if jobs[0].texts:
            deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000
            budget = self.limits.batch_tokens - sum(len(t) for t in jobs[0].texts) // 4
            while budget > 0 and self.waiting > len(jobs) and (left := deadline - time.perf_counter()) > 0:
                try:  # re-checked often: the others may be answered, not coming
                    jobs.append(self.inbox.get(timeout=min(left, 0.0005)))
                except queue.Empty:
                    continue
                budget -= sum(len(t) for t in jobs[-1].texts) // 4  # ~4 characters a token
        while True:  # and whatever else is already here
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _embed(self, jobs: list[Job]) -> None:
        texts = [t for j in jobs for t in j.texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        self.metrics.batch.observe(len(texts))
        try:
            vectors = self.model.embed([texts[i] for i in order], batch_size=64)
        except Exception as exc:  # the model failed: every request in the batch says so
            for job in jobs:
                job.send(exc)
            return
        rows = np.empty_like(vectors)
        rows[order] = vectors
        start = 0
        for job in jobs:
            job.send(rows[start : start + len(job.texts)])
            start += len(job.texts)

    def _advance(self, jobs: list[Job]) -> None:
        """One step of the batcher over its requests; each gets its new tokens, None at its end."""
        assert self.batcher is not None
        for job in [j for j in jobs if j.cancelled]:
            job.handle.cancel()
            jobs.remove(job)
        if not jobs:
            return
        self.metrics.streams.observe(len(jobs))
        try:
            self.batcher.step()
        except Exception as exc:  # the engine failed: every request it held says so
            for job in jobs:
                job.send(exc)
            jobs.clear()
            return
        for job in list(jobs):
            tokens, done = self.batcher.read(job.handle, self.ends)
            for token in tokens:
                job.send(token)
            if done:
                job.send(None)
                jobs.remove(job)

    def _step(self, job: Job) -> bool:
        """One more token of `job` (None at its end); False when it is done."""
        assert job.tokens is not None
        try:
            token = next(job.tokens)
        except StopIteration:
            job.send(None)
            return False
        except Exception as exc:
            job.send(exc)
            return False
        job.send(token)
        return True
