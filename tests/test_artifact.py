"""optimize.artifact.write: timings kept out of the hashed manifest and put back exactly, and OUT replaced
only by a complete folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimize.artifact import write as artifact
from optimize.runtime import merge_volatile

MANIFEST = {
    "name": "r",
    "stages": [
        {
            "metrics": {"cosine_mean": 0.99, "latency_p50_ms": 2.5, "size_mb": 20.0},
            "gate": {
                "checks": [
                    {"metric": "latency_p50_ms", "value": 2.5, "threshold": 3.0, "op": "<=", "passed": True},
                    {"metric": "cosine_mean", "value": 0.99, "threshold": 0.98, "op": ">=", "passed": True},
                ]
            },
            "details": {"speed": {"runs": [1, 2]}, "seconds": 4.0, "chosen": "x"},
        }
    ],
}


def test_timings_leave_the_manifest_and_come_back_the_same() -> None:
    stable, moved = artifact.split_volatile(MANIFEST)
    stage = stable["stages"][0]  # type: ignore[index]
    assert "latency_p50_ms" not in stage["metrics"] and stage["metrics"]["cosine_mean"] == 0.99
    assert "value" not in stage["gate"]["checks"][0]  # a check on a timing keeps its metric and verdict only
    assert stage["gate"]["checks"][1]["value"] == 0.99  # a check on quality keeps its value
    assert stage["details"] == {"chosen": "x"}
    assert merge_volatile(stable, moved) == MANIFEST


def test_out_is_replaced_only_by_a_complete_folder(tmp_path: Path) -> None:
    out, staging = tmp_path / "art", tmp_path / "staging"
    out.mkdir()
    (out / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    artifact.swap_into_place(staging, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old one and the staging folder are gone


def test_an_existing_out_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(artifact.UsageError, match="--overwrite"):
        artifact.check_destination(out, overwrite=False)
    artifact.check_destination(out, overwrite=True)
