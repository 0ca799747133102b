"""The release artifact: one folder written beside OUT and renamed into place only when complete.

Layout (DESIGN.md): manifest.json, model.onnx, tokenizer files and config.json, runtime/ (the
torch-free runtime with its requirements), report.md and report.json. The manifest lists every
other file with its sha256 and size, so the runtime can refuse a changed file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from optimize import __version__
from optimize.errors import UsageError
from optimize.runtime import sha256_file

SCHEMA_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
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
    "2_Dense",  # a distilled student's projection to its teacher's width (optimize/projection.py)
)
RUNTIME_SOURCE = Path(__file__).parent / "runtime"


def copy_checkpoint_files(source: Path, target: Path, extra: Sequence[str] = ()) -> None:
    """The tokenizer, config and sentence-transformers files of a checkpoint folder (and `extra`),
    with every module folder its `modules.json` names (the runtime reads the pooling from there)."""
    modules = source / "modules.json"
    listed = [str(m["path"]) for m in json.loads(modules.read_text()) if m.get("path")] if modules.is_file() else []
    for name in dict.fromkeys((*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES, *listed, *extra)):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copyfile(path, target / name)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "optimize": __version__}
    for name, dists in {
        "torch": ["torch"],
        "transformers": ["transformers"],
        "onnx": ["onnx"],
        "onnxruntime": ["onnxruntime-gpu", "onnxruntime"],
        "numpy": ["numpy"],
        "tokenizers": ["tokenizers"],
        "optimum-onnx": ["optimum-onnx"],
    }.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work when OUT cannot be written, so a long run never ends in a usage error."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"{parent}: not writable")


def staging_dir(out: Path) -> Path:
    """A hidden sibling of OUT (same file system, so the final rename is atomic)."""
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


# The runtime's requirements: ranges that install on Python 3.10+ (the versions this run measured
# are in the manifest's provenance), and one onnxruntime per platform, with pyproject.toml's markers:
# the GPU build (it also runs on CPU) where it is published, the plain one elsewhere (macOS, ARM).
GPU_BUILD_PLATFORMS = "(platform_system == 'Linux' and platform_machine == 'x86_64') or platform_system == 'Windows'"
OTHER_PLATFORMS = "(platform_system != 'Linux' or platform_machine != 'x86_64') and platform_system != 'Windows'"
RUNTIME_REQUIREMENTS = (
    "# The runtime of this artifact: numpy, tokenizers and one onnxruntime build (never both).",
    "# On a GPU machine, `pip install 'onnxruntime-gpu[cuda,cudnn]'` also brings the CUDA libraries.",
    f"onnxruntime-gpu>=1.20,<2; {GPU_BUILD_PLATFORMS}",
    f"onnxruntime>=1.20,<2; {OTHER_PLATFORMS}",
    "numpy>=1.26,<3",
    "tokenizers>=0.19,<1",
)


GENAI_REQUIREMENTS = (
    f"onnxruntime-genai-cuda>=0.12,<0.16; {GPU_BUILD_PLATFORMS}",
    f"onnxruntime-genai>=0.12,<0.16; {OTHER_PLATFORMS}",
)


def write_runtime(folder: Path) -> None:
    runtime = folder / "runtime"
    runtime.mkdir()
    for source in sorted(RUNTIME_SOURCE.glob("*.py")):
        shutil.copyfile(source, runtime / source.name)
    genai = GENAI_REQUIREMENTS if (folder / "genai_config.json").is_file() else ()  # a decoder engine folder
    (runtime / "requirements.txt").write_text("\n".join((*RUNTIME_REQUIREMENTS, *genai)) + "\n")


def write(
    out: Path,
    staging: Path,
    onnx_path: Path,
    checkpoint: Path,
    manifest: dict[str, Any],
    report_md: str,
    report: dict[str, Any],
    overwrite: bool,
    with_weights: bool = False,
) -> None:
    """Fill `staging`, write the manifest last, then rename it to OUT. `with_weights` also copies the
    checkpoint's safetensors and sentence-transformers files (a model this run trained)."""
    shutil.copyfile(onnx_path, staging / "model.onnx")
    external = onnx_path.parent / (onnx_path.name + ".data")
    if external.exists():
        shutil.copyfile(external, staging / external.name)
    # The tokenizer, config and sentence-transformers files (the model's pooling, read by the runtime
    # and by sentence-transformers loading the artifact), and the weights of a model this run trained.
    weights = [p.name for p in sorted(checkpoint.glob("*.safetensors"))] if with_weights else []
    copy_checkpoint_files(checkpoint, staging, weights)
    write_runtime(staging)
    (staging / "report.md").write_text(report_md)
    (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    files = sorted(p for p in staging.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    manifest["files"] = {
        str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    staging.rename(out)
