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
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from queue import Queue
from typing import Any

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


class GenAIEngine:
    """An onnxruntime-genai model folder. On a machine without a GPU, a model built for CUDA runs on
    the CPU: the config's providers are cleared (the `-cuda` package also runs CPU models).

    With `speculate`, tokens are picked here (`pick`) from the logits the engine returns for every
    position it appends, and prompt-lookup drafts are checked several at a time: one forward pass
    over the next token and its drafts, the agreeing prefix kept, the cache rewound past the rest.
    Every emitted token is the pick from the logits after exactly the tokens before it, with one draw
    of the seeded generator each, so the output is the one of the same loop without drafts (greedy
    and sampled alike) as far as the engine computes a position the same alone or among several:
    fp32 and int4 with fp32 activations (accuracy level 1) agree within 5e-5, but int4 with int8
    activations (accuracy level 4, the builder's default) was measured to differ by up to 1.2 in a
    logit between one position and eight, which turns close calls. On 2 AVX2 cores checking drafts
    also costs about as much as it saves (SmolLM2: 56.0 tok/s with lookup, 56.1 without, on text
    that copies), so it is off by default. Without it, onnxruntime-genai's own loop picks."""

    def __init__(self, folder: Path, use_gpu: bool):
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        if not use_gpu:
            config.clear_providers()
        self.og, self.model = og, og.Model(config)
        self.drafts = Drafts()  # the last generation's (its acceptance rate)

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]:
        if speculate:
            self.drafts = Drafts()
            return self.checked(prompt_ids, sampling, eos, self.drafts)
        return self._own_loop(prompt_ids, sampling, eos)

    def checked(self, prompt_ids: list[int], sampling: Sampling, eos: set[int], drafts: Drafts) -> Iterator[int]:
        """Tokens picked here, drafts checked in one pass each (none with `Drafts(most=0)`)."""
        end = len(prompt_ids) + sampling.max_new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=end + 2)
        generator = self.og.Generator(self.model, params)
        rng = np.random.default_rng(sampling.seed)
        context = list(prompt_ids)
        generator.append_tokens([prompt_ids])
        after = generator.get_output("logits")[0, -1]  # the logits after the context
        pending: int | None = None  # a token picked where a draft was refused: the next one
        while len(context) < end:
            token = pick(after, sampling, rng) if pending is None else pending
            if token in eos:
                return
            yield token
            context.append(token)
            if len(context) == end:
                return
            guess = drafts.propose(context, end - len(context)) if drafts.most else []
            generator.append_tokens([[token, *guess]])
            rows = generator.get_output("logits")[0]  # rows[i]: after the token and guess[:i]
            pending, accepted = None, 0
            for row, draft in zip(rows, guess, strict=False):
                picked = pick(row, sampling, rng)
                if picked != draft:
                    pending = picked
                    break
                accepted += 1
            drafts.update(len(guess), accepted)
            for draft in guess[:accepted]:
                if draft in eos:
                    return
                yield draft
                context.append(draft)
            if pending is not None:
                generator.rewind_to(len(context))
            else:
                after = rows[-1]

    def _own_loop(self, prompt_ids: list[int], sampling: Sampling, eos: set[int]) -> Iterator[int]:
        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = {
            "max_length": len(prompt_ids) + sampling.max_new_tokens,
            "do_sample": sampling.temperature > 0,
        }
        if sampling.temperature > 0:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p)
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens([prompt_ids])
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                return
            yield token


class LlamaCppEngine:
    """The artifact's `gguf/model.gguf` through llama-cpp-python (llama.cpp's own kernels and
    sampler): what generates where onnxruntime-genai is not installed, or when asked for by name.
    Sampling is ours in meaning: no min-p, repeat penalty or top-k unless set. `speculate` is not
    taken here: llama-cpp-python's prompt lookup needs the logits of every position of the context
    kept (`logits_all`: 4 bytes x vocabulary x context, 1.6 GB for SmolLM2's 8k) and aborts the
    process without them; checking drafts through its low-level batch (logits of the batch only)
    does not pay on CPUs like the 2 AVX2 cores here either: one `llama_decode` of k tokens after a
    150-token prompt cost k=2 1.88x one token, 4 2.79x, 8 4.33x, 32 11.8x (SmolLM2's Q4_1)."""

    def __init__(self, path: Path, threads: int | None):
        import llama_cpp

        # n_ctx 0: the context the model was trained for. Threads: every core, as the gate ran it
        # (llama-cpp-python's own default is half of them: decode 19.6 ms a token instead of 14.5 on
        # SmolLM2's GGUF here, 2 cores)
        threads = threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=threads, verbose=False)

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]:
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        options = {"temp": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": 0.0}
        tokens = self.llm.generate(prompt_ids, **options, repeat_penalty=1.0, reset=True)
        for token in islice(tokens, sampling.max_new_tokens):  # llama.cpp's own goes on to the context's end
            if token in eos or token == self.llm.token_eos():
                return
            yield int(token)


def openvino_properties(threads: int | None) -> dict[str, Any]:
    """What every OpenVINO GenAI pipeline here compiles with, the gate's included: float ops in f32.
    OpenVINO's CPU default is bf16 where the CPU has AVX-512 BF16 or AMX (f32 elsewhere), which
    moved a random Llama's logits by 0.87 where f32 keeps them within 1e-3 of the checkpoint's, and
    the IR's runtime options cannot name it as they name the KV cache (compile_model ignores an
    INFERENCE_PRECISION_HINT there): so it is said here, and the verdict is the same on every CPU."""
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


def openvino_config(genai: Any, sampling: Sampling, eos: set[int], lookup: bool = False) -> Any:
    """`sampling` as OpenVINO GenAI's GenerationConfig (with prompt lookup's draft sizes)."""
    config = genai.GenerationConfig()
    config.max_new_tokens = sampling.max_new_tokens
    config.do_sample = sampling.temperature > 0
    if config.do_sample:
        config.temperature, config.top_p = sampling.temperature, sampling.top_p
        if sampling.top_k:
            config.top_k = sampling.top_k
        if sampling.seed is not None:
            config.rng_seed = sampling.seed
    if lookup:
        config.num_assistant_tokens, config.max_ngram_size = 5, 3
    if eos:
        config.stop_token_ids = set(eos)
    return config


class ContinuousBatching:
    """OpenVINO GenAI's continuous batching on the artifact's `openvino-genai/` folder: what the
    server decodes with where OpenVINO GenAI is installed. Requests join and leave at any step; one
    `step()` advances every open request by a token, prefilling new prompts in the same pass, so
    concurrent streams share each read of the weights. The KV cache is paged, in OpenVINO's CPU
    precision the IR names (as the gate measured it), `cache_gb` of it at most (its pages are
    allocated as they are first used: the process grows to that and stays), and blocks of a prompt
    prefix another request already computed are reused; past `most` open sequences the scheduler
    queues. Greedy tokens are LLMPipeline's (checked in test_openvino_genai)."""

    def __init__(self, folder: Path, threads: int | None, cache_gb: int = 1, most: int = 16):
        import openvino_genai

        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size, scheduler.max_num_seqs = cache_gb, most
        scheduler.enable_prefix_caching = True  # a shared system prompt or chat history is prefilled once
        properties = openvino_properties(threads)
        self.genai, self.added = openvino_genai, 0
        with refused("openvino-genai", folder):
            self.pipeline = openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)

    def add(self, prompt_ids: list[int], sampling: Sampling, eos: set[int]) -> Any:
        """A request's handle (`read` it after each `step`; `cancel()` drops it)."""
        import openvino

        self.added += 1
        ids = openvino.Tensor(np.array([prompt_ids], dtype=np.int64))
        return self.pipeline.add_request(self.added, ids, openvino_config(self.genai, sampling, eos))

    def step(self) -> None:
        self.pipeline.step()

    def read(self, handle: Any, eos: set[int]) -> tuple[list[int], bool]:
        """The tokens the last steps made for `handle` (up to an end of sequence), and whether it is done."""
        done = handle.get_status() != self.genai.GenerationStatus.RUNNING
        tokens: list[int] = []
        if handle.can_read():
            for output in handle.read().values():
                tokens += [int(t) for t in output.generated_ids]
        ended = next((i for i, t in enumerate(tokens) if t in eos), None)
        if ended is None:
            return tokens, done
        if not done:  # an end of sequence it was not told of: its place is freed
            handle.cancel()
        return tokens[:ended], True


class OpenVinoGenAIEngine:
    """The artifact's `openvino-genai/` folder through OpenVINO GenAI's LLMPipeline: its own loop,
    sampler and KV cache (at the precision the IR names, as the gate measured it); with `speculate`, its prompt-lookup
    decoding (n-gram drafts checked in one pass: under greedy the same tokens). It is fed the
    artifact's tokens and hands tokens back through a streamer, on a thread of its own; one pipeline
    generates one sequence at a time, so concurrent streams take turns."""

    def __init__(self, folder: Path, threads: int | None):
        import openvino_genai

        self.genai, self.folder = openvino_genai, folder
        self.properties = openvino_properties(threads)
        self.pipelines: dict[bool, Any] = {}  # prompt lookup or not -> its pipeline (made when first asked)
        self.lock = threading.Lock()

    def pipeline(self, lookup: bool) -> Any:
        if lookup not in self.pipelines:
            with refused("openvino-genai", self.folder):
                self.pipelines[lookup] = self.genai.LLMPipeline(
                    str(self.folder), "CPU", prompt_lookup=lookup, **self.properties
                )
        return self.pipelines[lookup]

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]:
        import openvino

        genai, pipeline = self.genai, self.pipeline(speculate)
        config = openvino_config(genai, sampling, eos, speculate)
        queue: Queue[int | BaseException | None] = Queue()
        stop = threading.Event()

        class Streamer(genai.StreamerBase):  # type: ignore[misc, name-defined]
            def write(self, token: int | list[int]) -> Any:
                for one in token if isinstance(token, list) else [token]:
                    queue.put(int(one))
                return genai.StreamingStatus.STOP if stop.is_set() else genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        ids = np.array([prompt_ids], dtype=np.int64)
        inputs = genai.TokenizedInputs(openvino.Tensor(ids), openvino.Tensor(np.ones_like(ids)))

        def work() -> None:
            try:
                with self.lock:
                    pipeline.generate(inputs, config, Streamer())
            except BaseException as exc:  # handed to the reader, raised there
                queue.put(exc)
            finally:
                queue.put(None)

        thread = threading.Thread(target=work, name="openvino-genai", daemon=True)
        thread.start()
        try:
            while (item := queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item in eos:
                    return
                yield item
        finally:
            stop.set()
            thread.join()


def open_engine(
    name: str, folder: Path, threads: int | None, use_gpu: bool = False
) -> GenAIEngine | OpenVinoGenAIEngine | LlamaCppEngine:
    """The engine `name` on its own folder: an onnxruntime-genai model builder's folder, an
    `openvino-genai/` folder, or a folder holding `model.gguf` (llama.cpp)."""
    with refused(name, folder):
        if name == "onnxruntime-genai":
            return GenAIEngine(folder, use_gpu=use_gpu)
        if name == "openvino-genai":
            return OpenVinoGenAIEngine(folder, threads)
        if name == "llama.cpp":
            return LlamaCppEngine(folder / "model.gguf", threads)
    raise ValueError(f"engine {name}: one of onnxruntime-genai, openvino-genai, llama.cpp")


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
