"""optimize.stages.quantize_methods: the table of methods as a recipe names them (each with its own
fields, another's refused), the defaults per precision, and which OpenVINO engine runs the float ops."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from optimize import cpu
from optimize.stages import quantize_methods as methods
from optimize.stages.quantize_methods import Dynamic, OpenVINOStatic, Static, WeightOnly4


def test_a_recipe_names_a_method_and_its_own_fields_only():
    method = TypeAdapter(methods.Method).validate_python({"name": "dynamic", "per_channel": False})
    assert isinstance(method, Dynamic) and not method.per_channel and method.precision == "int8"
    assert isinstance(TypeAdapter(methods.Method).validate_python({"name": "static"}), Static)
    with pytest.raises(ValidationError, match="per_channel"):
        TypeAdapter(methods.Method).validate_python({"name": "rtn", "per_channel": False})


def test_each_precision_has_a_default_method():
    assert isinstance(methods.default_method("int4"), WeightOnly4)
    assert isinstance(methods.default_method("int8"), Dynamic)
    assert Dynamic().engine == "onnxruntime"


def test_openvino_runs_float_ops_in_bf16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setattr(cpu, "current", lambda: cpu.CpuInfo("x", frozenset({"avx2", "avx512_bf16"})))
    assert methods.float_engine() == "openvino-bf16"
    assert OpenVINOStatic(name="openvino", float_ops="f32").engine == "openvino"
    monkeypatch.setattr(cpu, "current", lambda: cpu.CpuInfo("x", frozenset({"avx2"})))
    assert OpenVINOStatic(name="openvino").engine == "openvino"
