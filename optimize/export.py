"""Checkpoint -> ONNX through optimum-onnx, checked against torch on real inputs.

The pipeline inserts this step wherever a stage needs ONNX. The model is loaded with eager
attention so ONNX Runtime's transformer fusions can recognise the attention pattern later.
The stage cache keeps exports (one cache: `--no-cache` and `optimize cache clear` cover them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from optimize import projection, tasks
from optimize.evaluate import max_abs_diff
from optimize.model import ModelHandle, load_torch

OPSET = 18
# max |onnx - torch| on the outputs, per unit of their largest magnitude (logits reach ~40, hidden
# states ~10), beyond which the export is wrong rather than rounded differently.
TOLERANCE = 1e-4


def content_sha256(folder: Path) -> str:
    """One hash over every file of a checkpoint folder (names and bytes), in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export(
    model: ModelHandle, workdir: Path, texts: Sequence[str], seq_len: int
) -> tuple[ModelHandle, dict[str, object]]:
    """Returns the ONNX handle and what was checked (opset, max_abs_diff vs torch). Reuse is the
    stage cache's business: the pipeline keeps this step like any other."""
    _export(model, workdir)
    exported = model.with_onnx(workdir / "model.onnx")
    diff, scale = max_abs_diff(model, exported, texts, seq_len)
    if diff > TOLERANCE * max(scale, 1.0):
        raise RuntimeError(
            f"the ONNX export differs from torch by {diff:.2e} (> {TOLERANCE} x {scale:.1f}); "
            "this is a bug in the exporter for this architecture"
        )
    return exported, {"opset": OPSET, "max_abs_diff": diff, "output_scale": scale}


def _export(model: ModelHandle, workdir: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    task = tasks.TASKS[model.task].export_task
    onnx_export_from_model(load_torch(model), workdir, task=task, opset=OPSET, do_validation=False)
    dense = projection.read(model.checkpoint) if tasks.embeds(model.task) else None
    if dense is not None:  # a distilled student of another width ships a projection to the teacher's
        projection.append_to_onnx(workdir / "model.onnx", dense)
