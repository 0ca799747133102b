"""OpenVINO GenAI's engine: generates from an artifact's `openvino-genai/` folder (a stateful IR)
through LLMPipeline, and its continuous batching, which `serve` decodes concurrent streams with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Queue

import numpy as np

from .decoding import Sampling, refused
from .untyped import OvObject


def openvino_properties(threads: int | None) -> dict[str, object]:
    """What every OpenVINO GenAI pipeline here compiles with, the gate's included: float ops in f32.
    OpenVINO's CPU default is bf16 where the CPU has AVX-512 BF16 or AMX (f32 elsewhere), which
    moved a random Llama's logits by 0.87 where f32 keeps them within 1e-3 of the checkpoint's, and
    the IR's runtime options cannot name it as they name the KV cache (compile_model ignores an
    INFERENCE_PRECISION_HINT there): so it is said here, and the verdict is the same on every CPU."""
    properties: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


def openvino_config(genai: OvObject, sampling: Sampling, eos: set[int], lookup: bool = False) -> OvObject:
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

    def add(self, prompt_ids: list[int], sampling: Sampling, eos: set[int]) -> OvObject:
        """A request's handle (`read` it after each `step`; `cancel()` drops it)."""
        import openvino

        self.added += 1
        ids = openvino.Tensor(np.array([prompt_ids], dtype=np.int64))
        return self.pipeline.add_request(self.added, ids, openvino_config(self.genai, sampling, eos))

    def step(self) -> None:
        self.pipeline.step()

    def read(self, handle: OvObject, eos: set[int]) -> tuple[list[int], bool]:
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
        self.pipelines: dict[bool, OvObject] = {}  # prompt lookup or not -> its pipeline (made when first asked)
        self.lock = threading.Lock()

    def pipeline(self, lookup: bool) -> OvObject:
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
            def write(self, token: int | list[int]) -> OvObject:
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
