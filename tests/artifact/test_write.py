"""optimize.artifact.write: OUT replaced only by a complete folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimize.artifact import write as artifact


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
