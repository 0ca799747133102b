"""The manifest, built in one place: `build` assembles it from the run's plain values (what the
recipe, the reference and each stage measured and decided, the engines' files), and `seal` finishes
it in the staging folder: the timings moved out to measurements.json (so the same recipe, inputs and
seed give byte-identical files), every other file hashed, the manifest written last. Its types are
the runtime's (`runtime/manifest.py`), which reads it without importing optimize."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import cast

from optimize import __version__
from optimize.runtime import sha256_file
from optimize.runtime.engines import ENGINES
from optimize.runtime.manifest import (
    EngineFile,
    JsonObject,
    Manifest,
    Provenance,
    Reference,
    RuntimeSettings,
    StageJson,
)

SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "optimize": __version__}
    for name, dists in {
        "torch": ["torch"],
        "transformers": ["transformers"],
        "onnx": ["onnx"],
        "numpy": ["numpy"],
        "tokenizers": ["tokenizers"],
        "onnxscript": ["onnxscript"],  # the dynamo exporter's writer
        **{e.name: list(e.dists) for e in ENGINES.values() if e.dists},  # the engines' libraries
        "nncf": ["nncf"],
    }.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


# What varies from one run to the next (timings and what is derived from them) is kept out of the
# manifest, in measurements.json, so the same recipe, inputs and seed give byte-identical files.
VOLATILE = {
    *("throughput_per_s", "seconds", "speed", "worst_ratio_to_fp32", "peak_rss_mb", "created", "decode_tok_s"),
    "costs",  # each step's time and memory; a warm run has fewer steps
}


# Files that carry timings: written beside the model, listed in the manifest, not hashed.
MEASUREMENT_FILES = ("measurements.json", "report.md", "report.json", "report.html")


def _volatile(key: str) -> bool:
    return key.endswith("_ms") or key in VOLATILE


def split_volatile(value: object) -> tuple[object, object]:
    """(value without timings, the timings at the same paths): keys ending in `_ms`, throughput,
    seconds, speed details, and the value, threshold and reference of a gate check on a timing."""
    if isinstance(value, dict):
        stable: dict[object, object] = {}
        moved: dict[object, object] = {}
        metric = value.get("metric")
        timing_check = isinstance(metric, str) and _volatile(metric)
        for k, v in value.items():
            if _volatile(str(k)) or (timing_check and k in ("value", "threshold", "reference")):
                moved[k] = v
                continue
            stable[k], inner = split_volatile(v)
            if inner:
                moved[k] = inner
        return stable, moved
    if isinstance(value, list):
        pairs = [split_volatile(v) for v in value]
        moved_items = [m for _, m in pairs]
        return [s for s, _ in pairs], (moved_items if any(moved_items) else None)
    return value, None


def provenance(
    source: str,
    source_sha256: str,
    recipe: str,
    recipe_sha256: str,
    seed: int,
    calibration: JsonObject,
    data: list[JsonObject],
) -> Provenance:
    """Where the artifact came from: the model as the user named it and its hash, the recipe, the
    seed, the calibration data, each data set read, and the versions of what made it."""
    return {
        "source": source,
        "source_sha256": source_sha256,
        "recipe": recipe,
        "recipe_sha256": recipe_sha256,
        "seed": seed,
        "calibration": calibration,
        "data": data,
        "versions": versions(),
    }


def build(
    name: str,
    task: str,
    provenance: Provenance,
    reference: Reference,
    stages: list[StageJson],
    plan: dict[str, str],
    runtime: RuntimeSettings,
    engines: list[EngineFile],
    costs: list[JsonObject],
) -> Manifest:
    """The manifest of a run that passed: `runtime` is what the shipped runtime needs (target,
    engine, sequence length, the stages' own settings); `engines` each engine's file, fastest first;
    `costs` each step's time and memory (measurements.json only)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "task": task,
        "provenance": provenance,
        "reference": reference,
        "stages": stages,
        "precision_plan": plan,
        "runtime": runtime,
        "engines": engines,
        "costs": costs,
    }


def seal(manifest: Manifest, staging: Path) -> None:
    """Write measurements.json (the manifest's timings) and manifest.json (the rest, and the sha256
    and size of every file in `staging` but the measurement files), last."""
    stable, measurements = split_volatile(manifest)
    sealed = cast(Manifest, stable)  # the same keys, without the timings
    (staging / "measurements.json").write_text(json.dumps(measurements or {}, indent=2, sort_keys=True) + "\n")
    files = sorted(p for p in staging.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sealed["files"] = {
        str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in files
        if str(p.relative_to(staging)) not in MEASUREMENT_FILES
    }
    sealed["measurement_files"] = [name for name in MEASUREMENT_FILES if (staging / name).is_file()]
    (staging / "manifest.json").write_text(json.dumps(sealed, indent=2, sort_keys=True) + "\n")
