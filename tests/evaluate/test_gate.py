"""Gate arithmetic per DESIGN.md: min, max, max_drop (in the metric's direction), max_ratio."""

import pytest
from pydantic import ValidationError

from optimize.evaluate.gate import GateCheck, judge, judge_all

CASES = [
    # check, value, reference, passed, threshold
    ({"metric": "cosine_min", "min": 0.98}, 0.99, None, True, 0.98),
    ({"metric": "cosine_min", "min": 0.98}, 0.97, None, False, 0.98),
    ({"metric": "size_mb", "max": 30}, 31.0, None, False, 30),
    ({"metric": "spearman", "max_drop": 0.01}, 0.815, 0.82, True, 0.81),
    ({"metric": "spearman", "max_drop": 0.001}, 0.815, 0.82, False, 0.819),
    ({"metric": "perplexity", "max_drop": 0.5}, 14.0, 13.7, True, 14.2),
    ({"metric": "perplexity", "max_drop": 0.1}, 14.0, 13.7, False, 13.8),
    ({"metric": "latency_p50_ms", "max_ratio": 0.5}, 4.0, 10.0, True, 5.0),
    ({"metric": "latency_p50_ms", "max_ratio": 0.5}, 6.0, 10.0, False, 5.0),
]


@pytest.mark.parametrize(("check", "value", "reference", "passed", "threshold"), CASES)
def test_a_check_compares_the_value_to_its_threshold(check, value, reference, passed, threshold):
    row = judge(GateCheck(**check), value, reference)
    assert row["passed"] is passed
    assert row["threshold"] == pytest.approx(threshold)


def test_a_missing_metric_fails_the_check_rather_than_passing_it():
    row = judge(GateCheck(metric="spearman", min=0.5), None, None)
    assert row["passed"] is False


def test_a_relative_check_without_a_reference_fails():
    assert judge(GateCheck(metric="spearman", max_drop=0.01), 0.9, None)["passed"] is False


def test_the_gate_passes_only_when_every_check_passes():
    checks = [GateCheck(metric="cosine_min", min=0.9), GateCheck(metric="size_mb", max=10)]
    assert judge_all(checks, {"cosine_min": 0.95, "size_mb": 9}, {})["passed"] is True
    assert judge_all(checks, {"cosine_min": 0.95, "size_mb": 11}, {})["passed"] is False


@pytest.mark.parametrize(
    "bad",
    [
        {"metric": "cosine_min"},
        {"metric": "cosine_min", "min": 0.9, "max": 1.0},
        {"metric": "cosine_minimum", "min": 0.9},
        {"metric": "spearman", "max_drop": -0.1},
    ],
)
def test_a_check_needs_one_valid_bound_and_a_known_metric(bad):
    with pytest.raises(ValidationError):
        GateCheck(**bad)
