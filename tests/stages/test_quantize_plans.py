"""optimize.stages.quantize_plans: how the mixed-precision search ranks layers, guesses how many to
keep in float, and reads a plan file."""

from __future__ import annotations

import json

import pytest

from optimize.errors import UsageError
from optimize.stages.quantize_plans import FLOAT, _first_guess, _rank, _read_plan


def test_layers_are_ranked_by_sensitivity_per_weight_or_by_sensitivity_alone():
    scores = {"attn": 0.02, "ffn": 0.04, "embed": 0.001}
    costs = {"attn": 1, "ffn": 4, "embed": 10}
    assert _rank(list(scores), scores, costs, "cost") == ["attn", "ffn", "embed"]
    assert _rank(list(scores), scores, costs, "sensitivity") == ["ffn", "attn", "embed"]


def test_the_first_guess_keeps_enough_of_the_most_sensitive_layers_to_close_the_gap():
    check = {"metric": "spearman", "value": 0.70, "op": ">=", "threshold": 0.79, "passed": False, "reference": 0.80}
    scores = {"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1}
    # 90% of the loss must go (scaled by 1.25: all of it): every layer until the scores add up
    assert _first_guess([check], ["a", "b", "c", "d"], scores) == 4
    nearly = {**check, "value": 0.785}
    assert _first_guess([nearly], ["a", "b", "c", "d"], scores) == 1  # a third of it: the first layer
    assert _first_guess([{**check, "passed": True}], ["a"], {"a": 1.0}) == 1  # at least one


def test_a_plan_file_fills_unnamed_layers_with_float_and_refuses_unknown_ones(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"precision_plan": {"a": "int8"}}))
    assert _read_plan(path, ["a", "b"]) == {"a": "int8", "b": FLOAT}
    path.write_text(json.dumps({"zzz": "int8"}))
    with pytest.raises(UsageError, match="layers not in this model: zzz"):
        _read_plan(path, ["a"])
    path.write_text(json.dumps({"a": "int3"}))
    with pytest.raises(UsageError, match="maps layer names to int8, int4 or fp32"):
        _read_plan(path, ["a"])
