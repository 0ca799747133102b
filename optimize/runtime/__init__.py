"""The torch-free runtime shipped in every artifact (as `runtime/`) and used by the gates.

It imports only onnxruntime, numpy, tokenizers and the standard library, so the model that ships
is run by exactly the code that measured it. `load(artifact_dir)` checks every file against the
manifest's sha256, picks execution providers (TensorRT -> CUDA -> CPU, limited to what the
artifact was compiled for and what this onnxruntime offers) and falls back when one fails.
An artifact whose manifest names an `openvino` engine (an int8 graph quantized for OpenVINO's CPU
kernels) runs with OpenVINO when it is installed, else with onnxruntime, which reads the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .generation import GenAIEngine, Sampling, chat_prompt, kv_loop, stream

if TYPE_CHECKING:
    import onnxruntime as ort

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_HINT = " (with a GPU, `pip install 'onnxruntime-gpu[cuda,cudnn]'` brings the CUDA and cuDNN libraries it needs)"
# Which providers may run a model compiled for each target, best first.
TARGET_PROVIDERS = {
    "tensorrt": PREFERENCE,
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


class ArtifactError(Exception):
    """The artifact cannot be used as it is (a tampered or missing file)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_volatile(stable: Any, moved: Any) -> Any:
    """The inverse of `split_volatile`: the manifest with its measurements put back."""
    if isinstance(stable, dict) and isinstance(moved, dict):
        merged = dict(stable)
        for k, v in moved.items():
            merged[k] = merge_volatile(stable[k], v) if k in stable else v
        return merged
    if isinstance(stable, list) and isinstance(moved, list):
        return [merge_volatile(s, m) if m else s for s, m in zip(stable, moved, strict=False)]
    return stable


# Model files the runtime may load: each must be listed (and hashed) in the manifest.
MODEL_FILES = ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json")


def verify(artifact_dir: Path) -> dict[str, Any]:
    """Check every file the manifest lists, and that every model file present is listed; returns
    the manifest with its measurements (measurements.json: timings, not hashed) merged back."""
    artifact_dir = Path(artifact_dir)
    manifest_path = artifact_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{artifact_dir}: no manifest.json; is this an optimize artifact?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not readable JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{manifest_path}: no `files` table; the manifest is damaged, refusing to load it")
    _check_files(artifact_dir, manifest_path, files)
    for key, kind in (("runtime", dict), ("stages", list), ("provenance", dict), ("name", str)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{manifest_path}: `{key}` is missing or not a {kind.__name__}; the manifest is damaged"
            )
    measurements = artifact_dir / "measurements.json"
    if measurements.is_file():
        try:
            manifest = merge_volatile(manifest, json.loads(measurements.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{measurements}: not readable JSON ({exc})") from None
    return dict(manifest)


def _check_files(artifact_dir: Path, manifest_path: Path, files: dict[str, Any]) -> None:
    """Every listed file inside the folder with its size and sha256, and every model file listed."""
    for name, entry in files.items():
        path = artifact_dir / name
        inside = path.resolve().is_relative_to(artifact_dir.resolve())
        if not inside or not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
            raise ArtifactError(f"{manifest_path}: files: {name!r} is not a file of this folder with sha256 and bytes")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest; the file was changed "
                "after the artifact was made, refusing to load it"
            )
    unlisted = [name for name in MODEL_FILES if (artifact_dir / name).exists() and name not in files]
    if unlisted or "model.onnx" not in files:
        missing = ", ".join(unlisted) or "model.onnx"
        raise ArtifactError(f"{manifest_path}: {missing} not listed in the manifest; refusing an unchecked model file")


def select_providers(available: Sequence[str], target: str = "cpu") -> list[str]:
    """Providers to try, best first: those the target allows that this onnxruntime offers."""
    allowed = TARGET_PROVIDERS.get(target, TARGET_PROVIDERS["cpu"])
    chosen = [p for p in allowed if p in available]
    return chosen or ["CPUExecutionProvider"]


def provider_options(provider: str, settings: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Options per provider, from the manifest's `runtime` section (what compile chose for the target).
    TensorRT builds its engine at the first load on the target GPU and caches it; the cache files
    are keyed by GPU architecture and TensorRT version, so one folder serves several machines."""
    if provider == "TensorrtExecutionProvider":
        return {
            "trt_fp16_enable": bool(settings.get("fp16", True)),
            "trt_int8_enable": bool(settings.get("int8", False)),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir / "trt-engines"),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir / "trt-timing"),
        }
    if provider == "CUDAExecutionProvider":
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}


@dataclass(frozen=True)
class Port:
    """An input or output as onnxruntime describes it (the fields this runtime reads)."""

    name: str
    shape: list[int | str]
    type: str


# What runs model.onnx (the manifest's `runtime.engine`) -> OpenVINO's precision for the ops left in
# float, or None where onnxruntime runs it: onnxruntime; OpenVINO in fp32; OpenVINO in bf16 (chosen
# on a CPU that computes bf16 natively); onnxruntime-genai for a decoder folder its model builder
# made (genai_config.json). Every question about an engine is asked of this table.
ENGINES: dict[str, str | None] = {
    "onnxruntime": None,
    "openvino": "f32",
    "openvino-bf16": "bf16",
    "onnxruntime-genai": None,
}


def on_openvino(engine: str) -> bool:
    """Whether OpenVINO runs the graph for this engine (an unknown name: no)."""
    return ENGINES.get(engine) is not None


class OpenVINOSession:
    """OpenVINO's CPU plugin behind the part of onnxruntime's InferenceSession this runtime uses. It
    compiles the ONNX file itself (its own fusions and int8 kernels for the QDQ pairs NNCF wrote).
    The float ops' precision is set (`INFERENCE_PRECISION_HINT`), never left to OpenVINO, whose
    default changes with the CPU: bf16 where it was measured so, fp32 otherwise.

    Input shapes that recur (fixed-length padding, steady batch sizes) get a model compiled for that
    shape after `SPECIALIZE_AFTER` calls, at most `MAX_SPECIALIZED` of them (~0.5 s and one more copy
    of the weights each). When all are taken, a shape whose recent calls weigh more than twice the
    coldest compiled shape's takes its place; a call's weight decays by `DECAY` with every later
    call. So a steady new shape gets a slot within a few calls, while shapes called in turn at equal
    rates never evict each other. Every other shape runs on the dynamic-shape model. MiniLM int8,
    L=128, our 2-core AVX-512 CPU, one run of the runtime: 6.97 vs 7.78 ms at batch 1, 187.44 vs
    196.38 ms at batch 32 (the peer: 9.55, 312.20)."""

    SPECIALIZE_AFTER = 3
    MAX_SPECIALIZED = 8
    DECAY = 0.9

    def __init__(self, model_path: Path, threads: int, precision: str = "f32"):
        import openvino

        self.core = openvino.Core()
        self.config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.model = self.core.read_model(str(model_path))
        self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [port.any_name for port in self.compiled.outputs]
        self.seen: dict[tuple[tuple[int, ...], ...], int] = {}
        self.weights: dict[tuple[tuple[int, ...], ...], tuple[float, int]] = {}  # shape: (weight, at call)
        self.calls = 0
        self.specialized: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.lock = threading.Lock()  # infer requests run one call at a time; onnxruntime's run is thread-safe

    def _request(self, feed: dict[str, np.ndarray]) -> Any:
        """The infer request for these inputs' shapes: a static-shape one for a recurring shape."""
        shape = tuple(tuple(feed[name].shape) for name in sorted(feed))
        self.seen[shape] = calls = self.seen.get(shape, 0) + 1
        self.calls += 1
        self.weights[shape] = (self._weight(shape) + 1, self.calls)
        if shape in self.specialized:
            return self.specialized[shape]
        if calls < self.SPECIALIZE_AFTER:
            return self.request
        if len(self.specialized) >= self.MAX_SPECIALIZED:
            coldest = min(self.specialized, key=self._weight)
            if self._weight(shape) <= 2 * self._weight(coldest):
                return self.request
            del self.specialized[coldest]
        model = self.model.clone()
        model.reshape({port.any_name: list(feed[port.any_name].shape) for port in model.inputs})
        self.specialized[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.specialized[shape]

    def _weight(self, shape: tuple[tuple[int, ...], ...]) -> float:
        """The shape's calls so far, each weighted DECAY ** (calls of any shape made since)."""
        weight, at = self.weights.get(shape, (0.0, self.calls))
        return weight * self.DECAY ** (self.calls - at)

    @staticmethod
    def _port(port: Any) -> Port:
        shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return Port(port.any_name, shape, f"tensor({port.get_element_type().to_string()})")

    def get_inputs(self) -> list[Port]:
        return [self._port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[Port]:
        return [self._port(p) for p in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return ["OpenVINO (CPU)"]

    def run(self, names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        indices = range(len(self.output_names)) if names is None else [self.output_names.index(n) for n in names]
        with self.lock:
            request = self._request(feed)
            # The request reads the caller's arrays in place (no copy in); outputs are copied out, as
            # the request reuses its buffers on the next call.
            request.infer(feed, share_inputs=True, share_outputs=True)
            return [request.get_output_tensor(i).data.copy() for i in indices]


OPENVINO_MISSING = (
    "openvino: not installed; onnxruntime runs this OpenVINO-tuned int8 graph instead (the same graph; "
    "slower on it): `pip install openvino` for the speed it was chosen for"
)


def make_session(
    model_path: Path,
    target: str = "cpu",
    threads: int | None = None,
    available: Sequence[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[ort.InferenceSession | OpenVINOSession, list[str]]:
    """An InferenceSession on the best provider that actually starts; falls back down the list.
    Returns the session and a note per provider that was tried and could not be used. The
    `openvino` engines (settings) run on OpenVINO when it imports, else on onnxruntime's CPU."""
    import onnxruntime as ort

    notes: list[str] = []
    threads = threads or os.cpu_count() or 1
    engine = str((settings or {}).get("engine", "onnxruntime"))
    precision = ENGINES.get(engine)
    if precision is not None:
        try:
            return OpenVINOSession(model_path, threads, precision), notes
        except ImportError:
            notes.append(OPENVINO_MISSING)
        except Exception as exc:  # OpenVINO present but unable to compile the graph on this machine
            notes.append(f"openvino: {str(exc).splitlines()[0][:200]}; onnxruntime runs the graph instead")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    providers = select_providers(available if available is not None else ort.get_available_providers(), target)
    cache_dir = Path(os.environ.get("OPTIMIZE_RUNTIME_CACHE", Path.home() / ".cache" / "optimize-runtime"))
    for i, provider in enumerate(providers):
        chain = [(p, provider_options(p, settings or {}, cache_dir)) for p in providers[i:]]
        try:
            session = ort.InferenceSession(str(model_path), options, providers=chain)
        except Exception as exc:  # a provider whose device or libraries are missing fails here
            notes.append(
                f"{provider}: {str(exc).splitlines()[0][:200]}{GPU_HINT if provider != PREFERENCE[-1] else ''}"
            )
            continue
        if session.get_providers()[0] == provider:
            return session, notes
        # onnxruntime fell back silently (e.g. the GPU build on a machine without a GPU)
        notes.append(f"{provider}: not usable on this machine")
    raise RuntimeError("no execution provider could load the model: " + "; ".join(notes))


class Tokenizer:
    """tokenizer.json with truncation to `seq_len` and padding to the longest text (or `pad_to`)."""

    def __init__(self, path: Path, seq_len: int = 128):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.seq_len = seq_len
        padding = self._tok.padding or {}
        self.pad_id = int(padding.get("pad_id", 0))
        self.pad_token = str(padding.get("pad_token", "[PAD]"))

    def ids(self, text: str, special: bool = False) -> list[int]:
        """Token ids of one long text, neither truncated nor padded (for perplexity and prompts)."""
        self._tok.no_truncation()
        self._tok.no_padding()
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        self._tok.enable_truncation(max_length=self.seq_len)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, length=pad_to)
        encodings = self._tok.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled: np.ndarray = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return pooled


# sentence-transformers' Pooling config flags -> our names for them
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class Pooling:
    """How a sentence-embedding model turns token states into one vector, as its authors shipped it
    (sentence-transformers' `modules.json`: a Pooling module, maybe a Normalize); mean pooling
    without normalization when the folder has no such files."""

    mode: str = "mean"
    normalize: bool = False

    @classmethod
    def of(cls, folder: Path) -> Pooling:
        path = Path(folder) / "modules.json"
        if not path.is_file():
            return cls()
        mode, normalize = "mean", False
        for module in json.loads(path.read_text()):
            kind = str(module.get("type", ""))
            if kind.endswith("Pooling"):
                config = json.loads((Path(folder) / module["path"] / "config.json").read_text())
                modes = [name for key, name in POOLING_MODES.items() if config.get(key, key.endswith("mean_tokens"))]
                if len(modes) != 1:
                    raise ValueError(f"{folder}: pooling modes {modes} combined; one mode is supported")
                mode = modes[0]
            elif kind.endswith("Normalize"):
                normalize = True
        return cls(mode, normalize)

    def __call__(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        real = mask[..., None].astype(bool)
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "lasttoken":  # right padding: the last real token
            pooled = hidden[np.arange(len(hidden)), np.maximum(mask.sum(axis=1) - 1, 0)]
        elif self.mode == "max":
            pooled = np.where(real, hidden, -1e9).max(axis=1)
        elif self.mode == "mean_sqrt_len":
            pooled = (hidden * real).sum(axis=1) / np.sqrt(np.clip(real.sum(axis=1), 1, None))
        else:
            pooled = mean_pool(hidden, mask)
        if self.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return np.asarray(pooled, dtype=np.float32)


def model_seq_len(folder: Path, seq_len: int) -> int:
    """`seq_len`, or the shorter `max_seq_length` a sentence-transformers model was trained with."""
    path = Path(folder) / "sentence_bert_config.json"
    longest = json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None
    return min(seq_len, int(longest)) if longest else seq_len


def embed(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    pooling: Pooling = Pooling(),
) -> np.ndarray:
    """Sentence embeddings: the last hidden states over real (unpadded) tokens, pooled."""
    out = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start : start + batch_size])
        out.append(pooling(run(inputs), inputs["attention_mask"]))
    return np.concatenate(out).astype(np.float32)


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
        settings: dict[str, Any] | None = None,
    ):
        self.session, self.fallbacks = make_session(model_path, target, threads, available, settings)
        self.tokenizer = Tokenizer(tokenizer_path, model_seq_len(Path(tokenizer_path).parent, seq_len))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        config_path = Path(model_path).parent / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.pooling = Pooling.of(Path(tokenizer_path).parent)
        self.folder = Path(model_path).parent
        self._genai: Any = None  # the onnxruntime-genai engine, opened on the first generate

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

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
    ) -> str:
        """Continue `prompt` (greedy unless `temperature` > 0; a `seed` makes sampling repeatable),
        ending at the end-of-sequence token, `max_new_tokens` or before the first `stop` string.
        `on_text` receives each new piece of text as it comes (streaming); `chat` wraps the prompt in
        the model's chat template as one user turn. Artifacts built by onnxruntime-genai generate
        through it; exported graphs through this runtime's KV-cache loop."""
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop))
        eos = self.config.get("eos_token_id")
        ends = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids = self.tokenizer.ids(chat_prompt(self.folder, prompt) if chat else prompt, special=not chat)
        if (self.folder / "genai_config.json").is_file():
            if self._genai is None:
                self._genai = GenAIEngine(self.folder, use_gpu=self.provider != "CPUExecutionProvider")
            tokens = self._genai.tokens(ids, sampling, ends)
        elif self.cache_inputs:
            tokens = kv_loop(self._step, ids, sampling, ends)
        else:
            raise ValueError("this model was not exported for generation (no past_key_values inputs)")
        return stream(tokens, self.tokenizer.decode, sampling, on_text or (lambda piece: None))

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


def tuning_warning(tuned_on: dict[str, Any], flags: frozenset[str]) -> str | None:
    """What to tell a user whose CPU lacks instruction sets the artifact was tuned with (its int8
    formulation and graph were chosen by timing there), or None."""
    missing = sorted((set(tuned_on.get("flags", [])) & TUNING_FLAGS) - flags)
    if not missing:
        return None
    return (
        f"this artifact was tuned on {tuned_on.get('model', 'another CPU')} with {', '.join(missing)}, which this "
        "CPU lacks: its formulation may not be the fastest here; rerun the recipe on this CPU to tune for it"
    )


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
    return OnnxModel(
        artifact_dir / "model.onnx",
        artifact_dir / "tokenizer.json",
        seq_len=int(runtime.get("seq_len", 128)),
        target=str(runtime.get("target", "cpu")),
        available=available,
        settings=runtime,
    )
