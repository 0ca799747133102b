"""A checkpoint folder's files: its config.json (the one reader), the tokenizer, config and
sentence-transformers files that travel with a model (listed once), and the one hash of a folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from optimize.errors import UsageError
from optimize.runtime.untyped import Json


def read_config(checkpoint: Path) -> Json:
    """config.json as a dict, or one clear error naming the file."""
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"model {checkpoint}: no config.json; give a folder written by save_pretrained") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"model {checkpoint}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"model {checkpoint}: config.json holds {type(config).__name__}, not an object")
    return config


# A fast tokenizer as transformers saves it: what every format written from a checkpoint keeps.
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Beside it: the config, how it generates, and its chat template.
CONFIG = ("config.json", "generation_config.json")
# Everything an artifact copies from its checkpoint: the tokenizer in any of its forms, the config.
TOKENIZER_FILES = (
    *TOKENIZER,
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
    "config.json",
    "generation_config.json",
    "genai_config.json",  # an onnxruntime-genai model folder (optimize/stages/genai.py)
    "chat_template.jinja",
)


# What sentence-transformers reads beside the weights (pooling, normalization, its own config).
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
    "2_Normalize",
    "2_Dense",  # a distilled student's projection to its teacher's width (optimize/models/projection.py)
)


def copy_checkpoint_files(source: Path, target: Path, extra: Sequence[str] = ()) -> None:
    """The tokenizer, config and sentence-transformers files of a checkpoint folder (and `extra`),
    with every module folder its `modules.json` names (the runtime reads the pooling from there)."""
    modules = source / "modules.json"
    listed = [str(m["path"]) for m in json.loads(modules.read_text()) if m.get("path")] if modules.is_file() else []
    copy_present(source, target, dict.fromkeys((*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES, *listed, *extra)))


def copy_present(source: Path, target: Path, names: Iterable[str]) -> None:
    """Each of `names` (a file or a folder) that `source` has, copied into `target`."""
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copyfile(path, target / name)


def folder_sha256(folder: Path, pattern: str = "*") -> str:
    """One hash over the files of a folder matching `pattern` (their names and bytes), in a stable
    order: a checkpoint's content (the cache key and the manifest's provenance), optimize's source."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file() and ".cache" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
