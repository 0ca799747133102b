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
        result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "minilm-cpu.yaml"), "-o", str(out), "--json",
                                          "--set", "stages.0.variants=[basic]"])
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
