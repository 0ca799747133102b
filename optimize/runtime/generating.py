"""Generation from an artifact: which engines can generate from it here (onnxruntime-genai's folder,
OpenVINO GenAI's, the GGUF in llama.cpp, or the ONNX graph itself through the runtime's own KV-cache
loop), the one to use, and the tokens and text they give. `OnnxModel` takes it as its base."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .decoding import Sampling, chat_prompt, kv_loop, stream
from .engine_openvino_genai import ContinuousBatching
from .engines import BATCHING, BUILDER, ENGINES, GENERATING, OWN_LOOP, Generating, open_engine
from .manifest import RuntimeSettings
from .text import Tokenizer
from .untyped import Json, OrtObject

if TYPE_CHECKING:
    import onnxruntime as ort


class Generation:
    """What generating needs of the model it is a base of (set by `OnnxModel.__init__`)."""

    session: ort.InferenceSession
    tokenizer: Tokenizer
    folder: Path
    config: Json  # config.json as read
    settings: RuntimeSettings
    output_names: list[str]
    cache_inputs: list[OrtObject]  # the cache's inputs (NodeArg)
    whole_sequence: bool
    _engines: dict[str, Generating]
    _threads: int | None

    @property
    def provider(self) -> str:
        raise NotImplementedError

    def _feed(self, inputs: dict[str, np.ndarray], past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def generators(self) -> list[str]:
        """The engines that can generate from this artifact here, the fastest the genai stage measured
        first (`runtime.generators` in the manifest), the one `generate` uses first:
        onnxruntime-genai (its model builder's folder), OpenVINO GenAI (`openvino-genai/`, with
        openvino-genai), llama.cpp (`gguf/model.gguf`, with llama-cpp-python), onnxruntime (a graph
        exported with past key values, or over the whole sequence)."""
        from importlib.util import find_spec

        present = [ENGINES[name] for name in GENERATING if (self.folder / ENGINES[name].opens).is_file()]
        found = [e.name for e in present if e.module and find_spec(e.module) is not None]
        # the graph of onnxruntime-genai's folder is that engine's own: the runtime's loop does not run it
        builders = (self.folder / ENGINES[BUILDER].opens).is_file()
        if (self.cache_inputs or self.whole_sequence) and not builders:
            found.append(OWN_LOOP)
        measured = list(self.settings.get("generators", []))  # the stage's timing, fastest first
        return sorted(found, key=lambda name: measured.index(name) if name in measured else len(measured))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        chat: bool = False,
        engine: str = "auto",
        speculate: bool = False,
    ) -> str:
        """Continue `prompt` (greedy unless `temperature` > 0; a `seed` makes sampling repeatable),
        ending at the end-of-sequence token, `max_new_tokens` or before the first `stop` string.
        `on_text` receives each new piece of text as it comes (streaming); `chat` wraps the prompt in
        the model's chat template as one user turn. `engine` is one of `generators()` (auto: the
        first). Every engine is fed the artifact's own tokens and decoded by its own tokenizer.
        `speculate`: prompt-lookup drafts checked several tokens per pass (onnxruntime-genai; see
        `GenAIEngine` for when its output equals one-token decoding and what it gained here)."""
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop))
        ids = self.prompt_ids(prompt, chat)
        tokens = self.tokens(ids, sampling, engine, speculate)
        return stream(tokens, self.tokenizer.decode, sampling, on_text or (lambda piece: None))

    def prompt_ids(self, prompt: str | Sequence[dict[str, str]], chat: bool = False) -> list[int]:
        """The tokens of `prompt`: as written (special tokens in it read as such), or with `chat`
        (or given as messages) rendered in the model's chat template first."""
        if chat or not isinstance(prompt, str):
            return self.tokenizer.ids(chat_prompt(self.folder, prompt), special=False)
        return self.tokenizer.ids(prompt, special=True)

    def tokens(
        self, ids: list[int], sampling: Sampling, engine: str = "auto", speculate: bool = False
    ) -> Iterator[int]:
        """The generated tokens after `ids`, one at a time, until the end of sequence or
        `sampling.max_new_tokens` (stop strings are the caller's: see `stream`)."""
        ends = self.ends()
        name = self.generator(engine)
        if name == OWN_LOOP:
            return kv_loop(self._step_whole if self.whole_sequence else self._step, ids, sampling, ends)
        return self.engine(name).tokens(ids, sampling, ends, speculate)

    def engine(self, name: str) -> Generating:
        """The engine `name` on its folder, loaded when first asked (an ArtifactError if it cannot)."""
        if name not in self._engines:
            folder = self.folder / ENGINES[name].path
            gpu = self.provider != "CPUExecutionProvider"
            self._engines[name] = open_engine(name, folder, self._threads, use_gpu=gpu)
        return self._engines[name]

    def ends(self) -> set[int]:
        """The end-of-sequence tokens (the config's)."""
        eos = self.config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def continuous_batching(self) -> ContinuousBatching:
        """OpenVINO GenAI's continuous batching on `openvino-genai/` (what `serve` decodes with)."""
        self.generator(BATCHING)  # a clear error when the folder or the package is missing
        return ContinuousBatching(self.folder / ENGINES[BATCHING].path, self._threads)

    def generator(self, engine: str = "auto") -> str:
        """The engine `generate(engine=...)` runs, or a ValueError that says what is missing."""
        found = self.generators()
        if engine in found or (engine == "auto" and found):
            return found[0] if engine == "auto" else engine
        if engine not in (*GENERATING, OWN_LOOP, "auto"):
            raise ValueError(f"engine {engine}: one of auto, {', '.join(GENERATING)}, {OWN_LOOP}")
        present = [ENGINES[name] for name in GENERATING if engine in ("auto", name)]
        missing = [str(e.package) for e in present if (self.folder / e.opens).is_file()]
        if missing:
            raise ValueError(f"generating from this artifact needs {' or '.join(missing)} (pip install {missing[0]})")
        if engine in GENERATING:
            raise ValueError(f"engine {engine}: this artifact has no {ENGINES[engine].opens}")
        raise ValueError("this model was not exported for generation (it gives no logits per position)")

    def stepped_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at each of `ids` as generation computes them: the first half in one pass, then one
        token at a time through the cache each pass returns (positions x vocabulary)."""
        step = self._step_whole if self.whole_sequence else self._step
        half = max(1, len(ids) // 2)
        logits, past = step(np.array([ids[:half]], dtype=np.int64), None)
        rows = [logits[0]]
        for token in ids[half:]:
            logits, past = step(np.array([[token]], dtype=np.int64), past)
            rows.append(logits[0])
        return np.concatenate(rows)

    def _step_whole(
        self, ids: np.ndarray, past: dict[str, np.ndarray] | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass over every token so far (a graph without a cache): the new tokens'
        logits, and the tokens so far as the "cache" the next step extends."""
        seen = ids if past is None else np.concatenate([past["input_ids"], ids], axis=1)
        logits = self.session.run(None, {"input_ids": seen, "attention_mask": np.ones_like(seen)})[0]
        return logits[:, -ids.shape[1] :], {"input_ids": seen}

    def _step(self, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass with the cache: logits, and the cache for the next step."""
        seen = next(iter(past.values())).shape[2] if past else 0
        mask = np.ones((1, seen + ids.shape[1]), dtype=np.int64)
        outputs = self.session.run(None, self._feed({"input_ids": ids, "attention_mask": mask}, past))
        # present.N.key / present.N.value come back as the next step's past_key_values.N.*
        cache = {
            n.replace("present", "past_key_values", 1): v
            for n, v in zip(self.output_names, outputs, strict=True)
            if n.startswith("present")
        }
        return outputs[0], cache
