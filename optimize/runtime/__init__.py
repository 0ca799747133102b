"""The torch-free runtime shipped in every artifact (as `runtime/`) and used by the gates.

It imports only onnxruntime, numpy, tokenizers and the standard library, so the model that ships
is run by exactly the code that measured it. `load(artifact_dir)` checks every file against the
manifest's sha256, picks execution providers (TensorRT -> CUDA -> CPU, limited to what the
artifact was compiled for and what this onnxruntime offers) and falls back when one fails.
An artifact whose manifest names an `openvino` engine (an int8 graph quantized for OpenVINO's CPU
kernels) runs with OpenVINO when it is installed, else with onnxruntime, which reads the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .decoding import Sampling, chat_prompt, kv_loop, stream
from .engine_llama_cpp import LlamaCppEngine
from .engine_onnxruntime_genai import GenAIEngine
from .engine_openvino_genai import ContinuousBatching, OpenVinoGenAIEngine
from .engines import DEFAULT_ENGINE, ENGINES, GENERATING, Engine, family, on_openvino, open_engine
from .manifest import CpuSummary, Manifest, RuntimeSettings
from .onnx_model import OnnxModel
from .session import (
    GPU_HINT,
    OPENVINO_MISSING,
    PREFERENCE,
    TARGET_PROVIDERS,
    OpenVINOSession,
    Port,
    make_session,
    provider_options,
    select_providers,
)
from .text import Pooling, Tokenizer, embed, mean_pool, model_seq_len
from .verify import ArtifactError, merge_volatile, sha256_file, verify

__all__ = [
    "ENGINES",
    "GENERATING",
    "GPU_HINT",
    "OPENVINO_MISSING",
    "PREFERENCE",
    "TARGET_PROVIDERS",
    "ArtifactError",
    "ContinuousBatching",
    "Engine",
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
    "engine_of",
    "family",
    "kv_loop",
    "load",
    "make_session",
    "mean_pool",
    "merge_volatile",
    "model_seq_len",
    "on_openvino",
    "open_engine",
    "openvino_file_of",
    "provider_options",
    "select_providers",
    "sha256_file",
    "stream",
    "tuning_warning",
    "verify",
]


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


def engine_of(manifest: Manifest, file: str = "model.onnx") -> str:
    """What runs `file` of an artifact: the engine its manifest lists for that file (an artifact with
    one file per engine), else the one its `runtime` names (onnxruntime where it says nothing)."""
    listed = {e["file"]: e["engine"] for e in manifest.get("engines", [])}
    return str(listed.get(file) or manifest.get("runtime", {}).get("engine", DEFAULT_ENGINE))


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
