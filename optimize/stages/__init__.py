"""The stage registry: the one place that lists every stage kind, its config and its function.

Adding a stage is one file in this folder and one line in each of `Stage` and `RUNNERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from optimize.stages import compile as compile_stage
from optimize.stages import quantize as quantize_stage
from optimize.stages.compile import CompileStage
from optimize.stages.quantize import QuantizeStage

Stage = Annotated[QuantizeStage | CompileStage, Field(discriminator="kind")]

RUNNERS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "quantize": quantize_stage.run,
    "compile": compile_stage.run,
}

# Stages must come in this order (a model is distilled, then quantized, then compiled).
ORDER = {"distill": 0, "quantize": 1, "compile": 2}

# Stages that take an ONNX model; the pipeline inserts an export step before the first of them.
NEEDS_ONNX = {"quantize", "compile"}
