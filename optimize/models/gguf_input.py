"""A model that comes as a GGUF file (a path, or a Python package that ships one): converted once by
transformers into a safetensors checkpoint in the cache, with the file's header kept beside it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from optimize.errors import UsageError
from optimize.models.handle import cache_root
from optimize.runtime import sha256_file

if TYPE_CHECKING:
    import gguf


def packaged_gguf(module_name: str) -> Path | None:
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


def from_gguf(path: Path, root: Path | None = None) -> Path:
    """A GGUF file (llama.cpp's format) as a safetensors checkpoint folder, converted once by
    transformers (which dequantizes the weights to fp32) into `root` (default: the cache's `gguf/`
    folder, which `optimize cache clear` empties) under the file's hash. GGUF holds no code, so no
    flag is needed to load it."""
    digest = sha256_file(path)
    folder = (root or cache_root() / "gguf") / digest[:24]
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
            f"converted from {path.name} (sha256 {digest}); the weights are the GGUF's, dequantized to fp32\n"
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
