"""An exported model in onnxruntime (or OpenVINO), with its tokenizer and config: `embed(texts)` for
feature extraction, `classify(texts)` for sequence classifiers; generation (`generate`, `tokens`) is
`Generation`'s, for the graphs of causal LMs and the engines' folders beside them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engines import Generating
from .generating import Generation
from .manifest import RuntimeSettings
from .session import make_session
from .text import Pooling, Tokenizer, embed, model_seq_len


class OnnxModel(Generation):
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
        self._engines: dict[str, Generating] = {}  # opened when first used
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
