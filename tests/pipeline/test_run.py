"""optimize.pipeline's run state: what each gate is measured against (the input model, then the
newest trained model), and which other engines' files travel on from stage to stage."""

from __future__ import annotations

from pathlib import Path

from optimize.evaluate.gate import GateCheck
from optimize.models.handle import ModelHandle
from optimize.pipeline.alternates import Alternates
from optimize.pipeline.judging import Judging


class FakeEvaluator:
    """Agreement is 1.0 with the model itself and 0.5 with anything else; the reference's probe is 0.25."""

    def agreement(self, candidate: ModelHandle, base: ModelHandle) -> dict[str, float]:
        return {"cosine_min": 1.0 if candidate == base else 0.5}

    def probe(self, handle: ModelHandle) -> dict[str, float]:
        return {"cosine_min": 0.25}

    def resolution(self, handle: ModelHandle) -> dict[str, dict[str, float]]:
        return {}


def test_default_gates_measure_against_the_input_until_a_stage_trains_new_weights():
    judging = Judging(FakeEvaluator(), "my/model")  # type: ignore[arg-type]
    student = ModelHandle(Path("student"), "embeddings")
    assert judging.against("default") == "input model (my/model)"
    assert judging.probe(student) == {"cosine_min": 0.25}
    judging.adopt_anchor(student, 0, "distill")
    assert judging.against("default") == "stage 0 (distill) output"
    assert judging.against("recipe") == "input model (my/model)"  # a recipe's own gate: still the input
    assert judging.probe(student) == {"cosine_min": 1.0}
    judging.reference = {"cosine_min": 1.0}
    judged = judging.judge([GateCheck(metric="cosine_min", min=0.9)], {}, "default", student)
    assert judged["passed"] and judged["against"] == "stage 0 (distill) output"


def test_other_engines_files_travel_on_only_where_a_stage_keeps_them_and_never_for_the_models_own_engine():
    model = ModelHandle(Path("m"), "embeddings", onnx_path=Path("m/model.onnx"))
    openvino = model.with_onnx(Path("m/ov.onnx"), "openvino-bf16")
    alternates = Alternates()
    alternates.adopt(False, model, {"openvino": openvino}, {})
    assert alternates.files == {"openvino": openvino}
    alternates.adopt(True, model, {}, {})  # compile keeps them
    assert alternates.files == {"openvino": openvino}
    alternates.adopt(True, openvino, {"onnxruntime": model}, {})  # the model now runs on OpenVINO
    assert alternates.files == {"onnxruntime": model}
    alternates.adopt(False, model, {}, {})  # a stage that does not keep them
    assert alternates.files == {}
