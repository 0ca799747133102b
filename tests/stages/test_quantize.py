"""The quantize stage on a tiny BERT: plans, the auto search against the gate, plan reuse, int4."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from tests.conftest import write_recipe


def run(recipe, out, *extra):
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json", *extra])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def quantize_stage(**fields):
    # Tiny matrices are not faster in int8; the speed rule is tested on MiniLM (slow tests, bench).
    return [{"kind": "quantize", "require_speedup": False, **fields}]


def test_int8_puts_every_layer_in_int8_and_records_the_plan(tiny_bert, tmp_path):
    recipe = write_recipe(
        tmp_path, quantize_stage(precision="int8", gate=[{"metric": "cosine_min", "min": 0.5}]), model=str(tiny_bert)
    )
    result, report = run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    export, quantized = report["stages"]
    assert quantized["metrics"]["size_mb"] < export["metrics"]["size_mb"] / 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    plan = manifest["precision_plan"]
    assert plan and set(plan.values()) == {"int8"}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {"DynamicQuantizeMatMul", "MatMulInteger"} & ops or "DynamicQuantizeLinear" in ops
    assert len(manifest["stages"][1]["details"]["candidates"]) == 1


def test_auto_keeps_sensitive_layers_in_float_until_the_gate_holds_and_a_plan_can_be_reused(tiny_bert, tmp_path):
    # Calibrated between what all-int8 gives and 1.0, so the search has to promote some layers.
    probe = write_recipe(
        tmp_path,
        quantize_stage(precision="int8", gate=[{"metric": "cosine_mean", "min": 0}]),
        name="probe",
        model=str(tiny_bert),
    )
    all_int8 = run(probe, tmp_path / "probe")[1]["stages"][1]["metrics"]["cosine_mean"]
    threshold = round(all_int8 + (1 - all_int8) * 0.5, 6)
    gate = [{"metric": "cosine_mean", "min": threshold}]
    recipe = write_recipe(
        tmp_path, quantize_stage(precision="auto", max_evals=8, gate=gate), name="auto", model=str(tiny_bert)
    )
    result, report = run(recipe, tmp_path / "auto")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    details = manifest["stages"][1]["details"]
    plan = manifest["precision_plan"]
    assert set(details["sensitivity"]) == set(plan)  # every layer was scored
    assert 1 <= len(details["candidates"]) <= 8  # the evaluation budget held
    assert details["candidates"][0]["passed"] is False  # all-int8 did not hold
    kept = [n for n, p in plan.items() if p == "fp32"]
    assert kept and len(kept) < len(plan)  # mixed precision
    # the layers kept in float are those that buy the most quality per weight (rank_by: cost)
    per_weight = {n: details["sensitivity"][n] / details["weights"][n] for n in plan}
    quantized = [n for n in plan if n not in kept]
    assert min(per_weight[n] for n in kept) >= max(per_weight[n] for n in quantized)
    assert details["weights"]["/embeddings/word_embeddings/Gather"] == 30522 * 32
    assert report["stages"][1]["metrics"]["cosine_mean"] >= threshold

    reuse = write_recipe(
        tmp_path,
        quantize_stage(plan=str(tmp_path / "auto" / "manifest.json"), gate=gate),
        name="reuse",
        model=str(tiny_bert),
    )
    result, _ = run(reuse, tmp_path / "reuse")
    assert result.exit_code == 0, result.output
    reused = json.loads((tmp_path / "reuse" / "manifest.json").read_text())
    assert reused["precision_plan"] == plan
    assert len(reused["stages"][1]["details"]["candidates"]) == 1  # no search


def test_auto_exits_3_with_the_best_candidate_when_no_plan_can_pass(tiny_bert, tmp_path):
    recipe = write_recipe(
        tmp_path,
        quantize_stage(precision="auto", max_evals=2, gate=[{"metric": "cosine_min", "min": 1.5}]),
        model=str(tiny_bert),
    )
    result, report = run(recipe, tmp_path / "out")
    assert result.exit_code == 3
    assert report["status"] == "gate_failed" and "no plan passed in 2 evaluations" in report["error"]
    assert not (tmp_path / "out").exists()


def test_int4_writes_matmulnbits_with_the_given_block_size(tiny_bert, tmp_path):
    recipe = write_recipe(
        tmp_path,
        quantize_stage(
            precision="int4", method={"name": "rtn", "block_size": 16}, gate=[{"metric": "cosine_mean", "min": 0.5}]
        ),
        model=str(tiny_bert),
    )
    result, _ = run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "passed"  # stdout holds the JSON only (the quantizer prints)
    nodes = [n for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nodes
    assert all(a.i == 16 for n in nodes for a in n.attribute if a.name == "block_size")


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ({"precision": "fp16"}, "fp16"),
        ({"plan": "/no/such/plan.json"}, "cannot read the plan"),
    ],
)
def test_impossible_quantize_requests_exit_2(tiny_bert, tmp_path, stage, expected):
    recipe = write_recipe(tmp_path, quantize_stage(**stage), model=str(tiny_bert))
    result, report = run(recipe, tmp_path / "out")
    assert result.exit_code == 2 and expected in report["error"]
    assert not (tmp_path / "out").exists()


def test_a_gate_on_a_metric_no_suite_measures_is_refused_before_any_work(tiny_bert, tmp_path):
    recipe = write_recipe(
        tmp_path, quantize_stage(gate=[{"metric": "spearman", "max_drop": 0.01}]), model=str(tiny_bert)
    )
    result, report = run(recipe, tmp_path / "out")
    assert result.exit_code == 2 and "spearman is not measured" in report["error"]


def test_fuse_then_quantize_runs_attention_as_one_int8_op(tiny_bert, tmp_path):
    method = {"name": "dynamic", "fuse": True}
    recipe = write_recipe(tmp_path, quantize_stage(precision="int8", method=method), model=str(tiny_bert))
    result, report = run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization"} <= ops
    plan = json.loads((tmp_path / "out" / "manifest.json").read_text())["precision_plan"]
    assert any("Attention" in name for name in plan)  # the fused ops are layers of the plan
    assert report["stages"][-1]["gate"]["source"] == "default" and report["stages"][-1]["gate"]["passed"]
