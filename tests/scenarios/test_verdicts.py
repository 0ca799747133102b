"""The gate's verdict never depends on the stage cache: for every stage kind, a cold run and a warm
rerun (for a failing recipe: the rerun after its failed gate, which resumes from the steps that
passed) give the same exit code and the same quality figures (timings aside). Each test has its own
cache folder (conftest), on as users run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.metrics import METRICS
from tests.conftest import write_recipe

DISTILL = {"kind": "distill", "batch_size": 8, "holdout": 16, "eval_every": 5, "seq_len": 32, "bf16": False}
QUANTIZE = {"kind": "quantize", "precision": "int8", "require_speedup": False}
COMPILE = {"kind": "compile", "variants": ["basic"]}
IMPOSSIBLE = [{"metric": "cosine_min", "min": 1.01}]


def run(recipe: Path, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json", *extra])
    assert result.stdout.strip().startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def quality(report: dict[str, Any]) -> list[tuple[str, dict[str, float], list[tuple[str, object, bool]]]]:
    """Each stage's quality metrics and gate checks: everything but timings."""

    def kept(metric: str) -> bool:
        return METRICS[metric].source not in ("speed", "bench")

    return [
        (
            stage["name"],
            {k: v for k, v in stage["metrics"].items() if kept(k)},
            [(c["metric"], c["value"], c["passed"]) for c in stage["gate"]["checks"] if kept(c["metric"])],
        )
        for stage in report["stages"]
    ]


CASES: dict[str, tuple[str, list[dict[str, Any]], int]] = {
    # the bug this file exists for: a warm rerun took the stage's own output as its reference
    "an untrained student under distillation's default gate": (
        "deep_bert",
        [{**DISTILL, "layers": [0], "steps": 1, "lr": 1e-6}],
        3,
    ),
    "int8 that ruins the model under the default gate": ("int8_breaks", [QUANTIZE], 3),
    "an auto search that finds no plan": (
        "tiny_bert",
        [{**QUANTIZE, "precision": "auto", "max_evals": 2, "gate": IMPOSSIBLE}],
        3,
    ),
    "formulations that cannot hold the gate": (
        "tiny_bert",
        [{**QUANTIZE, "formulations": [{"name": "dynamic"}], "gate": IMPOSSIBLE}],
        3,
    ),
    "a compile stage that cannot hold the gate": ("tiny_bert", [{**COMPILE, "gate": IMPOSSIBLE}], 3),
    "a passing quantize then a failing compile (the rerun resumes)": (
        "tiny_bert",
        [QUANTIZE, {**COMPILE, "gate": IMPOSSIBLE}],
        3,
    ),
    "a passing int8 quantize": ("tiny_bert", [QUANTIZE], 0),
    "a passing compile": ("tiny_bert", [COMPILE], 0),
    "a genai candidate that cannot hold the gate": (
        "tiny_llama",
        [
            {
                "kind": "genai",
                "candidates": [{"precision": "int4", "block_size": 32}],
                "gate": [{"metric": "top1_agreement", "min": 0.999}],
            }
        ],
        3,
    ),
    "a calibrated int4 (gptq) candidate that cannot hold the gate": (
        "tiny_llama",
        [
            {
                "kind": "genai",
                "candidates": [{"precision": "int4", "algorithm": "gptq", "block_size": 32}],
                "gate": [{"metric": "top1_agreement", "min": 0.999}],
            }
        ],
        3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_cold_run_and_warm_reruns_give_the_same_verdict_and_quality(case, request, tmp_path):
    fixture, stages, expected = CASES[case]
    if fixture == "tiny_llama":
        pytest.importorskip("onnxruntime_genai")
    model = request.getfixturevalue(fixture)
    recipe = write_recipe(tmp_path, stages, model=str(model))
    # cold, then warm: for a failing recipe the second run is the rerun after a failed gate
    outcomes = [run(recipe, tmp_path / "out", "--overwrite") for _ in range(2)]
    codes = [code for code, _ in outcomes]
    assert codes == [expected] * 2, [r["error"] for _, r in outcomes]
    cold = quality(outcomes[0][1])
    assert cold and all(quality(report) == cold for _, report in outcomes[1:])
    assert (tmp_path / "out").exists() == (expected == 0)


def test_a_failed_stage_inside_a_search_is_reported_with_what_it_measured(tiny_bert, tmp_path):
    stage = {**QUANTIZE, "precision": "auto", "max_evals": 2, "gate": IMPOSSIBLE}
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_bert))
    code, report = run(recipe, tmp_path / "out")
    assert code == 3
    failed = report["stages"][-1]
    assert failed["kind"] == "quantize" and not failed["gate"]["passed"]
    assert failed["metrics"]["cosine_min"] < 1.01 and failed["gate"]["checks"][0]["metric"] == "cosine_min"
    written = (tmp_path / "out.gate-failed.md").read_text()
    assert "quantize" in written and "FAIL" in written


def test_every_gate_names_the_model_its_fidelity_was_measured_against(deep_bert, tmp_path):
    stages = [{**DISTILL, "layers": [2], "steps": 2, "gate": []}, QUANTIZE]
    recipe = write_recipe(tmp_path, stages, model=str(deep_bert))
    code, report = run(recipe, tmp_path / "out")
    assert code in (0, 3), report["error"]
    against = {s["name"]: s["gate"]["against"] for s in report["stages"]}
    assert against["distill"].startswith("input model") and str(deep_bert) in against["distill"]
    assert against["export"] == against["quantize"] == "stage 0 (distill) output"


def test_without_the_cache_nothing_in_the_cache_folder_is_read(tiny_bert, tmp_path, own_cache):
    recipe = write_recipe(tmp_path, [QUANTIZE], model=str(tiny_bert))
    code, cold = run(recipe, tmp_path / "a")
    assert code == 0
    # Poison every cached entry: a run that read one would report the poisoned figures.
    entries = list((own_cache / "stages").glob("*/entry.json"))
    assert entries
    for path in entries:
        entry = json.loads(path.read_text())
        if "record" in entry:
            entry["record"]["metrics"] = {k: -1.0 for k in entry["record"]["metrics"]}
        entry["metrics"] = {k: -1.0 for k in entry.get("metrics", {})}
        path.write_text(json.dumps(entry))
    code, fresh = run(recipe, tmp_path / "b", "--no-cache")
    assert code == 0 and quality(fresh) == quality(cold)
    cleared = json.loads(CliRunner().invoke(app, ["cache", "clear", "--json"]).stdout)
    assert cleared["freed_mb"] > 0 and not any(p.is_file() for p in own_cache.rglob("*"))
    code, again = run(recipe, tmp_path / "c")
    assert code == 0 and quality(again) == quality(cold)
