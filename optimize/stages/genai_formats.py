"""The genai stage's other formats: each written at the smallest precision whose gate holds, measured
through its own engine (`formats.table.FORMATS`), and a request timed on each engine that generates
here, in turns, to order the runtime's generators."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from optimize.formats.table import FORMATS, FormatName
from optimize.models.handle import ModelHandle
from optimize.runtime import Tokenizer
from optimize.runtime.decoding import Sampling
from optimize.runtime.engines import open_engine
from optimize.runtime.manifest import GateResult, JsonObject
from optimize.stages.base import StageContext


class FormatTried(GateResult):
    """One precision of another format, measured through that format's own loader."""

    format: str
    bits: int  # nominal bits per weight
    level: str  # int4, int8, or the format's own type (llama.cpp's Q4_K_M)
    metrics: dict[str, float]
    limits: list[str]  # what its target engines refuse or run slowly
    loader: str  # what measured it, with its version
    written: JsonObject  # what the writer records of the file (its config, tensor types)


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


def _bits(level: int | str, written: JsonObject) -> int:
    nominal = written.get("bits")
    return level if isinstance(level, int) else nominal if isinstance(nominal, int) else 0


def _label(level: int | str) -> str:
    return f"int{level}" if isinstance(level, int) else level


def write_format(
    name: FormatName, model: ModelHandle, ctx: StageContext, tried: list[FormatTried], requested: Sequence[str]
) -> tuple[ModelHandle, dict[str, float], GateResult] | None:
    """`name` at the smallest precision whose gate holds, measured as its loader reads it
    (compressed-tensors: transformers, which decompresses it on the CPU; gguf: llama.cpp); every
    attempt recorded; None when none holds (reported, not shipped)."""
    writer = FORMATS[name]
    levels = writer.levels(model.checkpoint, requested)
    for level in levels:
        label = _label(level)
        out = ctx.workdir / f"{name}-{label}"
        with ctx.console.status(f"genai: writing {name} {label}"):
            written = writer.write(model.checkpoint, out, level, ctx.calibration_texts)
        handle = ModelHandle(out, model.task, engine=writer.engine)
        metrics, gate = ctx.judge(handle)
        listed = written.pop("limits", [])
        limits = [str(line) for line in listed] if isinstance(listed, list) else []
        tried.append(
            FormatTried(
                format=name,
                bits=_bits(level, written),
                level=label,
                metrics=metrics,
                limits=limits,
                loader=writer.loader(),
                written=written,
                **gate,
            )
        )
        shown = ", ".join(f"{c['metric']} {c['value']}" for c in gate.get("checks", []))
        ctx.console.print(f"genai: {name} {label}: {shown}: gate {'passed' if gate['passed'] else 'failed'}")
        if gate["passed"]:
            return handle, metrics, gate
    shown_levels = " or ".join(_label(level) for level in levels)
    ctx.console.print(f"genai: {name} did not hold the gate at {shown_levels}: not shipped")
    return None
