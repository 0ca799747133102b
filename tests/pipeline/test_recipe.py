"""Recipe loading: every problem is one UsageError naming file, line and key; extends and --set merge."""

from pathlib import Path

import pytest

from optimize.errors import UsageError
from optimize.pipeline import recipe as recipes
from tests.conftest import ROOT

GOOD = """\
version: 1
name: good
model: some/model
calibration: {samples: 8, seq_len: 64}
stages:
  - kind: compile
    target: cpu
    gate:
      - {metric: cosine_min, min: 0.99}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] = ()) -> str:  # type: ignore[assignment]
    with pytest.raises(UsageError) as info:
        recipes.load(path, overrides)
    return str(info.value)


def test_a_good_recipe_loads_with_defaults_filled_in(tmp_path):
    loaded = recipes.load(write(tmp_path, GOOD))
    assert loaded.recipe.calibration.samples == 8
    assert loaded.recipe.calibration.holdout == 64
    assert loaded.recipe.stages[0].gate[0].min == 0.99
    assert "name: good" in loaded.text


def test_a_typo_in_a_stage_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, GOOD.replace("target: cpu", "targt: cpu"))
    message = error_of(path)
    assert f"{path.resolve()}:7: stages.0.targt: unknown key" in message


def test_a_wrong_type_names_the_line_of_the_key(tmp_path):
    path = write(tmp_path, GOOD.replace("samples: 8", "samples: many"))
    message = error_of(path)
    assert f"{path.resolve()}:4: calibration.samples:" in message
    assert "integer" in message


def test_an_unknown_stage_kind_is_reported(tmp_path):
    message = error_of(write(tmp_path, GOOD.replace("kind: compile", "kind: compyle")))
    assert ":6: stages.0: Input tag 'compyle' found using 'kind'" in message


def test_a_gate_metric_that_does_not_exist_is_reported(tmp_path):
    message = error_of(write(tmp_path, GOOD.replace("cosine_min", "cosine_minimum")))
    assert "stages.0.gate.0.metric" in message and ":9:" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "version: 1\nname: [unclosed\nstages: []\n")
    assert "invalid YAML" in error_of(path)


def test_a_missing_recipe_file_is_a_usage_error(tmp_path):
    assert "no such recipe file" in error_of(tmp_path / "nope.yaml")


def test_two_compile_stages_are_an_impossible_order(tmp_path):
    text = GOOD + "  - kind: compile\n"
    assert "cannot follow" in error_of(write(tmp_path, text))


def test_extends_merges_the_base_and_the_child_wins(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\ncalibration: {samples: 4}\n", "child.yaml")
    recipe = recipes.load(child).recipe
    assert recipe.name == "child"
    assert recipe.calibration.samples == 4
    assert recipe.calibration.seq_len == 64  # kept from the base
    assert recipe.stages[0].kind == "compile"


def test_an_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nname: b\n", "b.yaml")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_set_overrides_one_key_and_is_validated(tmp_path):
    path = write(tmp_path, GOOD)
    assert recipes.load(path, ["calibration.samples=16"]).recipe.calibration.samples == 16
    assert recipes.load(path, ["stages.0.gate.0.min=0.5"]).recipe.stages[0].gate[0].min == 0.5
    assert error_of(path, ["stages.0.target=gpu"]).startswith("--set stages.0.target=gpu: stages.0.target:")
    assert "stages.3 does not exist" in error_of(path, ["stages.3.target=cpu"])
    assert "key.path=value" in error_of(path, ["stages.0.target"])


def test_the_shipped_recipes_are_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipes.load(path)


QUANTIZE_THEN_COMPILE = """\
version: 1
name: checked
model: no/such/model
evals: [EVALS]
stages:
  - kind: quantize
    precision: PRECISION
    method: {name: rtn, block_size: BLOCK}
    gate:
      - {metric: METRIC, max_drop: 0.01}
  - kind: compile
    target: cpu
"""


@pytest.mark.parametrize(
    ("change", "line", "key", "expected"),
    [
        (
            {"PRECISION": "fp16", "rtn, block_size: BLOCK": "dynamic"},
            7,
            "stages.0.precision",
            "fp16 is slower than fp32",
        ),
        ({"METRIC": "spearman", "EVALS": ""}, 10, "stages.0.gate.0.metric", "add an eval suite of task sts"),
        ({"BLOCK": "100"}, 8, "stages.0.method.block_size", "power of two"),
        (
            {"kind: compile": "kind: quantize", "kind: quantize\n    precision": "kind: compile\n    precision"},
            9,
            "stages.1.kind",
            "quantize cannot follow compile",
        ),
    ],
)
def test_recipe_problems_are_found_before_any_model_loads(tmp_path, change, line, key, expected):
    text = QUANTIZE_THEN_COMPILE
    for old, new in {"PRECISION": "int4", "BLOCK": "32", "METRIC": "cosine_mean", "EVALS": "", **change}.items():
        text = text.replace(old, new)
    if "kind: compile\n    precision" in text:  # compile first: its quantize-only keys would be a second error
        text = text.replace("    precision: int4\n    method: {name: rtn, block_size: 32}\n", "")
        text = text.replace("  - kind: quantize\n    target: cpu\n", "  - kind: quantize\n")
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path.resolve()}:{line}: {key}: " in message and expected in message, message


def test_a_gate_on_a_suite_metric_passes_validation_once_the_suite_is_named(tmp_path):
    text = QUANTIZE_THEN_COMPILE.replace("PRECISION", "int8")
    text = text.replace("    method: {name: rtn, block_size: BLOCK}\n", "")
    text = text.replace("METRIC", "spearman").replace("EVALS", "evals/stsb-test.yaml")
    assert recipes.load(write(tmp_path, text)).recipe.stages[0].gate[0].metric == "spearman"


def test_recipe_validate_loads_no_model_and_no_heavy_library(tmp_path):
    import subprocess
    import sys

    path = write(
        tmp_path,
        QUANTIZE_THEN_COMPILE.replace("PRECISION", "fp16")
        .replace("BLOCK", "32")
        .replace("METRIC", "cosine_mean")
        .replace("EVALS", ""),
    )
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom optimize.cli.commands import app\n"
        f"result = CliRunner().invoke(app, ['recipe', 'validate', {str(path)!r}])\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'transformers', 'onnx') if m in sys.modules]\n"
        "print(result.exit_code, heavy, result.stderr.replace(chr(10), ' '))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("2 [] ") and "stages.0.precision" in out, out
