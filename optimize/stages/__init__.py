"""The stage registry: the one place that lists every stage kind, its config and its function.

Adding a stage is one file in this folder and one line in each of `Stage` and `RUNNERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optimize.stages import compile as compile_stage
from optimize.stages.compile import CompileStage

# A discriminated union on `kind` once there are two kinds; today there is one.
Stage = CompileStage

RUNNERS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "compile": compile_stage.run,
}

# Stages must come in this order (a model is distilled, then quantized, then compiled).
ORDER = {"distill": 0, "quantize": 1, "compile": 2}

# Stages that take an ONNX model; the pipeline inserts an export step before the first of them.
NEEDS_ONNX = {"quantize", "compile"}
