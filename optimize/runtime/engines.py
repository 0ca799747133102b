"""Every engine an artifact can be run by, one row each: the file it reads in the artifact, the
Python module that runs it here, what to install for it (the artifact's requirements.txt lines), and
whether it generates. The artifact writer, the runtime's loaders, the server, the genai stage and
the Triton writer all read this table; adding an engine is one row here and one module that runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .decoding import Sampling, refused
from .engine_llama_cpp import LlamaCppEngine
from .engine_onnxruntime_genai import GenAIEngine
from .engine_openvino_genai import OpenVinoGenAIEngine


class Generating(Protocol):
    """An engine that generates: the tokens after a prompt's, one at a time."""

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]: ...


# Opens an engine's folder in an artifact: (folder, threads, use_gpu) -> the engine.
Opener = Callable[[Path, "int | None", bool], Generating]


@dataclass(frozen=True)
class Engine:
    name: str  # as the manifest, the recipe and `--engine` spell it
    path: str  # its model in an artifact: a file, or a folder for a folder format
    opens: str  # the file whose presence means an artifact has this engine's model
    module: str | None  # the Python module that runs it here (None: shipped for others, not run here)
    package: str | None  # what `pip install` gives that module
    requirements: tuple[str, ...] = ()  # lines for the artifact's runtime/requirements.txt
    float_ops: str | None = None  # OpenVINO's precision for the ops left in float; None: not OpenVINO
    family: str = ""  # the library its file is for, one file each in an artifact (default: its name)
    open: Opener | None = None  # opens its folder to generate (None: it does not generate by itself)
    triton: str | None = None  # Triton's backend that serves its file
    dists: tuple[str, ...] = ()  # the distributions whose version every manifest's provenance records

    @property
    def library(self) -> str:
        return self.family or self.name


# The runtime's requirements: ranges that install on Python 3.10+ (the versions a run measured are in
# the manifest's provenance), and one onnxruntime per platform, with pyproject.toml's markers: the GPU
# build (it also runs on CPU) where it is published, the plain one elsewhere (macOS, ARM).
GPU_BUILD_PLATFORMS = "(platform_system == 'Linux' and platform_machine == 'x86_64') or platform_system == 'Windows'"
OTHER_PLATFORMS = "(platform_system != 'Linux' or platform_machine != 'x86_64') and platform_system != 'Windows'"
BASE_REQUIREMENTS = (
    "# The runtime of this artifact: numpy, tokenizers and one onnxruntime build (never both).",
    "# On a GPU machine, `pip install 'onnxruntime-gpu[cuda,cudnn]'` also brings the CUDA libraries.",
    f"onnxruntime-gpu>=1.20,<2; {GPU_BUILD_PLATFORMS}",
    f"onnxruntime>=1.20,<2; {OTHER_PLATFORMS}",
    "numpy>=1.26,<3",
    "tokenizers>=0.19,<1",
)
_OPENVINO = ("openvino>=2024.4",)  # the OpenVINO engine; onnxruntime runs its int8 graph without it
_IR = "openvino/openvino_model.xml"  # OpenVINO's graph and weights (.bin beside it)

ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        # model.onnx in onnxruntime; a decoder's graph with its cache (or over the whole sequence)
        # generates through the runtime's own loop (`OnnxModel.tokens`)
        Engine(
            "onnxruntime", path="model.onnx", opens="model.onnx", module="onnxruntime", package="onnxruntime",
            triton="onnxruntime", dists=("onnxruntime-gpu", "onnxruntime"),
        ),
        # an int8 graph NNCF quantized for OpenVINO's kernels, its float ops in fp32, or in bf16 on a
        # CPU that computes bf16 natively (the same IR: the precision is a runtime setting)
        Engine(
            "openvino", path=_IR, opens=_IR, module="openvino", package="openvino", requirements=_OPENVINO,
            float_ops="f32", triton="openvino", dists=("openvino",),
        ),
        Engine(
            "openvino-bf16", path=_IR, opens=_IR, module="openvino", package="openvino", requirements=_OPENVINO,
            float_ops="bf16", family="openvino", triton="openvino",
        ),
        # onnxruntime-genai's model builder's folder: the artifact itself (genai_config.json at its root)
        Engine(
            "onnxruntime-genai", path=".", opens="genai_config.json", module="onnxruntime_genai",
            package="onnxruntime-genai", dists=("onnxruntime-genai-cuda", "onnxruntime-genai"),
            requirements=(  # the builder's release that wrote the folder, or later
                f"onnxruntime-genai-cuda>=0.18; {GPU_BUILD_PLATFORMS}",
                f"onnxruntime-genai>=0.18; {OTHER_PLATFORMS}",
            ),
            open=lambda folder, threads, gpu: GenAIEngine(folder, use_gpu=gpu),
        ),
        # a checkpoint for vLLM, SGLang or transformers: shipped, not run by this runtime
        Engine(
            "compressed-tensors", path="compressed-tensors", opens="compressed-tensors/config.json",
            module=None, package=None,
        ),
        # a stateful IR that OpenVINO GenAI's LLMPipeline loads as it is: LLMPipeline(OUT/openvino-genai, "CPU")
        Engine(
            "openvino-genai", path="openvino-genai", opens="openvino-genai/openvino_model.xml",
            module="openvino_genai", package="openvino-genai",
            requirements=(
                "# openvino-genai/ for `generate --engine openvino-genai`: the release of the openvino installed",
                "openvino-genai>=2025.0",
            ),
            open=lambda folder, threads, gpu: OpenVinoGenAIEngine(folder, threads),
        ),
        # gguf/model.gguf (llama.cpp -m, Ollama's FROM) with the tokenizer it was measured with
        Engine(
            "llama.cpp", path="gguf", opens="gguf/model.gguf", module="llama_cpp", package="llama-cpp-python",
            requirements=(
                "# gguf/model.gguf runs in llama.cpp itself, Ollama or LM Studio; for `generate --engine llama.cpp`:",
                "# pip install llama-cpp-python  (builds llama.cpp from source: a few minutes)",
            ),
            open=lambda folder, threads, gpu: LlamaCppEngine(folder / "model.gguf", threads),
        ),
    )
}  # fmt: skip
GENERATING = tuple(name for name, e in ENGINES.items() if e.open is not None)  # each opens its own folder
DEFAULT_ENGINE = "onnxruntime"  # what runs model.onnx where the manifest names no other engine
OWN_LOOP = DEFAULT_ENGINE  # generation through the runtime's own KV-cache loop over model.onnx
BUILDER = "onnxruntime-genai"  # the engine whose folder onnxruntime-genai's model builder writes
BATCHING = "openvino-genai"  # the engine with continuous batching: `serve` decodes concurrent streams with it
SEQUENTIAL = ("llama.cpp",)  # one sequence per context: a server gives each stream its turn whole


def on_openvino(engine: str) -> bool:
    """Whether OpenVINO runs the graph for this engine (an unknown name: no)."""
    row = ENGINES.get(engine)
    return row is not None and row.float_ops is not None


def family(engine: str) -> str:
    """The library an engine's file is for, one file each in an artifact: `openvino` for both
    OpenVINO precisions, else the engine (an unknown name: itself)."""
    row = ENGINES.get(engine)
    return row.library if row else engine


def openvino_engine(bf16: bool) -> str:
    """The OpenVINO engine whose float ops run in bf16, or in f32."""
    return next(e.name for e in ENGINES.values() if e.float_ops == ("bf16" if bf16 else "f32"))


def open_engine(name: str, folder: Path, threads: int | None, use_gpu: bool = False) -> Generating:
    """The engine `name` on its own folder: an onnxruntime-genai model builder's folder, an
    `openvino-genai/` folder, or a folder holding `model.gguf` (llama.cpp)."""
    row = ENGINES.get(name)
    if row is None or row.open is None:
        raise ValueError(f"engine {name}: one of {', '.join(GENERATING)}")
    with refused(name, folder):
        return row.open(folder, threads, use_gpu)
