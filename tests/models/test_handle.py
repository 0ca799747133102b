"""optimize.models: the handle a stage takes and returns, the one reader of config.json, the one
folder hash, and the checkpoint files that travel with a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimize.errors import UsageError
from optimize.models.checkpoint import copy_checkpoint_files, folder_sha256, read_config
from optimize.models.handle import ModelHandle


def test_a_handle_keeps_its_engine_with_a_new_onnx_file_and_drops_it_with_new_weights(tmp_path):
    handle = ModelHandle(tmp_path, "embeddings", allow_pickle=True).with_onnx(tmp_path / "a.onnx", "openvino")
    assert handle.is_onnx and handle.engine == "openvino"
    assert handle.with_onnx(tmp_path / "b.onnx").engine == "openvino"
    student = handle.with_checkpoint(tmp_path / "student")
    assert student.onnx_path is None and student.engine == "onnxruntime" and not student.allow_pickle


@pytest.mark.parametrize(
    ("content", "said"),
    [(None, "no config.json"), ("{not json", "not readable JSON"), ("[1, 2]", "holds list, not an object")],
)
def test_config_json_is_read_or_refused_in_one_line_naming_the_folder(tmp_path, content, said):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(UsageError, match=said) as caught:
        read_config(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_the_folder_hash_follows_names_and_bytes_not_times(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("two")
    first = folder_sha256(tmp_path)
    (tmp_path / "a.txt").write_text("one")  # rewritten, same bytes
    assert folder_sha256(tmp_path) == first
    (tmp_path / "a.txt").rename(tmp_path / "c.txt")
    assert folder_sha256(tmp_path) != first
    assert folder_sha256(tmp_path, "*.py") != folder_sha256(tmp_path)  # only the matching files


def test_checkpoint_files_travel_with_every_module_folder_modules_json_names(tmp_path):
    source, target = tmp_path / "model", tmp_path / "out"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "3_Custom").mkdir()
    target.mkdir()
    for name in ("tokenizer.json", "config.json", "model.safetensors", "1_Pooling/config.json", "3_Custom/x.json"):
        (source / name).write_text("{}")
    modules = [{"path": "1_Pooling", "type": "Pooling"}, {"path": "3_Custom", "type": "Custom"}]
    (source / "modules.json").write_text(json.dumps(modules))
    copy_checkpoint_files(source, target)
    copied = sorted(str(p.relative_to(target)) for p in Path(target).rglob("*") if p.is_file())
    assert copied == ["1_Pooling/config.json", "3_Custom/x.json", "config.json", "modules.json", "tokenizer.json"]
