"""GPU targets (`cuda`, `tensorrt`): a strongly typed fp16 graph, gated on the CPU before any GPU.

TensorRT 10 deprecated and 11 removed the builder's fp16/int8 flags: precision lives in the graph.
So the graph carries it: float weights and activations in fp16 (onnxruntime.transformers' float16
converter, inputs and outputs kept fp32), with the ops fp16 is known to hurt kept in fp32 (layer
norms and the reductions of a decomposed one: their sums of squares overflow fp16's range). The
runtime then leaves the provider's fp16 flag off: nothing else is lowered. The graph is measured by
onnxruntime on the CPU, which runs its fp16 ops in fp16, against the stage's gate; a graph that
fails it is not shipped: the fp32 graph is, and the decisions say why.

A quantized (Q/DQ or dynamic int8) graph is kept in its precision: its int8 is the recipe's choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from optimize.models.handle import ModelHandle
from optimize.runtime.manifest import CheckResult
from optimize.stages.base import StageContext, StageResult

# Kept in fp32: normalizations (fused or decomposed into ReduceMean/Pow/Sqrt) whose intermediate
# sums leave fp16's range on real activations.
KEEP_FP32 = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
)
QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits"}


class Fp16Tried(TypedDict):
    variant: str  # fp16 | fp32
    kept_fp32_ops: list[str]
    metrics: dict[str, float]
    passed: bool
    checks: list[CheckResult]


def write_fp16(source: Path, out: Path, keep: tuple[str, ...] = KEEP_FP32) -> None:
    """The strongly typed fp16 graph of `source` at `out`: float tensors in fp16 but those of `keep`
    ops, inputs and outputs in fp32 (Cast nodes at the boundaries)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=list(keep))
    # The converter adds the same Cast once per use of a shared weight: identical nodes, kept once.
    seen: set[bytes] = set()
    unique = []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del model.graph.node[:]
    model.graph.node.extend(unique)
    onnx.save(model, str(out))


def is_quantized(path: Path) -> bool:
    import onnx

    return any(n.op_type in QUANTIZED for n in onnx.load(str(path), load_external_data=False).graph.node)


def gpu_graph(model: ModelHandle, ctx: StageContext, fp16: bool, basic: ModelHandle) -> StageResult:
    """The fp16 graph of `basic` (the input at onnxruntime's basic level) where `fp16` and the gate
    allow it, else `basic` itself."""
    assert basic.onnx_path is not None
    if not fp16 or is_quantized(basic.onnx_path):
        why = "fp16: false in the recipe" if not fp16 else "the graph is quantized: its precision is kept"
        return StageResult(
            basic, {"variant": "basic", "graph_precision": "as given", "why": why}, runtime={"fp16": False}
        )
    out = ctx.workdir / "fp16.onnx"
    with ctx.console.status("compile: writing the strongly typed fp16 graph"):
        write_fp16(basic.onnx_path, out)
    candidate = basic.with_onnx(out)
    metrics, gate = ctx.judge(candidate)  # onnxruntime on the CPU, its fp16 ops in fp16
    tried: Fp16Tried = {
        "variant": "fp16",
        "kept_fp32_ops": list(KEEP_FP32),
        "metrics": metrics,
        "passed": gate["passed"],
        "checks": gate["checks"],
    }
    if gate["passed"]:
        decisions = {"variant": "fp16", "graph_precision": "fp16", "candidates": [tried]}
        return StageResult(candidate, decisions, runtime={"fp16": False})  # precision is in the graph
    ctx.console.print("compile: the fp16 graph does not hold the gate; the fp32 graph ships")
    why = "the fp16 graph did not hold the gate (see candidates): the fp32 graph ships"
    decisions = {"variant": "basic", "graph_precision": "fp32", "candidates": [tried], "why": why}
    return StageResult(basic, decisions, runtime={"fp16": False})
