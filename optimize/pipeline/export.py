"""Checkpoint -> ONNX with `torch.onnx`, checked against torch on real inputs.

The pipeline inserts this step wherever a stage needs ONNX. One wrapper per task gives the graph the
names the runtime feeds and reads (`input_ids`, `attention_mask`[, `token_type_ids`] ->
`last_hidden_state` or `logits`; a decoder adds `position_ids` and `past_key_values.N.key/value` ->
`present.N.key/value`). The model is loaded with eager attention.

Two exporters, tried in this order, the first whose graph agrees with torch kept (`EXPORTERS`):
TorchScript's tracer, whose graphs onnxruntime's transformer optimizer fuses (MiniLM: Attention,
SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), then the dynamo exporter
(`torch.export`), which traces models the tracer cannot. The export record names the one used and
why the others were passed over.

The graphs themselves are `optimize/formats/onnx_graph.py`'s. A decoder is exported with its KV cache when
every layer's cache is plain keys and values (what `graphs.kv_cached` checks); a cache of another
kind (linear attention's recurrent state, short convolutions) makes a graph over the whole sequence
instead, which the runtime's loop runs again for each token: the slower route, named `route` in the
record and the manifest. The stage cache keeps exports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optimize import tasks
from optimize.errors import DependencyError
from optimize.evaluate.measure import open_model, stepped_logits
from optimize.formats.onnx_graph import EXPORTERS, OPSET, build_graph, write
from optimize.models import projection
from optimize.models.handle import ModelHandle
from optimize.models.loading import load_torch
from optimize.models.routes import ROUTE_CACHED, STEPPED_IDS

if TYPE_CHECKING:
    import torch

# max |onnx - torch| on the outputs, per unit of their largest magnitude (logits reach ~40, hidden
# states ~10), beyond which the export is wrong rather than rounded differently.
TOLERANCE = 1e-4


def export(
    model: ModelHandle, workdir: Path, texts: Sequence[str], seq_len: int
) -> tuple[ModelHandle, dict[str, object]]:
    """Returns the ONNX handle and what was checked (exporter, route, opset, max_abs_diff vs torch).
    Reuse is the stage cache's business: the pipeline keeps this step like any other."""
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    module = load_torch(model)
    graph = build_graph(module, model.task)
    passed_over: list[str] = []
    for exporter in EXPORTERS:
        path = workdir / "model.onnx"
        for stale in workdir.glob("model.onnx*"):
            stale.unlink()
        try:
            write(graph, path, exporter)
        except Exception as exc:  # the exporter's own failure: the next one may trace it
            passed_over.append(f"{exporter}: {type(exc).__name__}: {_last_line(exc)}")
            continue
        dense = projection.read(model.checkpoint) if tasks.embeds(model.task) else None
        if dense is not None:  # a distilled student of another width ships a projection to the teacher's
            projection.append_to_onnx(path, dense)
        exported = model.with_onnx(path)
        diff, scale = max_abs_diff(model, exported, texts, seq_len)
        if graph.route == ROUTE_CACHED and diff <= TOLERANCE * max(scale, 1.0):
            diff = max(diff, _stepped_diff(module, exported, seq_len))
        if diff > TOLERANCE * max(scale, 1.0):
            passed_over.append(f"{exporter}: differs from torch by {diff:.2e} (> {TOLERANCE} x {scale:.1f})")
            continue
        info: dict[str, object] = {"exporter": exporter, "opset": OPSET, "max_abs_diff": diff, "output_scale": scale}
        if passed_over:
            info["passed_over"] = passed_over
        if graph.route is not None:
            info["route"] = graph.route
        return exported, info
    raise DependencyError(
        f"torch {torch.__version__}'s ONNX exporters cannot export this {type(module).__name__}: "
        + "; ".join(passed_over)
    )


def max_abs_diff(a: ModelHandle, b: ModelHandle, texts: Sequence[str], seq_len: int) -> tuple[float, float]:
    """Largest absolute difference of the raw outputs (last hidden states or logits) on real inputs,
    at real tokens only (what a model computes at padding differs between runtimes), and the
    largest absolute value of `a`'s outputs there, the scale a tolerance should be relative to."""
    first, second = open_model(a, seq_len), open_model(b, seq_len)
    inputs = first.tokenizer(texts)
    reference = first.run(inputs)
    diff = np.abs(reference - second.run(inputs))
    if diff.ndim == 3:
        real = inputs["attention_mask"].astype(bool)
        diff, reference = diff[real], reference[real]
    return float(diff.max()), float(np.abs(reference).max())


def _stepped_diff(module: torch.nn.Module, exported: ModelHandle, seq_len: int) -> float:
    """Largest |logits| difference between torch over a whole sequence and the graph fed as
    generation feeds it (the first half, then one token at a time through the cache it returned)."""
    import torch

    with torch.inference_mode():
        expected = module(input_ids=torch.tensor([STEPPED_IDS]), use_cache=False).logits[0].float().numpy()
    return float(np.abs(stepped_logits(exported, seq_len) - expected).max())


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
