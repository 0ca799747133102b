"""optimize.records and optimize.artifact.report: a stage's record survives the manifest, and each kind's
decisions are shown by the kind that wrote them."""

from __future__ import annotations

import json

import pytest

from optimize.artifact import report
from optimize.records import RunSummary, StageRecord
from optimize.runtime.manifest import GateResult

GATE: GateResult = {
    "passed": False,
    "source": "default",
    "checks": [
        {"metric": "cosine_mean", "value": 0.9, "op": ">=", "threshold": 0.99, "passed": False},
        {"metric": "size_mb", "value": 20.0, "op": "<=", "threshold": 100.0, "passed": True},
    ],
    "against": "input model (m)",
}


def test_a_record_reads_back_from_its_json_as_it_was() -> None:
    record = StageRecord("q", "quantize", {"precision": "int8"}, {"cosine_mean": 0.9}, GATE, {"chosen": "x"})
    again = StageRecord.of(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert not again.passed
    assert again.failed_checks() == "cosine_mean = 0.9 is not >= 0.99"  # the passing check is not named


# (kind, decisions as its run records them, labels shown, the chosen one)
CHOICES = [
    (
        "compile",
        {
            "variant": "basic",
            "candidates": [
                {"variant": "basic", "agrees": True, "latency_p50_ms": 2.0, "agreement_cosine_min": 0.9999},
                {"variant": "fused", "error": "E"},
            ],
        },
        ["basic", "fused"],
        "basic",
    ),
    (
        "quantize",
        {
            "formulations": [{"formulation": "dynamic", "method": {}, "gate_passed": True, "latency_ms": {"b1": 1.0}}],
            "fp32_latency_ms": {"b1": 2.0},
            "chosen": "dynamic",
            "cpu": {"model": "c", "machine": "x", "flags": []},
        },
        ["fp32 (no int8)", "dynamic"],
        "dynamic",
    ),
    (
        "quantize",
        {
            "candidates": [
                {
                    "label": "all int8",
                    "kept_float": [],
                    "metrics": {"cosine_mean": 0.9},
                    "gate_passed": False,
                    "checks": [],
                    "passed": False,
                }
            ],
            "chosen": None,
        },
        ["all int8"],
        None,
    ),
    (
        "genai",
        {
            "candidates": [
                {
                    "label": "int4 rtn",
                    "passed": True,
                    "source": "default",
                    "checks": [],
                    "metrics": {},
                    "candidate": {},
                    "reconstruction": {},
                }
            ],
            "chosen": "int4 rtn",
            "builder": "0.15",
        },
        ["int4 rtn"],
        "int4 rtn",
    ),
    ("distill", {"layers": [0, 2], "loss_curve": []}, [], None),
]


@pytest.mark.parametrize(("kind", "details", "labels", "chosen"), CHOICES)
def test_each_kind_shows_what_it_chose_among(
    kind: str, details: dict[str, object], labels: list[str], chosen: str | None
) -> None:
    record = StageRecord("s", kind, {}, {}, GATE, details)
    choices = report.stage_choices(record)
    assert [c.label for c in choices] == labels
    assert [c.label for c in choices if c.chosen] == ([chosen] if chosen else [])


def test_the_markdown_report_names_each_check_its_source_and_an_ungated_stage() -> None:
    ungated: GateResult = {"passed": True, "source": "ungated", "checks": []}
    stages = [
        StageRecord("q", "quantize", {}, {"cosine_mean": 0.9}, GATE),
        StageRecord("c", "compile", {}, {"cosine_mean": 0.95}, ungated),
    ]
    text = report.markdown(RunSummary("demo", "gate failed", {"cosine_mean": 1.0}, stages, {"threads": 2}, "why"))
    assert "# demo: gate failed" in text
    assert "`cosine_mean` = 0.9 >= 0.99: **FAIL** (default gate), against the input model (m)" in text
    assert "- c: **ungated**" in text
    assert text.rstrip().endswith("why")


def test_the_markdown_report_has_a_row_per_engine_file_when_there_are_several() -> None:
    passed: GateResult = {"passed": True, "source": "default", "checks": []}
    engines = [
        {"engine": "onnxruntime", "file": "model.onnx", "metrics": {"cosine_mean": 0.99}, "gate": passed},
        {"engine": "openvino", "file": "openvino/openvino_model.xml", "metrics": {"cosine_mean": 1.0}, "gate": passed},
    ]
    run = RunSummary("demo", "passed", {"cosine_mean": 1.0}, [], {}, engines=engines)  # type: ignore[arg-type]
    text = report.markdown(run)
    assert "| openvino | `openvino/openvino_model.xml` | pass | 1 |" in text
    assert "Files per engine" not in report.markdown(RunSummary("demo", "passed", {"cosine_mean": 1.0}, [], {}))
