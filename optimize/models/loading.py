"""Model handles: where a model lives, what task it does, and how to load it safely.

A handle names a checkpoint folder (Hugging Face `save_pretrained` layout) and, once exported, an
ONNX file. The checkpoint folder keeps giving the tokenizer and config to every later stage.
Weights load from safetensors; pickled weights and remote code need explicit flags.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

from optimize import tasks
from optimize.errors import UsageError
from optimize.models.checkpoint import read_config
from optimize.models.gguf_input import from_gguf, packaged_gguf
from optimize.models.handle import ModelHandle
from optimize.models.lean import lean_torch
from optimize.runtime import engine_of
from optimize.runtime.engines import DEFAULT_ENGINE
from optimize.runtime.manifest import Manifest
from optimize.tasks import Task

if TYPE_CHECKING:
    import torch

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DECODER_TYPES = {"llama", "gpt2", "mistral", "qwen2", "phi", "phi3", "gemma", "gpt_neox", "opt", "falcon"}


def resolve(spec: str, base_dir: Path | None = None, gguf_root: Path | None = None) -> Path:
    """Find a checkpoint folder for `spec`: a path (relative to `base_dir` or the working folder),
    `package:MODULE` (a Python package that ships one .gguf file, or exposes `get_model_path()`),
    a .gguf file (converted once into `gguf_root`, see `from_gguf`), or a hub id, downloaded unless
    HF_HUB_OFFLINE is set."""
    if spec.startswith("package:"):
        module_name = spec.removeprefix("package:")
        gguf = packaged_gguf(module_name)
        if gguf is not None:
            return from_gguf(gguf, gguf_root)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UsageError(
                f"model {spec!r}: Python package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            ) from None
        return Path(module.get_model_path())
    candidates = [Path(spec).expanduser()]
    if base_dir is not None and not Path(spec).is_absolute():
        candidates.insert(0, base_dir / spec)
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".gguf":
            return from_gguf(candidate, gguf_root)
        if candidate.exists():
            if not (candidate / "config.json").is_file():
                raise UsageError(
                    f"model {spec!r}: {candidate} has no config.json; give a folder written by save_pretrained"
                )
            return candidate.resolve()
    if not _HUB_ID.fullmatch(spec):
        raise UsageError(f"model {spec!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as exc:  # offline, unknown repo, gated repo: all mean the same to the user
        raise UsageError(
            f"model {spec!r}: not a local folder and not reachable on the hub "
            f"({type(exc).__name__}); give a local checkpoint folder"
        ) from None


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors fit in the file (a truncated
    download or another file renamed fails here, before minutes of work)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, 100_000_000):
                raise ValueError("no safetensors header")
            header = json.loads(handle.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(f"{path}: not a readable safetensors file ({exc}); re-download or re-save it") from None
    if 8 + length + max(ends, default=0) > size:
        raise UsageError(
            f"{path}: truncated ({size} bytes, its header describes {8 + length + max(ends)}); re-download it"
        )


def detect_task(checkpoint: Path) -> Task:
    config = read_config(checkpoint)
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return tasks.CLASSIFICATION
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return tasks.GENERATION
    if config.get("model_type") in _DECODER_TYPES:
        return tasks.GENERATION
    return tasks.EMBEDDING


def peek_task(spec: str, base_dir: Path | None = None) -> str | None:
    """The task of `spec` when it can be told without loading or converting anything (for
    `--dry-run`): GGUF files are causal LMs; local folders and packages have a config.json to read.
    None for a hub id (it would need a download)."""
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    if path.suffix == ".gguf" or (spec.startswith("package:") and packaged_gguf(spec[8:]) is not None):
        return tasks.GENERATION
    folder = peek_folder(spec, base_dir)
    return detect_task(folder) if folder is not None else None


def peek_folder(spec: str, base_dir: Path | None = None) -> Path | None:
    """The local folder with `spec`'s config.json, found without loading or converting anything;
    None for a hub id or a GGUF file."""
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    folder = path.parent if path.suffix == ".onnx" else path
    if spec.startswith("package:"):
        if packaged_gguf(spec[8:]) is not None:
            return None
        try:
            folder = resolve(spec)
        except UsageError:
            return None
    return folder if (folder / "config.json").is_file() else None


def check_weights(checkpoint: Path, allow_pickle: bool) -> None:
    """Refuse pickled weights (they can run code on load) unless the user allowed them, safetensors
    files that are truncated or not safetensors at all, and a shard index naming a missing shard."""
    for index in sorted(checkpoint.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{index}: not a readable shard index ({exc}); re-download or re-save it") from None
        missing = sorted(str(name) for name in shards if not (checkpoint / str(name)).is_file())
        if missing:
            raise UsageError(
                f"{index} names {len(missing)} shard(s) that are not in the folder ({', '.join(missing[:3])}); "
                "the download is incomplete: fetch the missing files"
            )
    found = sorted(checkpoint.glob("*.safetensors"))
    for path in found:
        check_safetensors(path)
    if found:
        return
    pickled = sorted(p.name for p in checkpoint.glob("*.bin")) + sorted(p.name for p in checkpoint.glob("*.pt"))
    if pickled and not allow_pickle:
        raise UsageError(
            f"model {checkpoint}: weights are pickled ({pickled[0]}) and pickles can run code "
            "when loaded; convert to safetensors or pass --allow-pickle if you trust the source"
        )
    if not pickled:
        raise UsageError(f"model {checkpoint}: no weights found (*.safetensors)")


def open_checkpoint(
    spec: str,
    base_dir: Path | None,
    task: str | None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    gguf_root: Path | None = None,
) -> ModelHandle:
    checkpoint = resolve(spec, base_dir, gguf_root)
    check_weights(checkpoint, allow_pickle)
    if not trust_remote_code:
        check_no_remote_code(checkpoint, spec)
    found = detect_task(checkpoint)
    return ModelHandle(checkpoint, task or found, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def check_no_remote_code(checkpoint: Path, spec: str) -> None:
    """A checkpoint whose architecture exists only in code it ships (`auto_map` in config.json, a
    model_type transformers does not know) runs that code only with --trust-remote-code; without
    such code, an architecture this transformers does not know is bad input too."""
    config = read_config(checkpoint)
    from transformers import CONFIG_MAPPING, __version__

    if not config.get("auto_map"):
        if config.get("model_type") not in CONFIG_MAPPING:
            raise UsageError(
                f"model {spec!r}: {checkpoint / 'config.json'}: model_type {config.get('model_type')!r} is not an "
                f"architecture transformers {__version__} knows; upgrade transformers, or check the file"
            )
        return
    if config.get("model_type") not in CONFIG_MAPPING:
        raise UsageError(
            f"model {spec!r} ships its own model code (config.json auto_map, model_type "
            f"{config.get('model_type')!r}); running it needs --trust-remote-code (read the code first)"
        )


def open_any(
    spec: str,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base_dir: Path | None = None,
    gguf_root: Path | None = None,
) -> ModelHandle:
    """A checkpoint, an .onnx file (tokenizer and config.json beside it) or an artifact folder.

    An artifact is measured as it ships (its model.onnx), also when it carries the safetensors of a
    distilled student (which a distill stage then trains from); a checkpoint folder that happens to
    hold a model.onnx beside its safetensors stays a checkpoint."""
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    onnx_path = path if path.suffix == ".onnx" else path / "model.onnx"
    explicit = path.suffix == ".onnx" or (path / "manifest.json").is_file()
    if onnx_path.is_file() and (explicit or not any(onnx_path.parent.glob("*.safetensors"))):
        folder = onnx_path.parent
        for needed in ("config.json", "tokenizer.json"):
            if not (folder / needed).is_file():
                raise UsageError(f"model {spec!r}: {folder} has no {needed} beside the ONNX model")
        engine = _artifact_engine(folder)
        return ModelHandle(folder.resolve(), detect_task(folder), onnx_path=onnx_path.resolve(), engine=engine)
    if path.suffix == ".onnx":
        raise UsageError(f"model {spec!r}: no such file")
    return open_checkpoint(spec, base_dir, None, allow_pickle, trust_remote_code, gguf_root)


def _artifact_engine(folder: Path) -> str:
    """What runs an artifact's model.onnx (`runtime.engine_of`; onnxruntime where its manifest is unreadable)."""
    try:
        return engine_of(cast(Manifest, json.loads((folder / "manifest.json").read_text())))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return DEFAULT_ENGINE


def load_torch(model: ModelHandle, lean: bool = False) -> torch.nn.Module:
    """The checkpoint in torch (computed in fp32, eval mode). `lean`: built empty and filled a tensor
    at a time from plain reads (`lean_torch`, 16-bit weights kept in 16 bits), where transformers'
    loader holds the mapped file beside the fp32 copy (1.5 times the fp32 model at its peak); the
    same logits either way."""
    import transformers

    auto = getattr(transformers, tasks.TASKS[model.task].auto_class)
    found = lean_torch(auto, model.checkpoint) if lean and not (model.allow_pickle or model.trust_remote_code) else None
    if found is not None:
        return found.eval()
    loaded = auto.from_pretrained(
        model.checkpoint,
        use_safetensors=not model.allow_pickle,
        trust_remote_code=model.trust_remote_code,
        attn_implementation="eager",
    )
    module: torch.nn.Module = loaded.eval()
    return module
