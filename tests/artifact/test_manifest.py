"""optimize.artifact.manifest: the one manifest builder, timings kept out of the hashed manifest and
put back exactly, and every file but the measurements hashed when it is sealed."""

from __future__ import annotations

import json

from optimize.artifact import manifest
from optimize.runtime import merge_volatile, sha256_file

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
    stable, moved = manifest.split_volatile(MANIFEST)
    stage = stable["stages"][0]  # type: ignore[index]
    assert "latency_p50_ms" not in stage["metrics"] and stage["metrics"]["cosine_mean"] == 0.99
    assert "value" not in stage["gate"]["checks"][0]  # a check on a timing keeps its metric and verdict only
    assert stage["gate"]["checks"][1]["value"] == 0.99  # a check on quality keeps its value
    assert stage["details"] == {"chosen": "x"}
    assert merge_volatile(stable, moved) == MANIFEST


def test_a_sealed_manifest_hashes_every_file_but_the_measurements_and_keeps_its_timings_apart(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "report.md").write_text("timings")
    provenance = manifest.provenance("m", "abc", "recipe", "r1", 0, {}, [])
    stage = MANIFEST["stages"][0]
    built = manifest.build("r", "embeddings", provenance, {"metrics": {}, "details": {}, "conditions": {}},
                           [stage], {}, {"engine": "onnxruntime"}, [], [{"step": "export", "seconds": 1.5}])  # type: ignore[list-item]  # fmt: skip
    assert built["provenance"]["versions"]["python"]
    manifest.seal(built, tmp_path)
    sealed = json.loads((tmp_path / "manifest.json").read_text())
    assert sealed["files"] == {"model.onnx": {"sha256": sha256_file(tmp_path / "model.onnx"), "bytes": 5}}
    assert sealed["measurement_files"] == ["measurements.json", "report.md"]
    measurements = json.loads((tmp_path / "measurements.json").read_text())
    assert measurements["costs"] == [{"step": "export", "seconds": 1.5}] and "costs" not in sealed
    assert "latency_p50_ms" not in sealed["stages"][0]["metrics"]
