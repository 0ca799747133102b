"""Verification of an artifact against its manifest: every listed file's size and sha256, every
model file listed, the manifest's own fields; the timings kept apart (measurements.json) merged back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import cast

from .manifest import Manifest


class ArtifactError(Exception):
    """The artifact cannot be used as it is (a tampered or missing file)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_volatile(stable: object, moved: object) -> object:
    """The inverse of `split_volatile`: the manifest with its measurements put back."""
    if isinstance(stable, dict) and isinstance(moved, dict):
        merged = dict(stable)
        for k, v in moved.items():
            merged[k] = merge_volatile(stable[k], v) if k in stable else v
        return merged
    if isinstance(stable, list) and isinstance(moved, list):
        return [merge_volatile(s, m) if m else s for s, m in zip(stable, moved, strict=False)]
    return stable


# Model files the runtime may load: each must be listed (and hashed) in the manifest.
MODEL_FILES = (
    "model.onnx",
    "model.onnx.data",
    "tokenizer.json",
    "genai_config.json",
    "openvino/openvino_model.xml",
    "openvino/openvino_model.bin",
)


def verify(artifact_dir: Path) -> Manifest:
    """Check every file the manifest lists, and that every model file present is listed; returns
    the manifest with its measurements (measurements.json: timings, not hashed) merged back."""
    artifact_dir = Path(artifact_dir)
    manifest_path = artifact_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{artifact_dir}: no manifest.json; is this an optimize artifact?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not readable JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{manifest_path}: no `files` table; the manifest is damaged, refusing to load it")
    _check_files(artifact_dir, manifest_path, files)
    for key, kind in (("runtime", dict), ("stages", list), ("provenance", dict), ("name", str)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{manifest_path}: `{key}` is missing or not a {kind.__name__}; the manifest is damaged"
            )
    measurements = artifact_dir / "measurements.json"
    if measurements.is_file():
        try:
            manifest = merge_volatile(manifest, json.loads(measurements.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{measurements}: not readable JSON ({exc})") from None
    return cast(Manifest, manifest)  # the fields read are checked above


def _check_files(artifact_dir: Path, manifest_path: Path, files: dict[str, object]) -> None:
    """Every listed file inside the folder with its size and sha256, and every model file listed."""
    for name, entry in files.items():
        path = artifact_dir / name
        inside = path.resolve().is_relative_to(artifact_dir.resolve())
        if not inside or not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
            raise ArtifactError(f"{manifest_path}: files: {name!r} is not a file of this folder with sha256 and bytes")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest; the file was changed "
                "after the artifact was made, refusing to load it"
            )
    unlisted = [name for name in MODEL_FILES if (artifact_dir / name).exists() and name not in files]
    if unlisted or "model.onnx" not in files:
        missing = ", ".join(unlisted) or "model.onnx"
        raise ArtifactError(f"{manifest_path}: {missing} not listed in the manifest; refusing an unchecked model file")
