"""No stage that changes numerics runs ungated by default (issue 9): the default fidelity gate, its
report, and an explicit `gate: []` reported as ungated everywhere."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from optimize.evaluate.gate import default_gate
from tests.conftest import write_recipe


def invoke(*args: str):
    from optimize.cli.commands import app

    return CliRunner().invoke(app, list(args))


def test_the_default_gate_checks_sentence_cosine_for_embeddings_and_logits_for_the_rest():
    embeddings = {(c.metric, c.min) for c in default_gate("feature-extraction")}
    assert embeddings == {("cosine_mean", 0.99), ("cosine_min", 0.95)}
    for task in ("text-classification", "text-generation"):
        metrics = {c.metric for c in default_gate(task)}
        assert metrics == {"top1_agreement", "kl_div"}


def test_int8_that_breaks_a_model_exits_3_naming_the_sensitive_layers_and_writes_no_artifact(int8_breaks, tmp_path):
    # No gate anywhere: the stage gets the default one. (Tiny models are not faster in int8; the
    # speed rule is not what this test is about.)
    recipe = write_recipe(
        tmp_path, [{"kind": "quantize", "precision": "int8", "require_speedup": False}], model=str(int8_breaks)
    )
    result = invoke("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "gate_failed" and report["artifact"] is None
    quantized = report["stages"][-1]
    assert quantized["gate"]["source"] == "default" and quantized["gate"]["passed"] is False
    assert quantized["metrics"]["cosine_mean"] < 0.99
    written = (tmp_path / "out.gate-failed.md").read_text()
    for text in (report["error"], written):
        assert "precision: auto" in text
        assert "/encoder/layer." in text and "most sensitive layers" in text  # named, with their scores
    assert "(default gate)" in written
    assert not (tmp_path / "out").exists()


def test_the_default_auto_search_emits_nothing_below_the_default_gate(int8_breaks, tmp_path):
    recipe = write_recipe(
        tmp_path, [{"kind": "quantize", "require_speedup": False, "max_evals": 6}], model=str(int8_breaks)
    )
    result = invoke("quantize", str(int8_breaks), "-r", str(recipe), "-o", str(tmp_path / "out"), "--json")
    report = json.loads(result.stdout)
    assert result.exit_code in (0, 3), result.output
    if result.exit_code == 0:
        metrics = report["stages"][-1]["metrics"]
        assert metrics["cosine_mean"] >= 0.99 and metrics["cosine_min"] >= 0.95
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert "fp32" in manifest["precision_plan"].values()  # it had to keep layers in float
    else:
        assert not (tmp_path / "out").exists()


def test_dry_run_shows_the_gate_in_force(tiny_bert):
    result = invoke("quantize", str(tiny_bert), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "metric: cosine_mean" in result.stdout and "min: 0.99" in result.stdout
    assert "precision: auto" in result.stdout


def test_a_recipe_gate_replaces_the_default_one_in_the_manifest(tiny_bert, tmp_path):
    stages = [{"kind": "compile", "variants": ["basic"]}]
    recipe = write_recipe(tmp_path, stages, model=str(tiny_bert))
    assert invoke("run", str(recipe), "-o", str(tmp_path / "default")).exit_code == 0
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    gate = manifest["stages"][-1]["gate"]
    assert gate["source"] == "default"
    assert {(c["metric"], c["threshold"]) for c in gate["checks"]} == {("cosine_mean", 0.99), ("cosine_min", 0.95)}
    assert "min: 0.99" in manifest["provenance"]["recipe"]  # the recipe recorded is the one that ran
    stages[0]["gate"] = [{"metric": "cosine_min", "min": 0.999}]
    recipe = write_recipe(tmp_path, stages, model=str(tiny_bert), name="own")
    assert invoke("run", str(recipe), "-o", str(tmp_path / "own")).exit_code == 0
    gate = json.loads((tmp_path / "own" / "manifest.json").read_text())["stages"][-1]["gate"]
    assert gate["source"] == "recipe" and [c["threshold"] for c in gate["checks"]] == [0.999]


@pytest.mark.parametrize("kind", ["compile", "quantize"])
def test_an_empty_gate_runs_but_is_reported_as_ungated_everywhere(tiny_bert, tmp_path, kind):
    stage = {"kind": kind, "gate": []}
    if kind == "quantize":
        stage.update(precision="int8", require_speedup=False)
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_bert))
    out = tmp_path / "out"
    result = invoke("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert "ungated" in result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "passed"
    gate = report["stages"][-1]["gate"]
    assert (gate["passed"], gate["source"], gate["checks"]) == (True, "ungated", [])
    assert report["stages"][0]["gate"]["source"] == "default"  # the export is always checked
    assert "**ungated**" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][-1]["gate"]["source"] == "ungated"
