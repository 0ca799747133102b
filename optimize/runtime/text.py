"""Text in, vectors out: the tokenizer (fast `tokenizers`, padded and truncated as the model
ships), sentence pooling as its sentence-transformers files say, and batched embedding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
