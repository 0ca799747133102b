"""Loading a checkpoint in torch without transformers' peak: built empty and filled a tensor at a time,
16-bit weights kept in 16 bits and widened to fp32 as each layer runs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from optimize.runtime.untyped import HfObject

if TYPE_CHECKING:
    import torch


WIDENED_ROWS = 8192  # a 16-bit output layer wider than this is widened this many rows at a time


def _in_slices(layer: HfObject, widen: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A wide 16-bit Linear (a language model's head) in fp32, WIDENED_ROWS of its outputs at a time."""
    import torch

    weight, bias = layer.weight, layer.bias
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for start in range(0, weight.shape[0], WIDENED_ROWS):
        rows = slice(start, start + WIDENED_ROWS)
        part = None if bias is None else bias[rows].float()
        out[..., rows] = torch.nn.functional.linear(x, widen(weight[rows]), part)
    return out


def _widened_as_they_run(module: HfObject) -> None:
    """`module`'s 16-bit Linear and Embedding weights widened to fp32 each time their layer runs."""
    import torch
    from torch.nn.utils import parametrize

    scratch = [torch.empty(0)]  # one fp32 buffer, as large as the largest weight widened so far

    def widen(weight: torch.Tensor) -> torch.Tensor:
        """`weight` in fp32 (exact: every bf16 and fp16 is an fp32), in the one scratch buffer every
        layer reuses: each layer reads its weight once and computes its output before the next layer
        widens its own (eager inference; no graph keeps it). A fresh fp32 copy each call is memory the
        system maps in anew (above glibc's 32 MB threshold): a 1.04B Llama's 64-token call took 2.2
        to 2.4 s so, 1.4 to 1.7 with a reused buffer, the same logits."""
        if scratch[0].numel() < weight.numel():
            scratch[0] = torch.empty(weight.numel(), dtype=torch.float32)
        return scratch[0][: weight.numel()].view(weight.shape).copy_(weight)

    class Widened(torch.nn.Module):
        """A 16-bit weight as fp32 where its layer reads it."""

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return widen(weight)

    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear | torch.nn.Embedding) or layer.weight.dtype == torch.float32:
            continue
        if layer.__class__ is torch.nn.Embedding:
            # the rows looked up, widened (the same values as from a widened table, without one)
            layer.register_forward_hook(lambda _, __, rows: rows.float())
        elif layer.__class__ is torch.nn.Linear and layer.out_features > WIDENED_ROWS:
            layer.forward = functools.partial(_in_slices, layer, widen)  # type: ignore[method-assign]  # no fp32 head
        else:
            parametrize.register_parametrization(layer, "weight", Widened(), unsafe=True)  # unsafe: changes dtype


def lean_torch(auto: HfObject, checkpoint: Path) -> torch.nn.Module | None:
    """`auto`'s model of `checkpoint` built without initializing its weights, then each safetensors
    tensor read (not mapped) into it, a tensor at a time. The weights of its Linear and Embedding
    layers stay in the checkpoint's 16 bits (bf16, fp16) and are widened to fp32 each time a layer
    runs (`_widened_as_they_run`): the fp32 computation on half the memory, exactly (a vocabulary-wide
    head, widened WIDENED_ROWS rows at a time, within 1e-6; exact on a 0.33B Llama), widening about
    0.5 ns a weight per call here. Other tensors are read as fp32. None where the checkpoint's names
    do not fill the model exactly (transformers' loader knows more)."""
    import numpy as np
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from optimize.models.safetensors import header, read_float, read_into

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    with no_init_weights():  # fp32 storage, never written where a 16-bit weight replaces it (so never resident)
        module: HfObject = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    expected, loaded = module.state_dict(), set()
    computed = {name for name, _ in module.named_buffers()} - set(expected)  # e.g. position_ids, made by the model
    narrow = {"BF16": torch.bfloat16, "F16": torch.float16}
    Widenable = torch.nn.Linear | torch.nn.Embedding
    for path in files:
        tensors, start = header(path)
        for name, entry in tensors.items():
            if name in computed:
                continue  # an old checkpoint's copy of a buffer the model now computes (as transformers skips it)
            if name not in expected or entry["dtype"] not in ("BF16", "F16", "F32"):
                return None
            owner, _, leaf = name.rpartition(".")
            layer = module.get_submodule(owner)
            if leaf == "weight" and isinstance(layer, Widenable) and entry["dtype"] in narrow:
                shape = [int(d) for d in entry["shape"]]  # type: ignore[attr-defined]
                kept = torch.empty(shape, dtype=narrow[str(entry["dtype"])])
                read_into(path, start, entry, kept.view(torch.uint8).numpy().reshape(-1))
                layer.weight = torch.nn.Parameter(kept, requires_grad=False)
            else:
                module.load_state_dict({name: torch.from_numpy(np.array(read_float(path, start, entry)))}, strict=False)
            loaded.add(name)
    module.tie_weights()
    filled = {module.state_dict()[name].data_ptr() for name in loaded}
    if any(tensor.data_ptr() not in filled for name, tensor in module.state_dict().items() if name not in loaded):
        return None  # a weight the checkpoint did not give and is not tied to one it did
    _widened_as_they_run(module)
    built: torch.nn.Module = module
    return built
