"""Text generation for causal LMs: greedy or sampled (temperature, top-k, top-p, a seed makes it
reproducible), stop strings, and streaming (each new piece of text handed to a callback as it comes).

Three engines behind one `generate`: onnxruntime-genai for artifacts its model builder made (they
hold `genai_config.json`; its C++ loop keeps the KV cache in place and samples), llama.cpp for the
artifact's GGUF file where llama-cpp-python is installed, and a KV-cache loop in Python over an
onnxruntime session for graphs exported with past key values. Text is decoded with the
artifact's own `tokenizer.json` in both, so the two engines print the same text for the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .verify import ArtifactError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1, please")


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax, or a draw after temperature, top-k and top-p."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < len(z):
        z = np.where(z < np.partition(z, -sampling.top_k)[-sampling.top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), sampling.top_p)) + 1]
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(len(p), p=p))


class Text:
    """The text of the tokens so far, what is new since last asked, and where a stop string begins."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token: (text safe to hand out now, whether a stop string was reached)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut >= 0:
            piece, self.sent = text[self.sent : cut], cut
            return piece, True
        # hold back a tail that could still grow into a stop string, and an unfinished character
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text) - hold if not text.endswith("\ufffd") else text.rfind("\ufffd")
        safe = max(safe, self.sent)
        piece, self.sent = text[self.sent : safe], safe
        return piece, False

    def rest(self) -> str:
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        cut = len(text) if cut < 0 else cut
        piece, self.sent = text[self.sent : cut], cut
        return piece

    def _stop_at(self, text: str) -> int:
        """Where the earliest stop string begins in `text`, or -1."""
        return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)


def stream(
    tokens: Iterator[int], decode: Callable[[list[int]], str], sampling: Sampling, on_text: Callable[[str], None]
) -> str:
    """Drive a token iterator to max_new_tokens or a stop string; returns the whole text."""
    text = Text(decode, sampling.stop)
    pieces: list[str] = []
    stopped = False
    for count, token in enumerate(tokens, start=1):
        piece, stopped = text.add(token)
        if piece:
            pieces.append(piece)
            on_text(piece)
        if stopped or count >= sampling.max_new_tokens:
            break
    if not stopped:
        piece = text.rest()
        if piece:
            pieces.append(piece)
            on_text(piece)
    return "".join(pieces)


def lookup(context: Sequence[int], count: int, longest: int = 3) -> list[int]:
    """Prompt lookup: up to `count` tokens that followed the latest earlier occurrence of the
    context's last n tokens, n from `longest` down to 1; none when nothing matches."""
    seq = np.asarray(context)
    for n in range(min(longest, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier n-gram
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return [int(t) for t in seq[start : start + count]]
    return []


@dataclass
class Drafts:
    """Prompt-lookup drafts and how many to check next: doubled (up to `most`) while all are
    accepted, one more than were accepted otherwise; after a draft wholly refused, drafting pauses
    for 1, 3, 7, ... steps, so a text that does not copy costs almost nothing. Counts what was
    proposed and accepted (the acceptance rate)."""

    most: int = 8
    size: int = 4
    pause: int = 0
    misses: int = 0
    proposed: int = 0
    accepted: int = 0

    def propose(self, context: Sequence[int], room: int) -> list[int]:
        if self.pause:
            self.pause -= 1
            return []
        return lookup(context, min(self.size, room)) if room > 0 else []

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.proposed, self.accepted = self.proposed + drafted, self.accepted + accepted
        self.size = min(2 * self.size, self.most) if accepted == drafted else accepted + 1
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.pause = 2 ** min(self.misses, 5) - 1


@contextmanager
def refused(name: str, folder: Path) -> Iterator[None]:
    """An engine that cannot load its folder (files of another version, too little memory) raises
    RuntimeError from C++ (llama-cpp-python a ValueError): an ArtifactError that says which engine
    and folder, in one line, instead."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ArtifactError(f"{name} cannot load {folder}: {said}") from exc


def chat_prompt(folder: Path, prompt: str | Sequence[dict[str, str]]) -> str:
    """`prompt` as one user turn (or a list of {"role", "content"} messages) in the model's chat
    template (`chat_template.jinja` or the one in `tokenizer_config.json`), rendered as transformers
    renders it (needs `jinja2`)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    path = folder / "chat_template.jinja"
    template = path.read_text() if path.is_file() else config.get("chat_template")
    if not isinstance(template, str) or not template:
        raise ValueError("this model has no chat template; generate without --chat")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("a chat template needs jinja2: pip install jinja2") from None

    def fail(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = fail

    def token(name: str) -> str:
        value = config.get(name)
        return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    rendered: str = environment.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=token("bos_token"), eos_token=token("eos_token")
    )
    return rendered


def kv_loop(
    step: Callable[[np.ndarray, dict[str, np.ndarray] | None], tuple[np.ndarray, dict[str, np.ndarray]]],
    prompt_ids: list[int],
    sampling: Sampling,
    eos: set[int],
) -> Iterator[int]:
    """Tokens from an exported graph: the prompt once, then one token per step with the cache."""
    rng = np.random.default_rng(sampling.seed)
    ids = np.array([prompt_ids], dtype=np.int64)
    logits, past = step(ids, None)
    while True:
        token = pick(logits[0, -1], sampling, rng)
        if token in eos:
            return
        yield token
        logits, past = step(np.array([[token]], dtype=np.int64), past)
