"""A model as the graph `torch.onnx` traces: one wrapper per task (optimize/formats/onnx_modules.py) with
the names the runtime feeds and reads, example inputs and dynamic axes, written by TorchScript's
tracer or the dynamo exporter. `optimize/pipeline/export.py` chooses between them and checks the result
against torch; the OpenVINO GenAI format converts the same graph."""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimize import tasks
from optimize.models.routes import ROUTE_CACHED, ROUTE_WHOLE

if TYPE_CHECKING:
    import torch

OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


@dataclass
class Graph:
    """What one export traces: the module, its input and output names, example inputs, and which
    axes of each are dynamic."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    axes: dict[str, dict[int, str]]
    route: str | None = None  # a decoder's: ROUTE_CACHED or ROUTE_WHOLE

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model inside the wrapper."""
        inner: torch.nn.Module = self.module.model  # type: ignore[assignment]
        return inner


def write(graph: Graph, path: Path, exporter: str) -> None:
    """`graph` as ONNX at `path` through `exporter` (one of EXPORTERS), its weights in the file."""
    import torch

    from optimize.formats.onnx_modules import rewritten

    names = list(graph.inputs)
    args = tuple(graph.inputs.values())
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1], rewritten(graph.model):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                graph.module, args, str(path), input_names=names, output_names=graph.outputs,
                dynamic_axes={**graph.axes}, opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )  # fmt: skip
            _tidy(path)
        else:
            dims = [{axis: torch.export.Dim.DYNAMIC for axis in graph.axes.get(name, {})} for name in names]
            # in the structure of the wrapper's forward: its named tensors, then one tuple for *rest
            params = list(inspect.signature(graph.module.forward).parameters.values())
            fixed = sum(p.kind != p.VAR_POSITIONAL for p in params)
            rest = (tuple(dims[fixed:]),) if len(params) > fixed else ()
            shapes = (*dims[:fixed], *rest)
            program = torch.onnx.export(
                graph.module, args, input_names=names, output_names=graph.outputs, dynamic_shapes=shapes,
                opset_version=OPSET, dynamo=True, optimize=True, verbose=False,
            )  # fmt: skip
            assert program is not None  # the dynamo exporter returns its program
            program.save(str(path))  # its weights in the file, or beside it past 2 GB


def _tidy(path: Path) -> None:
    """Two fixes to a TorchScript graph. Node names lose the wrapper's `/model` scope, so they name
    the model's own modules (`/embeddings/word_embeddings/Gather`), as precision plans and reports
    show them. And torch's count of a boolean tensor (CumSum, int64 in torch), which TorchScript
    writes as a CumSum of booleans (no valid ONNX graph) read as boolean, is made in int64 and given
    on as "non-zero" (Llama 4's chunked attention mask counts left padding so, and compares the count
    with zero)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # a large model's weights stay where they are
    for node in model.graph.node:
        if node.name.startswith("/model/"):
            node.name = node.name.removeprefix("/model")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    bools = [n for n in model.graph.node if n.op_type == "CumSum" and types.get(n.input[0]) == onnx.TensorProto.BOOL]
    for i, node in enumerate(bools):
        counted, total = f"{node.input[0]}_as_int64_{i}", f"{node.output[0]}_int64_{i}"
        before = onnx.helper.make_node("Cast", [node.input[0]], [counted], to=onnx.TensorProto.INT64)
        after = onnx.helper.make_node("Cast", [total], [node.output[0]], to=onnx.TensorProto.BOOL)
        at = list(model.graph.node).index(node)
        model.graph.node.insert(at + 1, after)
        model.graph.node.insert(at, before)
        node.input[0], node.output[0] = counted, total
    onnx.save(model, str(path))


def build_graph(module: torch.nn.Module, task: str) -> Graph:
    """The wrapper and example inputs for a model of `task`."""
    import torch

    from optimize.formats.onnx_modules import FirstOutput

    if task != tasks.GENERATION:
        takes_types = "token_type_ids" in inspect.signature(module.forward).parameters
        names = ["input_ids", "attention_mask", *(["token_type_ids"] if takes_types else [])]
        ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], dtype=torch.int64)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        output = "last_hidden_state" if tasks.embeds(task) else "logits"
        axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
        axes[output] = {0: "batch", 1: "sequence"} if tasks.embeds(task) else {0: "batch"}
        return Graph(FirstOutput(module, names), {n: inputs[n] for n in names}, [output], axes)
    return _decoder_graph(module)


def kv_cached(cache: object) -> bool:
    """Whether a decoder's cache (as its forward pass returned it) is keys and values alone, layer by
    layer, not a recurrent state or a convolution's window."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or not cache.layers:
        return False
    # A sliding window's layer (a DynamicLayer that drops what falls out of the window) is exported
    # whole: the window is the attention mask's work then, as in transformers' full-cache path.
    return all(isinstance(layer, DynamicLayer) and getattr(layer, "keys", None) is not None for layer in cache.layers)


def _decoder_graph(module: torch.nn.Module) -> Graph:
    import torch

    from optimize.formats.onnx_modules import WholeSequence, WithCache, returned_cache

    past = 3
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=torch.int64)
    with torch.inference_mode():
        prefix = returned_cache(module(input_ids=ids[:, :past], use_cache=True))
    if not kv_cached(prefix):
        mask = torch.ones_like(ids)
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        axes["logits"] = {0: "batch", 1: "sequence"}
        return Graph(WholeSequence(module), {"input_ids": ids, "attention_mask": mask}, ["logits"], axes, ROUTE_WHOLE)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones((2, past + ids.shape[1]), dtype=torch.int64),
        "position_ids": torch.arange(past, past + ids.shape[1]).repeat(2, 1),
    }
    outputs = ["logits"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {"position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for i, layer in enumerate(prefix.layers):
        for kind, tensor in (("key", layer.keys), ("value", layer.values)):
            inputs[f"past_key_values.{i}.{kind}"] = tensor.clone()
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            outputs.append(f"present.{i}.{kind}")
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    return Graph(WithCache(module, len(prefix.layers)), inputs, outputs, axes, ROUTE_CACHED)
