"""The compile stage: an ONNX graph optimized offline for a target.

Target `cpu`: ONNX Runtime's basic graph optimizations (constant folding, redundant node
elimination), fp32, saved as a new model file so the artifact needs no optimization at load time.
"""

from __future__ import annotations

from typing import Literal

from optimize.model import ModelHandle
from optimize.stages.base import StageBase, StageContext, StageOutput


class CompileStage(StageBase):
    kind: Literal["compile"] = "compile"
    target: Literal["cpu"] = "cpu"


def run(config: CompileStage, model: ModelHandle, ctx: StageContext) -> StageOutput:
    import onnxruntime as ort

    assert model.onnx_path is not None, "the pipeline exports to ONNX before compile"
    out = ctx.workdir / "model.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
    return model.with_onnx(out), {"graph_optimization_level": "basic"}
