"""The command line as a user meets it, on a tiny random BERT: exit codes, JSON, artifacts, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from tests.conftest import ROOT, write_recipe

COMPILE = [{"kind": "compile", "target": "cpu", "gate": [{"metric": "cosine_min", "min": 0.999}]}]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.startswith("optimize-"))


def test_a_compile_recipe_passes_and_every_manifest_file_has_its_sha256(tiny_bert, tmp_path):
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    out = tmp_path / "out"
    result = invoke("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "passed" and report["artifact"] == str(out) and report["error"] is None
    assert [s["kind"] for s in report["stages"]] == ["export", "compile"]
    compile_stage = report["stages"][1]
    assert compile_stage["gate"]["passed"] is True
    value = compile_stage["metrics"]["cosine_min"]
    assert compile_stage["gate"]["checks"][0] == {
        "metric": "cosine_min",
        "value": value,
        "op": ">=",
        "threshold": 0.999,
        "passed": True,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.onnx", "tokenizer.json", "config.json", "runtime/__init__.py"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert runtime.sha256_file(out / name) == entry["sha256"], name
    # Files with timings are listed but not hashed; the manifest itself holds no timing.
    assert set(manifest["measurement_files"]) == {"measurements.json", "report.md", "report.json", "report.html"}
    assert "latency_p50_ms" not in json.dumps(manifest) and "latency_p50_ms" in (out / "measurements.json").read_text()
    merged = runtime.verify(out)  # the runtime's view puts them back
    assert merged["stages"][1]["metrics"]["latency_p50_ms"] == compile_stage["metrics"]["latency_p50_ms"]
    assert manifest["provenance"]["seed"] == 0 and len(manifest["provenance"]["recipe_sha256"]) == 64
    assert manifest["provenance"]["versions"]["onnxruntime"]
    assert leftovers(tmp_path) == []


def test_a_gate_that_cannot_hold_exits_3_with_no_artifact(tiny_bert, tmp_path):
    stages = [{"kind": "compile", "gate": [{"metric": "cosine_min", "min": 1.01}]}]
    recipe = write_recipe(tmp_path, stages, model=str(tiny_bert))
    out = tmp_path / "out"
    result = invoke("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["status"] == "gate_failed" and report["artifact"] is None
    failed = report["stages"][-1]["gate"]["checks"][0]
    assert failed["passed"] is False and failed["threshold"] == 1.01
    assert "cosine_min" in result.stderr and "1.01" in result.stderr
    assert not out.exists()
    assert (tmp_path / "out.gate-failed.md").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("missing_model", "no such folder"),
        ("empty_calibration", "no rows"),
        ("short_calibration", "lower calibration.samples"),
        ("pickled_weights", "--allow-pickle"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_no_artifact(tiny_bert, tmp_path, problem, expected):
    model, calibration = str(tiny_bert), {"samples": 32, "holdout": 16, "seq_len": 32}
    if problem == "missing_model":
        model = str(tmp_path / "no-such-model")
    elif problem == "empty_calibration":
        (tmp_path / "empty.jsonl").write_text("")
        calibration["data"] = str(tmp_path / "empty.jsonl")
    elif problem == "short_calibration":
        (tmp_path / "short.txt").write_text("one sentence\nanother one\n")
        calibration["data"] = str(tmp_path / "short.txt")
    elif problem == "pickled_weights":
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "config.json").write_text((tiny_bert / "config.json").read_text())
        (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
        model = str(pickled)
    recipe = write_recipe(tmp_path, COMPILE, model=model, calibration=calibration)
    result = invoke("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert json.loads(result.stdout)["status"] == "error"
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_resolved_recipe_of_a_single_stage_command(tiny_bert):
    result = invoke("compile", str(tiny_bert), "--target", "cpu", "--dry-run")
    assert result.exit_code == 0
    assert "kind: compile" in result.stdout and f"model: {tiny_bert}" in result.stdout
    assert "samples: 256" in result.stdout  # defaults are shown, so the recipe reproduces the command


def test_recipe_validate_reports_each_bad_file(tmp_path):
    bad = write_recipe(tmp_path, [{"kind": "compile", "targt": "cpu"}], name="bad")
    good = write_recipe(tmp_path, COMPILE, name="good")
    result = invoke("recipe", "validate", str(good), str(bad))
    assert result.exit_code == 2
    assert "ok" in result.stderr and "stages.0.targt: unknown key" in result.stderr


def test_inspect_refuses_an_artifact_whose_model_changed(tiny_bert, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", str(write_recipe(tmp_path, COMPILE, model=str(tiny_bert))), "-o", str(out)).exit_code == 0
    assert invoke("inspect", str(out)).exit_code == 0
    data = bytearray((out / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    result = invoke("inspect", str(out))
    assert result.exit_code == 2 and "model.onnx" in result.stderr and "sha256" in result.stderr


def test_an_existing_out_is_kept_unless_overwrite_is_given(tiny_bert, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert))
    result = invoke("run", str(recipe), "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert invoke("run", str(recipe), "-o", str(out), "--overwrite").exit_code == 0
    assert (out / "manifest.json").is_file()


def test_the_cli_module_does_not_import_torch():
    code = (
        "import sys, optimize.cli.commands; "
        "sys.exit(int(any(m in sys.modules for m in ('torch', 'onnxruntime', 'transformers'))))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_typo_exits_2_without_a_traceback_in_a_real_process(tmp_path):
    recipe = write_recipe(tmp_path, [{"kind": "compile", "targt": "cpu"}], model="x")
    proc = subprocess.run([sys.executable, "-m", "optimize", "run", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "stages.0.targt" in proc.stderr


def test_ctrl_c_during_a_run_leaves_no_out_and_no_temporary_folder(tiny_bert, tmp_path):
    # Interrupted at a point the test knows the run has reached: the compile stage's work folder
    # exists (the file system shows it at once; printed lines can sit in a buffer), while that stage and
    # its STS-B measurement still take seconds. No sleep: a busy machine only makes the run slower.
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert), evals=[str(ROOT / "evals" / "stsb-test.yaml")])
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimize", "run", str(recipe), "-o", str(tmp_path / "out"), "--cache-dir", str(cache)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(cache.glob("optimize-*/1-compile")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == [] and leftovers(cache) == []


@pytest.mark.parametrize(
    ("case", "code", "status"),
    [
        ("passed", 0, "passed"),
        ("gate failed", 3, "gate_failed"),
        ("bad recipe", 2, "error"),
        ("bad flag", 2, "error"),
        ("missing file", 2, "error"),
        ("dry run", 0, "dry_run"),
        ("inspect", 2, "error"),
        ("validate", 2, "error"),
    ],
)
def test_every_outcome_of_json_is_one_object_on_stdout(tiny_bert, tmp_path, case, code, status):
    """Through the console script in a real process: click's usage errors included."""
    good = write_recipe(tmp_path, COMPILE, name="good", model=str(tiny_bert))
    failing = [{**COMPILE[0], "gate": [{"metric": "cosine_min", "min": 1.5}]}]
    args = {
        "passed": ["run", str(good), "-o", str(tmp_path / "out")],
        "gate failed": ["run", str(write_recipe(tmp_path, failing, name="bad", model=str(tiny_bert)))],
        "bad recipe": ["run", str(write_recipe(tmp_path, [{"kind": "compile", "targt": "cpu"}], model="x"))],
        "bad flag": ["quantize", str(tiny_bert), "--precisoin", "int8"],
        "missing file": ["eval", str(tmp_path / "nothing"), "--suite", "stsb-test.yaml"],
        "dry run": ["run", str(good), "--dry-run"],
        "inspect": ["inspect", str(tmp_path)],
        "validate": ["recipe", "validate", str(tmp_path / "none.yaml")],
    }[case]
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", *args, "--json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert report["status"] == status and set(report) >= {"status", "artifact", "stages", "error"}
    assert (report["error"] is None) == (code == 0) and "Traceback" not in proc.stderr
    if case == "bad flag":
        assert "--precisoin" in report["error"]
    if case == "dry run":
        assert report["recipe"]["stages"][0]["kind"] == "compile"


def test_a_model_shipping_its_own_code_needs_trust_remote_code_named_in_one_message(tiny_bert, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_bert, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my-own-bert", auto_map={"AutoModel": "modeling_mine.MyModel"})
    (custom / "config.json").write_text(json.dumps(config))
    result = invoke("compile", str(custom), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 2
    assert "--trust-remote-code" in json.loads(result.stdout)["error"] and "Traceback" not in result.output


def test_brackets_in_a_message_are_printed_as_text_not_as_console_markup(tiny_bert, tmp_path):
    """ "(int8: [last_matmul, mixed_layers])" in an advice was printed "(int8: )": rich read it as a style."""
    missing = tmp_path / "calibration[v2].jsonl"
    recipe = write_recipe(tmp_path, COMPILE, model=str(tiny_bert), calibration={"data": str(missing)})
    result = invoke("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "calibration[v2].jsonl" in "".join(result.output.split()), result.output
