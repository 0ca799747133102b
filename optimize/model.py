"""Model handles: where a model lives, what task it does, and how to load it safely.

A handle names a checkpoint folder (Hugging Face `save_pretrained` layout) and, once exported, an
ONNX file. The checkpoint folder keeps giving the tokenizer and config to every later stage.
Weights load from safetensors; pickled weights and remote code need explicit flags.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize import tasks
from optimize.errors import UsageError
from optimize.tasks import Task

if TYPE_CHECKING:
    import gguf
    import torch

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DECODER_TYPES = {"llama", "gpt2", "mistral", "qwen2", "phi", "phi3", "gemma", "gpt_neox", "opt", "falcon"}


@dataclass(frozen=True)
class ModelHandle:
    checkpoint: Path  # folder with config.json and tokenizer files
    task: str
    onnx_path: Path | None = None  # set once the model is exported
    allow_pickle: bool = False
    trust_remote_code: bool = False
    engine: str = "onnxruntime"  # what runs the ONNX file: one of runtime.ENGINES

    def with_onnx(self, path: Path, engine: str | None = None) -> ModelHandle:
        return dataclasses.replace(self, onnx_path=path, engine=engine or self.engine)

    def with_checkpoint(self, folder: Path) -> ModelHandle:
        """A new checkpoint (a distilled student): no ONNX file yet, weights from safetensors."""
        return dataclasses.replace(self, checkpoint=folder, onnx_path=None, allow_pickle=False, engine="onnxruntime")

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None


def resolve(spec: str, base_dir: Path | None = None, gguf_root: Path | None = None) -> Path:
    """Find a checkpoint folder for `spec`: a path (relative to `base_dir` or the working folder),
    `package:MODULE` (a Python package that ships one .gguf file, or exposes `get_model_path()`),
    a .gguf file (converted once into `gguf_root`, see `from_gguf`), or a hub id, downloaded unless
    HF_HUB_OFFLINE is set."""
    if spec.startswith("package:"):
        module_name = spec.removeprefix("package:")
        gguf = _packaged_gguf(module_name)
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


def _packaged_gguf(module_name: str) -> Path | None:
    """The one .gguf file a package ships, found without importing it (some model packages import
    heavy or unwanted dependencies in their `__init__`)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if len(files) == 1 else None


# Beside a checkpoint converted from a GGUF: that file's header (tokenizer, hyperparameters, chat
# template) as a GGUF without tensors, which `gguf_format.write` gives the GGUF it writes.
GGUF_HEADER = "gguf-metadata.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("OPTIMIZE_CACHE_DIR", Path.home() / ".cache" / "optimize"))


def from_gguf(path: Path, root: Path | None = None) -> Path:
    """A GGUF file (llama.cpp's format) as a safetensors checkpoint folder, converted once by
    transformers (which dequantizes the weights to fp32) into `root` (default: the cache's `gguf/`
    folder, which `optimize cache clear` empties) under the file's hash. GGUF holds no code, so no
    flag is needed to load it."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    folder = (root or cache_root() / "gguf") / digest.hexdigest()[:24]
    if (folder / "config.json").is_file():
        if not (folder / GGUF_HEADER).is_file():  # converted before the header was kept
            save_gguf_header(path, folder)
        return folder
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UsageError(f"model {path}: reading GGUF needs the gguf package (pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:  # cut short, corrupt, unknown
            raise UsageError(
                f"model {path}: transformers cannot read this GGUF file ({type(exc).__name__}: "
                f"{str(exc)[:200]}); re-download it, or convert it with llama.cpp's tools"
            ) from None
        # transformers 5 marks a model read from GGUF as quantized by its GGUF reader, which refuses
        # to save; the weights are plain fp32 tensors by now, saved as any checkpoint's.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(staging)
        save_gguf_header(path, staging)  # its tokenizer and hyperparameters, to write a GGUF again
        (staging / "SOURCE").write_text(
            f"converted from {path.name} (sha256 {digest.hexdigest()}); "
            "the weights are the GGUF's, dequantized to fp32\n"
        )
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_gguf_header(source: Path, folder: Path) -> None:
    """The header of the GGUF file `source` as a GGUF file without tensors in `folder`, so a GGUF
    can be written later with the same tokenizer and hyperparameters."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(folder / GGUF_HEADER, arch=str(reader.fields["general.architecture"].contents()))
    copy_header(reader, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def copy_header(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: tuple[str, ...] = ()) -> None:
    """Every key of `reader`'s header into `writer`'s but `skip` and those the writer sets itself."""
    import gguf

    for field in reader.fields.values():
        if field.name in ("general.architecture", *skip) or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def read_config(checkpoint: Path) -> dict[str, Any]:
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
    if path.suffix == ".gguf" or (spec.startswith("package:") and _packaged_gguf(spec[8:]) is not None):
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
        if _packaged_gguf(spec[8:]) is not None:
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
    """What runs an artifact's model.onnx: the engine its manifest lists for that file (an artifact
    with one file per engine), else the one its `runtime` names (onnxruntime when it says nothing)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        listed = {e["file"]: e["engine"] for e in manifest.get("engines", [])}
        return str(listed.get("model.onnx") or manifest.get("runtime", {}).get("engine", "onnxruntime"))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return "onnxruntime"


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


WIDENED_ROWS = 8192  # a 16-bit output layer wider than this is widened this many rows at a time


def _in_slices(layer: Any, widen: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A wide 16-bit Linear (a language model's head) in fp32, WIDENED_ROWS of its outputs at a time."""
    import torch

    weight, bias = layer.weight, layer.bias
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for start in range(0, weight.shape[0], WIDENED_ROWS):
        rows = slice(start, start + WIDENED_ROWS)
        part = None if bias is None else bias[rows].float()
        out[..., rows] = torch.nn.functional.linear(x, widen(weight[rows]), part)
    return out


def _widened_as_they_run(module: Any) -> None:
    """`module`'s 16-bit Linear and Embedding weights widened to fp32 each time their layer runs."""
    import torch
    from torch.nn.utils import parametrize

    scratch = [torch.empty(0)]  # one fp32 buffer, as large as the largest weight widened so far

    def widen(weight: torch.Tensor) -> torch.Tensor:
        """`weight` in fp32 (exact: every bf16 and fp16 is an fp32), in the one scratch buffer every
        layer reuses: each layer reads its weight once and computes its output before the next layer
        widens its own (eager inference; no graph keeps it). A fresh fp32 copy each call is memory the
        system maps in anew (above glibc's 32 MB threshold): a 1.04B Llama's 64-token call took 2.2
        to 2.4 s so, 1.4 to 1.7 with a reused buffer, the same logits."""
        if scratch[0].numel() < weight.numel():
            scratch[0] = torch.empty(weight.numel(), dtype=torch.float32)
        return scratch[0][: weight.numel()].view(weight.shape).copy_(weight)

    class Widened(torch.nn.Module):
        """A 16-bit weight as fp32 where its layer reads it."""

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return widen(weight)

    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear | torch.nn.Embedding) or layer.weight.dtype == torch.float32:
            continue
        if layer.__class__ is torch.nn.Embedding:
            # the rows looked up, widened (the same values as from a widened table, without one)
            layer.register_forward_hook(lambda _, __, rows: rows.float())
        elif layer.__class__ is torch.nn.Linear and layer.out_features > WIDENED_ROWS:
            layer.forward = functools.partial(_in_slices, layer, widen)  # type: ignore[method-assign]  # no fp32 head
        else:
            parametrize.register_parametrization(layer, "weight", Widened(), unsafe=True)  # unsafe: changes dtype


def lean_torch(auto: Any, checkpoint: Path) -> torch.nn.Module | None:
    """`auto`'s model of `checkpoint` built without initializing its weights, then each safetensors
    tensor read (not mapped) into it, a tensor at a time. The weights of its Linear and Embedding
    layers stay in the checkpoint's 16 bits (bf16, fp16) and are widened to fp32 each time a layer
    runs (`_widened_as_they_run`): the fp32 computation on half the memory, exactly (a vocabulary-wide
    head, widened WIDENED_ROWS rows at a time, within 1e-6; exact on a 0.33B Llama), widening about
    0.5 ns a weight per call here. Other tensors are read as fp32. None where the checkpoint's names
    do not fill the model exactly (transformers' loader knows more)."""
    import numpy as np
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from optimize.safetensors_files import header, read_float, read_into

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    with no_init_weights():  # fp32 storage, never written where a 16-bit weight replaces it (so never resident)
        module: Any = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    expected, loaded = module.state_dict(), set()
    computed = {name for name, _ in module.named_buffers()} - set(expected)  # e.g. position_ids, made by the model
    narrow = {"BF16": torch.bfloat16, "F16": torch.float16}
    Widenable = torch.nn.Linear | torch.nn.Embedding
    for path in files:
        tensors, start = header(path)
        for name, entry in tensors.items():
            if name in computed:
                continue  # an old checkpoint's copy of a buffer the model now computes (as transformers skips it)
            if name not in expected or entry["dtype"] not in ("BF16", "F16", "F32"):
                return None
            owner, _, leaf = name.rpartition(".")
            layer = module.get_submodule(owner)
            if leaf == "weight" and isinstance(layer, Widenable) and entry["dtype"] in narrow:
                shape = [int(d) for d in entry["shape"]]  # type: ignore[attr-defined]
                kept = torch.empty(shape, dtype=narrow[str(entry["dtype"])])
                read_into(path, start, entry, kept.view(torch.uint8).numpy().reshape(-1))
                layer.weight = torch.nn.Parameter(kept, requires_grad=False)
            else:
                module.load_state_dict({name: torch.from_numpy(np.array(read_float(path, start, entry)))}, strict=False)
            loaded.add(name)
    module.tie_weights()
    filled = {module.state_dict()[name].data_ptr() for name in loaded}
    if any(tensor.data_ptr() not in filled for name, tensor in module.state_dict().items() if name not in loaded):
        return None  # a weight the checkpoint did not give and is not tied to one it did
    _widened_as_they_run(module)
    built: torch.nn.Module = module
    return built
