"""optimize.pipeline.cache: keys that chain, entries written whole or not at all, and what `cache list` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimize.models.handle import ModelHandle
from optimize.pipeline import cache


def test_a_key_hashes_every_part_and_their_order() -> None:
    assert cache.key("run", 1, {"b": 2, "a": 1}) == cache.key("run", 1, {"a": 1, "b": 2})  # dict order is not a change
    assert cache.key("run", 1) != cache.key("run", 2)
    assert cache.key("a", "b") != cache.key("b", "a")
    assert cache.key(Path("/x")) == cache.key("/x")  # paths hash as their text


def test_an_entry_is_made_once_and_read_back(tmp_path: Path) -> None:
    store = cache.StageCache(tmp_path / "stages")
    calls: list[Path] = []

    def fill(folder: Path) -> cache.Entry:
        calls.append(folder)
        (folder / "model.onnx").write_bytes(b"onnx")
        return {"step": "export", "recipe": "r", "onnx": "model.onnx"}

    folder, entry = store.put("k1", fill)
    again = store.put("k1", fill)
    assert len(calls) == 1  # the second put found the first one's entry
    assert again[1] == entry and entry["step"] == "export" and entry["created"] > 0
    assert (folder / "model.onnx").read_bytes() == b"onnx"
    assert store.get("missing") is None


def test_a_failed_fill_leaves_no_entry(tmp_path: Path) -> None:
    store = cache.StageCache(tmp_path / "stages")

    def fill(folder: Path) -> cache.Entry:
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.put("k", fill)
    assert store.get("k") is None
    assert not [p for p in (tmp_path / "stages").iterdir() if p.is_dir()]  # the staging folder went too


def test_entries_list_newest_first_and_clear_frees_them(tmp_path: Path) -> None:
    store = cache.StageCache(tmp_path / "stages")
    for name in ("old", "new"):
        store.put(name, lambda folder, name=name: {"step": name, "recipe": "r"})
    listed = store.entries()
    assert [row["key"] for row in listed] == ["new", "old"]
    assert {row["step"] for row in listed} == {"new", "old"}
    assert store.clear() > 0
    assert store.entries() == []


def test_a_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    store = cache.StageCache(tmp_path / "stages")
    store.put("k", lambda folder: {"step": "s"})
    (tmp_path / "stages" / "k" / cache.ENTRY).write_text("{not json")
    assert store.get("k") is None


def test_a_run_key_chains_so_a_changed_step_changes_every_later_key(tmp_path: Path) -> None:
    model = ModelHandle(tmp_path, "feature-extraction")

    def keys(first_config: str) -> list[str]:
        run = cache.RunCache(cache.StageCache(tmp_path / "stages"), cache.key("base"), "r")
        out = []
        for step, config in (("stage 0", first_config), ("stage 1", "same")):
            step_key, found = run.lookup(step, config)
            assert found is None
            run.keep(step_key, step, {}, model, model)
            out.append(step_key)
        return out

    a, b = keys("one"), keys("two")
    assert a[0] != b[0] and a[1] != b[1]  # stage 1's config is the same, its key is not


def test_without_a_store_nothing_is_kept_but_keys_still_chain(tmp_path: Path) -> None:
    model = ModelHandle(tmp_path, "feature-extraction")
    run = cache.RunCache(None, cache.key("base"), "r")
    step_key, found = run.lookup("stage 0")
    run.keep(step_key, "stage 0", {}, model, model)
    assert found is None and run.key == step_key
    assert not (tmp_path / "stages").exists()


def test_referenced_files_hash_what_a_config_names(tmp_path: Path) -> None:
    data = tmp_path / "train.txt"
    data.write_text("a\nb\n")
    config = {"data": [{"path": "train.txt"}], "steps": 3, "note": "not/a/file"}
    first = cache.referenced_files(config, tmp_path)
    data.write_text("a\nc\n")
    second = cache.referenced_files(config, tmp_path)
    assert list(first) == ["train.txt"] and first != second  # same name, new bytes: a new step
    assert json.dumps(second)  # JSON-able, as the key needs
