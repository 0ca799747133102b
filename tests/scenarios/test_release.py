"""Release-grade runs on a tiny BERT: the stage cache (reuse, resume, list, clear), byte-identical
artifacts, deterministic archives, the atomic --overwrite, report.html and the CI job summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from tests.conftest import write_recipe

COMPILE = [{"kind": "compile", "target": "cpu", "variants": ["basic"]}]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): runtime.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in skip
    }


@pytest.fixture
def cached(tmp_path):
    return tmp_path / "cache"


def test_a_warm_rerun_reuses_every_step_and_gives_byte_identical_files(tiny_bert, tmp_path, cached):
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    first = invoke("run", str(recipe), "-o", str(tmp_path / "a"), "--cache-dir", str(cached))
    assert first.exit_code == 0, first.output
    second = invoke("run", str(recipe), "-o", str(tmp_path / "b"), "--cache-dir", str(cached))
    assert second.exit_code == 0, second.output
    assert second.stderr.count("reused from the cache") == 2  # the export and the compile stage
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")  # every file, reports included
    listed = json.loads(invoke("cache", "list", "--cache-dir", str(cached), "--json").stdout)
    assert {e["step"] for e in listed["entries"]} == {"reference", "export", "stage 0 (compile)"}
    cleared = json.loads(invoke("cache", "clear", "--cache-dir", str(cached), "--json").stdout)
    assert cleared["freed_mb"] > 0
    assert json.loads(invoke("cache", "list", "--cache-dir", str(cached), "--json").stdout)["entries"] == []


def test_no_cache_reuses_nothing_and_stores_nothing(tiny_bert, tmp_path, cached):
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    result = invoke("run", str(recipe), "-o", str(tmp_path / "a"), "--cache-dir", str(cached), "--no-cache")
    assert result.exit_code == 0 and "reused" not in result.stderr
    assert not (cached / "stages").exists() or not any((cached / "stages").iterdir())


def test_a_run_stopped_by_a_failed_stage_resumes_after_the_steps_it_finished(tiny_bert, tmp_path, cached):
    quantize = {
        "kind": "quantize",
        "precision": "int8",
        "require_speedup": False,
        "gate": [{"metric": "cosine_min", "min": 0.5}],
    }
    compile_ = {"kind": "compile", "variants": ["basic"], "gate": [{"metric": "cosine_min", "min": 1.01}]}
    failing = write_recipe(tmp_path, [quantize, compile_], name="failing", model=str(tiny_bert))
    assert invoke("run", str(failing), "-o", str(tmp_path / "out"), "--cache-dir", str(cached)).exit_code == 3
    compile_["gate"] = [{"metric": "cosine_min", "min": 0.5}]
    fixed = write_recipe(tmp_path, [quantize, compile_], name="fixed", model=str(tiny_bert))
    result = invoke("run", str(fixed), "-o", str(tmp_path / "out"), "--cache-dir", str(cached))
    assert result.exit_code == 0, result.output
    assert "export: reused" in result.stderr and "stage 0 (quantize): reused" in result.stderr
    assert "stage 1 (compile): reused" not in result.stderr  # the stage that failed ran again


def test_two_cold_runs_give_byte_identical_files_and_measurements_apart(tiny_bert, tmp_path):
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    for out in ("a", "b"):
        assert invoke("run", str(recipe), "-o", str(tmp_path / out)).exit_code == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    timed = tuple(manifest["measurement_files"])
    assert hashes(tmp_path / "a", timed) == hashes(tmp_path / "b", timed)  # manifest.json included
    assert set(hashes(tmp_path / "a", timed)) - {"manifest.json"} == set(manifest["files"])


def test_package_writes_the_same_archive_bytes_for_the_same_artifact(tiny_bert, tmp_path):
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    assert invoke("run", str(recipe), "-o", str(tmp_path / "art")).exit_code == 0
    first = json.loads(invoke("package", str(tmp_path / "art"), "-o", str(tmp_path / "1.tar.gz"), "--json").stdout)
    for path in (tmp_path / "art").rglob("*"):
        os.utime(path, (1e9, 1e9))  # other mtimes, same content
    second = json.loads(invoke("package", str(tmp_path / "art"), "-o", str(tmp_path / "2.tar.gz"), "--json").stdout)
    assert first["sha256"] == second["sha256"] == runtime.sha256_file(tmp_path / "1.tar.gz")
    inspected = invoke("inspect", str(tmp_path / "1.tar.gz"), "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["manifest"]["name"] == "test"


def test_overwrite_keeps_the_old_artifact_until_a_new_one_is_complete(tiny_bert, tmp_path):
    good = write_recipe(tmp_path, COMPILE, name="good", model=str(tiny_bert))
    out = tmp_path / "out"
    assert invoke("run", str(good), "-o", str(out)).exit_code == 0
    before = hashes(out)
    stages = [{"kind": "compile", "variants": ["basic"], "gate": [{"metric": "cosine_min", "min": 1.01}]}]
    failing = write_recipe(tmp_path, stages, name="failing", model=str(tiny_bert))
    assert invoke("run", str(failing), "-o", str(out), "--overwrite").exit_code == 3
    assert hashes(out) == before  # the failed run left the old artifact whole
    assert invoke("run", str(good), "-o", str(out), "--overwrite").exit_code == 0
    assert runtime.verify(out)["name"] == "good"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_report_html_has_its_plots_and_the_job_summary_gets_the_report(tiny_bert, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    stages = [{"kind": "quantize", "precision": "auto", "require_speedup": False, "max_evals": 2}]
    recipe = write_recipe(tmp_path, stages, model=str(tiny_bert))
    assert invoke("run", str(recipe), "-o", str(tmp_path / "out")).exit_code == 0
    page = (tmp_path / "out" / "report.html").read_text()
    tried = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"][-1]["details"]["candidates"]
    # the Pareto view, per-layer sensitivity, and the plans the search tried when it tried several
    assert page.count("<svg") == 2 + (len(tried) > 1)
    assert "latency p50" in page and "chosen precision" in page and "<script" not in page
    assert page.count("<table>") == 2 and "<pre>" not in page  # gates and metrics as real tables
    assert "<td>cosine_min</td>" in page and "input model (" in page  # each check, and what it compared with
    written = summary.read_text()
    assert written.startswith("earlier step\n") and "# test: passed" in written


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_corrupt_out_and_the_next_run_resumes(tiny_bert, tmp_path):
    """Two runs killed with SIGKILL at random moments (seeded), sharing one stage cache: OUT is
    either absent or a whole artifact that verifies, and a last run completes from the cache. (Two,
    not ten: CI's whole suite must stay under 30 minutes; a fresh-clone .ci/run took 30:52 here.)"""
    import random
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert), evals=[str(ROOT / "evals" / "stsb-test.yaml")])
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "optimize", "run", str(recipe), "-o", str(out), "--cache-dir", str(cache)]
    env = {k: v for k, v in os.environ.items() if k != "OPTIMIZE_NO_CACHE"}
    timed = time.perf_counter()
    subprocess.run(
        [*command[:-4], "-o", str(tmp_path / "timed"), "--no-cache"], env=env, check=True, capture_output=True
    )
    full = time.perf_counter() - timed  # how long one cold run takes on this machine now
    rng = random.Random(0)
    for trial in range(2):
        proc = subprocess.Popen(
            [*command, "--overwrite"], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=rng.uniform(0.2, full))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if out.exists():
            assert runtime.verify(out)["name"] == "test", f"trial {trial}: a corrupt OUT"
    final = subprocess.run([*command, "--overwrite"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "reused from the cache" in final.stderr
    assert runtime.verify(out)["name"] == "test"


def test_the_example_ci_job_runs_commands_that_exist():
    import yaml

    from tests.conftest import ROOT

    job = yaml.safe_load((ROOT / "examples" / "github-actions.yml").read_text())
    steps = job["jobs"]["release"]["steps"]
    commands = [
        line.split()[1] for s in steps for line in s.get("run", "").splitlines() if line.startswith("optimize ")
    ]
    assert commands == ["run", "package"]
    for command in commands:  # each is a real subcommand with the flags the job passes
        help_text = invoke(command, "--help").output
        assert "--json" in help_text and "-o" in help_text
    assert (ROOT / job["jobs"]["release"]["env"]["RECIPE"]).is_file()
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact") and "if" not in s)
    assert "tar.gz" in upload["with"]["path"]  # the packaged artifact, uploaded only on success


def test_a_changed_file_under_the_same_name_is_not_reused(tiny_bert, tmp_path, cached):
    plan = tmp_path / "plan.json"
    stage = {"kind": "quantize", "precision": "int8", "plan": str(plan), "require_speedup": False}
    stage["gate"] = [{"metric": "cosine_min", "min": 0.3}]
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_bert))
    args = ["run", str(recipe), "--cache-dir", str(cached), "--overwrite", "-o", str(tmp_path / "out")]
    plan.write_text("{}")  # every layer stays in float
    assert invoke(*args).exit_code == 0
    assert "stage 0 (quantize): reused" in invoke(*args).stderr  # the same file: reused
    layers = sorted(runtime.verify(tmp_path / "out")["precision_plan"])
    assert set(runtime.verify(tmp_path / "out")["precision_plan"].values()) == {"fp32"}
    plan.write_text(json.dumps({layers[0]: "int8"}))  # same name, new content
    result = invoke(*args)
    assert result.exit_code == 0 and "stage 0 (quantize): reused" not in result.stderr
    assert runtime.verify(tmp_path / "out")["precision_plan"][layers[0]] == "int8"
