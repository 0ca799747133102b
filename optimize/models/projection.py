"""A learned output projection that a narrower (or wider) distilled student of a sentence-embedding
model ships with, so its embeddings keep the teacher's width and stay comparable to the teacher's
(an index of teacher vectors stays usable).

It is stored as sentence-transformers stores one, a `Dense` module after pooling (`2_Dense/` with
`config.json` and `model.safetensors`, listed in `modules.json`), so sentence-transformers loads the
student as it is. Mean pooling is linear, so projecting the pooled vector equals projecting every
token's hidden state and pooling after: the ONNX export appends the projection to
`last_hidden_state`, and the runtime needs nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FOLDER = "2_Dense"
IDENTITY = "torch.nn.modules.linear.Identity"

Projection = tuple[np.ndarray, np.ndarray]  # weight (out, in), bias (out,)


def read(checkpoint: Path) -> Projection | None:
    """The checkpoint's `Dense` module as (weight, bias), if it has one (with no activation)."""
    modules = checkpoint / "modules.json"
    if not modules.is_file():
        return None
    dense = [m for m in json.loads(modules.read_text()) if m.get("type", "").endswith("models.Dense")]
    if not dense:
        return None
    folder = checkpoint / dense[0]["path"]
    config = json.loads((folder / "config.json").read_text())
    if config.get("activation_function", IDENTITY) != IDENTITY:
        raise ValueError(f"{folder}: a Dense module with activation {config['activation_function']} is not supported")
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    weight = weights["linear.weight"].astype(np.float32)
    bias = weights.get("linear.bias", np.zeros(weight.shape[0], np.float32)).astype(np.float32)
    return weight, bias


def write(checkpoint: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """Add `2_Dense/` after the pooling module (before normalization) of a sentence-transformers checkpoint."""
    from safetensors.numpy import save_file

    folder = checkpoint / FOLDER
    folder.mkdir(exist_ok=True)
    config = {
        "in_features": int(weight.shape[1]),
        "out_features": int(weight.shape[0]),
        "bias": True,
        "activation_function": IDENTITY,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({"linear.weight": np.ascontiguousarray(weight), "linear.bias": bias}, str(folder / "model.safetensors"))
    path = checkpoint / "modules.json"
    modules = json.loads(path.read_text()) if path.is_file() else []
    if not any(m.get("type", "").endswith("models.Pooling") for m in modules):  # a plain checkpoint: mean pooling
        modules = [
            {"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        (checkpoint / "1_Pooling").mkdir(exist_ok=True)
        (checkpoint / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    pooling = next(i for i, m in enumerate(modules) if m.get("type", "").endswith("models.Pooling"))
    pooling_config = checkpoint / modules[pooling]["path"] / "config.json"
    settings = json.loads(pooling_config.read_text())
    settings["word_embedding_dimension"] = int(weight.shape[1])  # the student's width, which it pools
    pooling_config.write_text(json.dumps(settings, indent=2) + "\n")
    modules.insert(pooling + 1, {"path": FOLDER, "type": "sentence_transformers.models.Dense"})
    modules = [{"idx": i, "name": str(i), "path": m["path"], "type": m["type"]} for i, m in enumerate(modules)]
    path.write_text(json.dumps(modules, indent=2) + "\n")


def apply(hidden: np.ndarray, projection: Projection) -> np.ndarray:
    weight, bias = projection
    out: np.ndarray = hidden @ weight.T + bias
    return out


def append_to_onnx(path: Path, projection: Projection, output: str = "last_hidden_state") -> None:
    """Rewrite the ONNX model at `path` so `output` is projected (a MatMul and an Add at the end)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inner = f"{output}_unprojected"
    for node in graph.node:
        node.output[:] = [inner if name == output else name for name in node.output]
        node.input[:] = [inner if name == output else name for name in node.input]
    weight, bias = projection
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(weight.T), "projection.weight"),
            numpy_helper.from_array(bias, "projection.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [inner, "projection.weight"], ["projection.matmul"], name="projection/MatMul"),
            helper.make_node("Add", ["projection.matmul", "projection.bias"], [output], name="projection/Add"),
        ]
    )
    out = next(o for o in graph.output if o.name == output)
    out.type.tensor_type.shape.dim[-1].ClearField("dim_param")
    out.type.tensor_type.shape.dim[-1].dim_value = int(weight.shape[0])
    onnx.save(model, str(path))
