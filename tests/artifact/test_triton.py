"""optimize.artifact.triton: a Triton model repository from an encoder artifact, its config.pbtxt checked
against Triton's own ModelConfig schema (tritonclient) and against the graph."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize.artifact import triton
from optimize.cli.commands import app
from optimize.errors import UsageError
from tests.conftest import write_recipe

pytest.importorskip("tritonclient")


@pytest.fixture(scope="module")
def artifact(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("triton")
    stage = {"kind": "compile", "target": "cpu", "variants": ["basic"], "gate": [{"metric": "cosine_min", "min": 0.9}]}
    recipe = write_recipe(folder, [stage], model=str(tiny_bert))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out"


@pytest.fixture
def repository(artifact: Path, tmp_path: Path) -> Path:
    result = CliRunner().invoke(app, ["package", str(artifact), "--format", "triton", "-o", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    return tmp_path / "repo" / "test"


def test_the_repository_holds_the_graph_and_a_config_triton_parses(repository: Path) -> None:
    text = (repository / "config.pbtxt").read_text()
    assert (repository / "1" / "model.onnx").is_file() and (repository / "tokenizer.json").is_file()
    assert 'backend: "onnxruntime"' in text and "dynamic_batching" in text and "KIND_CPU" in text
    for name in ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state"):
        assert f'name: "{name}"' in text
    assert "dims: -1" in text and "dims: 32" in text  # the sequence is dynamic, the hidden width is the graph's
    triton.check(repository)  # the same checks the writer ran, from the files alone


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("max_batch_size", "max_batch_sise"), "not a Triton model config"),
        (lambda text: text.replace('name: "attention_mask"', 'name: "mask"'), "not the graph's"),
        (lambda text: text.replace("TYPE_INT64", "TYPE_INT32", 1), "not the graph's"),
    ],
)
def test_a_mistyped_field_or_a_wrong_input_is_caught(repository: Path, edit, message: str) -> None:
    config = repository / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(UsageError, match=message):
        triton.check(repository)


def test_a_decoder_or_a_taken_destination_is_refused_with_exit_2(artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    result = CliRunner().invoke(app, ["package", str(artifact), "--format", "triton", "-o", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "already exists" in result.output
    result = CliRunner().invoke(app, ["package", str(artifact), "--format", "zip"])
    assert result.exit_code == 2 and "one of tar, triton" in result.output
