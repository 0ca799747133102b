"""The decoder formats an artifact can carry beside onnxruntime-genai's folder, one row each: the
engine its folder is for (`runtime.ENGINES` names its place in the artifact), the precisions tried
(smallest first), the writer, the check that can refuse a checkpoint before any work, the loader that
names what measures it, and the model that measures it through that engine (None: transformers reads
the folder). The genai stage writes and gates each; the evaluator opens each through its row. A new
format is one module with these functions and one row here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from optimize.formats import compressed_tensors, gguf, openvino_genai
from optimize.runtime import Tokenizer
from optimize.runtime.manifest import JsonObject


class Measured(Protocol):
    """A written format as the evaluator measures it: logits for tokenized inputs, in its engine."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def provider(self) -> str: ...  # the engine and its version

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray: ...


Level = int | str  # a precision in bits, or a format's own quantization type (llama.cpp's Q4_K_M)


def _fixed(bits: tuple[int, ...]) -> Callable[[Path, Sequence[str]], tuple[Level, ...]]:
    """A format's levels where the recipe chooses none: its precisions in bits."""
    return lambda checkpoint, requested: bits


@dataclass(frozen=True)
class Format:
    engine: str  # what runs the folder (a row of runtime.ENGINES)
    # what is tried for a checkpoint, smallest first (given the recipe's `gguf_types`); the first
    # whose gate holds ships
    levels: Callable[[Path, Sequence[str]], tuple[Level, ...]]
    # (checkpoint, out, level, calibration texts) -> what the manifest records
    write: Callable[[Path, Path, Level, Sequence[str]], JsonObject]
    problem: Callable[[Path, Sequence[str]], str | None]  # why a checkpoint cannot be written here, or None
    loader: Callable[[], str]  # what measures the gate, with its version
    measure: Callable[[Path, int, int], Measured] | None  # (folder, seq_len, threads); None: transformers
    route: Callable[[Path, Sequence[str]], str]  # the pre-flight's line: how it is written, at what levels


FormatName = Literal["compressed-tensors", "gguf", "openvino-genai"]  # as a recipe's `formats` lists them
FORMATS: dict[FormatName, Format] = {
    # vLLM, SGLang: measured by transformers decompressing it on the CPU
    "compressed-tensors": Format(
        compressed_tensors.ENGINE,
        compressed_tensors.levels,
        compressed_tensors.write_level,
        compressed_tensors.problem,
        compressed_tensors.loader,
        None,
        compressed_tensors.route,
    ),
    # llama.cpp, Ollama, LM Studio: measured in llama.cpp where installed
    "gguf": Format(
        gguf.ENGINE,
        gguf.levels,
        gguf.write,
        gguf.problem,
        gguf.loader,
        lambda folder, seq_len, threads: gguf.GgufModel(folder, seq_len),
        gguf.route,
    ),
    # OpenVINO GenAI's LLMPipeline: measured through OpenVINO's stateful graph
    "openvino-genai": Format(
        openvino_genai.ENGINE,
        _fixed(openvino_genai.BITS),
        lambda checkpoint, out, level, texts: openvino_genai.write(checkpoint, out, int(level)),
        openvino_genai.problem,
        openvino_genai.loader,
        openvino_genai.OpenVinoDecoder,
        lambda checkpoint, requested: "our ONNX export as OpenVINO's stateful IR, min-max int4 then int8",
    ),
}
BY_ENGINE = {f.engine: f for f in FORMATS.values()}
assert set(FORMATS) == set(get_args(FormatName)), "a format is one row of FORMATS and one name of FormatName"
