"""optimize.runtime.engines: the one table of engines, and what reads it: the artifact's file names,
the runtime's engine choice, OpenVINO's precisions, and a clear error for an engine that does not
generate."""

from __future__ import annotations

import pytest

from optimize.artifact.write import ENGINE_FILES
from optimize.runtime.engines import (
    DEFAULT_ENGINE,
    ENGINES,
    GENERATING,
    family,
    on_openvino,
    open_engine,
    openvino_engine,
)


def test_every_engine_file_an_artifact_holds_is_a_row_of_the_table():
    assert ENGINE_FILES[DEFAULT_ENGINE] == "model.onnx"
    assert set(ENGINE_FILES) == {e.library for e in ENGINES.values() if e.path != "."}
    for engine in ENGINES.values():  # the file that says an artifact has it lies under its path
        assert engine.path == "." or engine.opens.startswith(engine.path)


def test_both_openvino_precisions_read_one_file_and_only_they_run_on_openvino():
    assert {e for e in ENGINES if on_openvino(e)} == {"openvino", "openvino-bf16"}
    assert family("openvino-bf16") == family("openvino") == "openvino"
    assert openvino_engine(True) == "openvino-bf16" and openvino_engine(False) == "openvino"
    assert not on_openvino("no-such-engine") and family("no-such-engine") == "no-such-engine"


def test_the_engines_that_generate_each_open_their_own_folder_with_a_module_to_install():
    assert GENERATING == ("onnxruntime-genai", "openvino-genai", "llama.cpp")
    for name in GENERATING:
        assert ENGINES[name].module and ENGINES[name].package and ENGINES[name].requirements


def test_an_engine_that_does_not_generate_is_refused_naming_those_that_do(tmp_path):
    with pytest.raises(ValueError, match=r"one of onnxruntime-genai, openvino-genai, llama\.cpp"):
        open_engine("compressed-tensors", tmp_path, threads=1)
