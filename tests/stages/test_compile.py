"""The compile stage: measured graph variants, agreement with the input, targets, ONNX inputs."""

from __future__ import annotations

import json

import onnx
from rich.console import Console
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from optimize.models.loading import open_any
from optimize.stages import compile_fp16 as fp16
from optimize.stages.base import StageContext


def compile_json(*args: str):
    result = CliRunner().invoke(app, ["compile", *args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def test_cpu_compile_measures_each_variant_and_keeps_the_fastest_that_agrees(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _report = compile_json(str(tiny_bert), "-o", str(out))
    assert result.exit_code == 0, result.output
    details = runtime.verify(out)["stages"][1]["details"]  # with its measurements merged back
    tried = {c["variant"]: c for c in details["candidates"]}
    assert set(tried) == {"as-is", "basic", "extended", "fused"}
    agreeing = [c for c in tried.values() if c.get("agrees")]
    assert agreeing and all(c["agreement_cosine_min"] >= 0.999 for c in agreeing)
    chosen = tried[details["variant"]]
    assert chosen.get("agrees")
    # nothing that agrees is more than min_speedup (5%) faster than what was kept
    assert all(c["latency_p50_ms"] >= chosen["latency_p50_ms"] * 0.95 for c in agreeing)
    assert "error" not in tried["fused"], tried["fused"]  # onnxruntime's BERT fusions apply to this graph
    assert tried["fused"]["fused"]["SkipLayerNormalization"] > 0


def test_gpu_targets_ship_a_strongly_typed_fp16_graph_gated_on_the_cpu(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _ = compile_json(str(tiny_bert), "--target", "tensorrt", "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = runtime.verify(out)
    details = manifest["stages"][1]["details"]
    assert details["variant"] == "fp16" and details["graph_precision"] == "fp16"
    tried = details["candidates"][0]
    assert tried["passed"] and tried["metrics"]["cosine_min"] >= 0.95  # measured by onnxruntime on this CPU
    # Precision is in the graph (TensorRT 10/11): the provider's fp16 flag stays off
    assert manifest["runtime"]["target"] == "tensorrt" and manifest["runtime"]["fp16"] is False
    graph = onnx.load(str(out / "model.onnx")).graph
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type != fp16 for v in [*graph.input, *graph.output])  # fp32 at the edges
    weights = {i.name: i.data_type for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert matmuls and all(weights[n.input[1]] == fp16 for n in matmuls)
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types.get(n.output[0], fp32) == fp32 for n in norms)  # kept in fp32
    assert len({node.SerializeToString() for node in graph.node}) == len(graph.node)  # no duplicate Casts


def test_an_fp16_graph_that_fails_the_gate_is_not_shipped(tiny_bert, tmp_path):
    first = tmp_path / "fp32"
    assert compile_json(str(tiny_bert), "--variant", "basic", "-o", str(first))[0].exit_code == 0
    basic = open_any(str(first))
    judged = []

    def judge(handle):  # a gate only the fp32 graph holds
        judged.append(handle.onnx_path.name)
        passed = handle.onnx_path.name != "fp16.onnx"
        return {"cosine_min": 1.0 if passed else 0.9}, {"passed": passed, "source": "recipe", "checks": []}

    ctx = StageContext(tmp_path, ("a",), 32, 0, judge, lambda h: {}, Console(stderr=True))
    result = fp16.gpu_graph(basic, ctx, True, basic)
    assert judged == ["fp16.onnx"] and result.model == basic  # the fp32 graph ships
    assert result.decisions["graph_precision"] == "fp32" and "did not hold the gate" in result.decisions["why"]
    assert result.runtime == {"fp16": False}


def test_compile_takes_an_artifact_and_needs_no_export(tiny_bert, tmp_path):
    first = tmp_path / "first"
    assert compile_json(str(tiny_bert), "-o", str(first))[0].exit_code == 0
    result, report = compile_json(str(first), "-o", str(tmp_path / "second"))
    assert result.exit_code == 0, result.output
    assert [s["kind"] for s in report["stages"]] == ["compile"]
    assert report["stages"][0]["metrics"]["cosine_min"] >= 0.999


def test_a_pinned_variant_is_the_only_one_built(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _ = compile_json(str(tiny_bert), "--variant", "as-is", "-o", str(out))
    assert result.exit_code == 0, result.output
    details = runtime.verify(out)["stages"][1]["details"]  # with its measurements merged back
    assert [c["variant"] for c in details["candidates"]] == ["as-is"] and details["variant"] == "as-is"
    bad, report = compile_json(str(tiny_bert), "--variant", "turbo", "-o", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "variants" in report["error"] and not (tmp_path / "bad").exists()
