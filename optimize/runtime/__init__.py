"""The torch-free runtime shipped in every artifact (as `runtime/`) and used by the gates.

It imports only onnxruntime, numpy, tokenizers and the standard library, so the model that ships
is run by exactly the code that measured it. `load(artifact_dir)` checks every file against the
manifest's sha256, picks execution providers (TensorRT -> CUDA -> CPU, limited to what the
artifact was compiled for and what this onnxruntime offers) and falls back when one fails.
An artifact whose manifest names an `openvino` engine (an int8 graph quantized for OpenVINO's CPU
kernels) runs with OpenVINO when it is installed, else with onnxruntime, which reads the same file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .generation import (
    ContinuousBatching,
    GenAIEngine,
    LlamaCppEngine,
    OpenVinoGenAIEngine,
    Sampling,
    chat_prompt,
    kv_loop,
    open_engine,
    stream,
)
from .manifest import CpuSummary, Manifest, RuntimeSettings
from .session import (
    ENGINES,
    GPU_HINT,
    OPENVINO_MISSING,
    PREFERENCE,
    TARGET_PROVIDERS,
    OpenVINOSession,
    Port,
    family,
    make_session,
    on_openvino,
    provider_options,
    select_providers,
)
from .text import Pooling, Tokenizer, embed, mean_pool, model_seq_len
from .verify import ArtifactError, merge_volatile, sha256_file, verify

GGUF_FILE = "gguf/model.gguf"  # an artifact's GGUF (llama.cpp, Ollama), where its recipe wrote one
OPENVINO_GENAI_FILE = Path("openvino-genai/openvino_model.xml")  # OpenVINO GenAI's folder, where written
# Each generating engine's folder in an artifact (`open_engine` opens it)
ENGINE_FOLDERS = {
    "onnxruntime-genai": Path(),
    "openvino-genai": OPENVINO_GENAI_FILE.parent,
    "llama.cpp": Path(GGUF_FILE).parent,
}

__all__ = [
    "ENGINES",
    "GGUF_FILE",
    "GPU_HINT",
    "OPENVINO_GENAI_FILE",
    "OPENVINO_MISSING",
    "PREFERENCE",
    "TARGET_PROVIDERS",
    "ArtifactError",
    "ContinuousBatching",
    "GenAIEngine",
    "LlamaCppEngine",
    "Manifest",
    "OnnxModel",
    "OpenVINOSession",
    "OpenVinoGenAIEngine",
    "Pooling",
    "Port",
    "RuntimeSettings",
    "Sampling",
    "Tokenizer",
    "chat_prompt",
    "cpu_info",
    "embed",
    "family",
    "kv_loop",
    "load",
    "make_session",
    "mean_pool",
    "merge_volatile",
    "model_seq_len",
    "on_openvino",
    "openvino_file_of",
    "provider_options",
    "select_providers",
    "sha256_file",
    "stream",
    "tuning_warning",
    "verify",
]


class OnnxModel:
    """An ONNX model with its tokenizer and config: `embed(texts)` for feature extraction,
    `classify(texts)` for sequence classifiers, `generate(prompt)` for causal LMs."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        seq_len: int = 128,
        target: str = "cpu",
        threads: int | None = None,
        available: Sequence[str] | None = None,
        settings: RuntimeSettings | None = None,
        openvino_path: Path | None = None,
    ):
        self.model_path = Path(model_path)
        self.session, self.fallbacks = make_session(model_path, target, threads, available, settings, openvino_path)
        self.tokenizer = Tokenizer(tokenizer_path, model_seq_len(Path(tokenizer_path).parent, seq_len))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        # A decoder exported without a cache (its cache is not keys and values): logits at every
        # position, the whole sequence run again for each token (the slower route)
        first = self.session.get_outputs()[0]
        self.whole_sequence = not self.cache_inputs and first.name == "logits" and len(first.shape) == 3
        config_path = Path(model_path).parent / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.pooling = Pooling.of(Path(tokenizer_path).parent)
        self.folder = Path(model_path).parent
        self._engines: dict[str, GenAIEngine | LlamaCppEngine | OpenVinoGenAIEngine] = {}  # opened when first used
        self._threads, self.settings = threads, settings or {}

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def file(self) -> Path:
        """The model file the session runs (model.onnx, or the artifact's OpenVINO file)."""
        return Path(getattr(self.session, "path", self.model_path))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The first output (last hidden states, or logits) for tokenized inputs. A decoder exported
        with a KV cache gets its positions and an empty cache filled in, so it scores whole texts."""
        return np.asarray(self.session.run(None, self._feed(inputs))[0])

    def _feed(self, inputs: dict[str, np.ndarray], past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names if name in inputs}
        mask = inputs["attention_mask"]
        if "position_ids" in self.input_names and "position_ids" not in inputs:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feed["position_ids"] = positions[:, -inputs["input_ids"].shape[1] :].astype(np.int64)
        for spec in self.cache_inputs:
            if past is not None:
                feed[spec.name] = past[spec.name]
            else:  # an empty cache: batch x heads x 0 positions x head size
                heads, head_dim = (d if isinstance(d, int) else 0 for d in (spec.shape[1], spec.shape[3]))
                if not head_dim:  # a symbolic size (onnxruntime-genai's graphs): from the config
                    config = self.config
                    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
                dtype = np.float16 if "float16" in spec.type else np.float32
                feed[spec.name] = np.zeros((mask.shape[0], heads, 0, head_dim), dtype=dtype)
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise ValueError(f"the model needs inputs this runtime cannot make: {', '.join(missing)}")
        return feed

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return embed(self.run, self.tokenizer, texts, batch_size, self.pooling)

    def classify(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, object]]:
        """For a sequence classifier: the label and the softmax score per text."""
        labels = self.config.get("id2label") or {}
        out: list[dict[str, object]] = []
        for start in range(0, len(texts), batch_size):
            logits = self.run(self.tokenizer(texts[start : start + batch_size])).astype(np.float64)
            if logits.ndim != 2:
                raise ValueError(
                    "this model is not a sequence classifier (it does not give one row of logits per text)"
                )
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            for row in probs:
                best = int(row.argmax())
                out.append({"label": labels.get(str(best), str(best)), "score": round(float(row[best]), 6)})
        return out

    def generators(self) -> list[str]:
        """The engines that can generate from this artifact here, the fastest the genai stage measured
        first (`runtime.generators` in the manifest), the one `generate` uses first:
        onnxruntime-genai (its model builder's folder), OpenVINO GenAI (`openvino-genai/`, with
        openvino-genai), llama.cpp (`gguf/model.gguf`, with llama-cpp-python), onnxruntime (a graph
        exported with past key values, or over the whole sequence)."""
        from importlib.util import find_spec

        found = []
        genai = (self.folder / "genai_config.json").is_file()
        if genai and find_spec("onnxruntime_genai") is not None:
            found.append("onnxruntime-genai")
        if (self.folder / OPENVINO_GENAI_FILE).is_file() and find_spec("openvino_genai") is not None:
            found.append("openvino-genai")
        if (self.folder / GGUF_FILE).is_file() and find_spec("llama_cpp") is not None:
            found.append("llama.cpp")
        if (self.cache_inputs or self.whole_sequence) and not genai:
            found.append("onnxruntime")
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
        if name == "onnxruntime":
            return kv_loop(self._step_whole if self.whole_sequence else self._step, ids, sampling, ends)
        return self.engine(name).tokens(ids, sampling, ends, speculate)

    def engine(self, name: str) -> GenAIEngine | LlamaCppEngine | OpenVinoGenAIEngine:
        """The engine `name` on its folder, loaded when first asked (an ArtifactError if it cannot)."""
        if name not in self._engines:
            folder = self.folder / ENGINE_FOLDERS[name]
            gpu = self.provider != "CPUExecutionProvider"
            self._engines[name] = open_engine(name, folder, self._threads, use_gpu=gpu)
        return self._engines[name]

    def ends(self) -> set[int]:
        """The end-of-sequence tokens (the config's)."""
        eos = self.config.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def continuous_batching(self) -> ContinuousBatching:
        """OpenVINO GenAI's continuous batching on `openvino-genai/` (what `serve` decodes with)."""
        self.generator("openvino-genai")  # a clear error when the folder or the package is missing
        return ContinuousBatching(self.folder / ENGINE_FOLDERS["openvino-genai"], self._threads)

    def generator(self, engine: str = "auto") -> str:
        """The engine `generate(engine=...)` runs, or a ValueError that says what is missing."""
        found = self.generators()
        if engine in found or (engine == "auto" and found):
            return found[0] if engine == "auto" else engine
        needs = {
            "onnxruntime-genai": ("genai_config.json", "onnxruntime-genai"),
            "openvino-genai": (str(OPENVINO_GENAI_FILE), "openvino-genai"),
            "llama.cpp": (GGUF_FILE, "llama-cpp-python"),
        }
        if engine not in (*needs, "onnxruntime", "auto"):
            raise ValueError(f"engine {engine}: one of auto, {', '.join(needs)}, onnxruntime")
        missing = [
            package
            for name, (file, package) in needs.items()
            if engine in ("auto", name) and (self.folder / file).is_file()
        ]
        if missing:
            raise ValueError(f"generating from this artifact needs {' or '.join(missing)} (pip install {missing[0]})")
        if engine in needs:
            raise ValueError(f"engine {engine}: this artifact has no {needs[engine][0]}")
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


def cpu_info() -> tuple[str, frozenset[str]]:
    """This machine's CPU name and instruction-set flags from /proc/cpuinfo (Linux); elsewhere the
    platform's name and no flags."""
    import platform

    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


# The instruction sets a formulation's speed (and int8's safety) depends on; bf16 flags do not matter here.
TUNING_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}


def tuning_warning(tuned_on: CpuSummary, flags: frozenset[str]) -> str | None:
    """What to tell a user whose CPU lacks instruction sets the artifact was tuned with (its int8
    formulation and graph were chosen by timing there), or None."""
    missing = sorted((set(tuned_on.get("flags", [])) & TUNING_FLAGS) - flags)
    if not missing:
        return None
    return (
        f"this artifact was tuned on {tuned_on.get('model', 'another CPU')} with {', '.join(missing)}, which this "
        "CPU lacks: its formulation may not be the fastest here; rerun the recipe on this CPU to tune for it"
    )


def openvino_file_of(manifest: Manifest) -> str | None:
    """The artifact's file for OpenVINO (its IR), as the manifest's `engines` lists it, if any."""
    return next((e["file"] for e in manifest.get("engines", []) if on_openvino(e["engine"])), None)


def load(artifact_dir: str | Path, available: Sequence[str] | None = None) -> OnnxModel:
    """Verify an artifact and open it on the best provider it was compiled for; warns when this CPU
    lacks what the artifact was tuned for."""
    import warnings

    artifact_dir = Path(artifact_dir)
    manifest = verify(artifact_dir)
    runtime = manifest.get("runtime", {})
    warning = tuning_warning(runtime["tuned_on"], cpu_info()[1]) if isinstance(runtime.get("tuned_on"), dict) else None
    if warning:
        warnings.warn(warning, stacklevel=2)
    # Each engine's file, fastest first: the runtime's engine (`runtime.engine`) is the fastest measured;
    # model.onnx is onnxruntime's, and where OpenVINO is not installed it runs that instead.
    # Where model.onnx is not onnxruntime's own file it is OpenVINO's graph itself, which OpenVINO reads.
    listed = {e["file"] for e in manifest.get("engines", [])}
    openvino_file = openvino_file_of(manifest) if "model.onnx" in listed else None
    return OnnxModel(
        artifact_dir / "model.onnx",
        artifact_dir / "tokenizer.json",
        seq_len=int(runtime.get("seq_len", 128)),
        target=str(runtime.get("target", "cpu")),
        available=available,
        settings=runtime,
        openvino_path=artifact_dir / openvino_file if openvino_file else None,
    )
