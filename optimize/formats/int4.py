"""A torch decoder's Linear weights put on a symmetric grouped int4 grid by one of the recipe's
methods (the genai stage's `int4_methods`), for every format that stores such a grid
(compressed-tensors' W4A16, onnxruntime-genai's MatMulNBits through its pre-quantized path):

| method | scales | rounding |
|---|---|---|
| rtn  | each group's absmax / 7 | to the nearest step |
| awq  | `awq.scale` folded in, then each group's least-error clip (`gptq.group_scales`) | the nearest step |
| gptq | the same | `gptq.quantize`: column by column, the error carried by the inverse Hessian |

awq and gptq read the calibration texts (`gptq.windows`: one stream in windows of `SEQ_LEN`) once,
for every Linear's input Hessian. The weights are replaced in place by their rounded values (floats
on the grid) and each Linear's scales are returned, so a writer stores codes that are exact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from optimize.formats import awq, gptq

if TYPE_CHECKING:
    import torch

Int4Method = Literal["gptq", "awq", "rtn"]
METHODS: tuple[str, ...] = get_args(Int4Method)
SEQ_LEN = 512  # tokens per calibration window
TOP = 7  # codes in [-8, 7]


def linears(model: torch.nn.Module, kept: Sequence[str] = ()) -> list[str]:
    """The Linears quantized: all but the LM head and those whose names end with one of `kept`."""
    import torch

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and not any(name.endswith(k) for k in kept)
    ]


def round_model(
    model: torch.nn.Module, names: Sequence[str], checkpoint: Path, texts: Sequence[str], method: str, group: int
) -> dict[str, torch.Tensor]:
    """The named Linears of `model` (loaded from `checkpoint`) rounded in place by `method` at
    `group` inputs per scale; each one's scales (out x in / group)."""
    import torch

    modules = dict(model.named_modules())
    weights = {name: modules[name].get_parameter("weight") for name in names}
    if method == "rtn":
        hessians = None
    else:
        hessians = gptq.hessians(model, names, gptq.windows(checkpoint, texts, SEQ_LEN))
        awq.scale(model, hessians, group)
    scales = {}
    with torch.no_grad():
        for name, weight in weights.items():
            if method == "gptq":
                assert hessians is not None
                rounded, scales[name] = gptq.quantize(weight, hessians[name], group, TOP)
            else:
                chosen = (
                    gptq.absmax_scales(weight, group, TOP)
                    if hessians is None
                    else gptq.group_scales(weight, hessians[name].diagonal(), group, TOP)
                )
                scales[name] = chosen.to(weight.dtype)
                rounded = gptq.on_grid(weight, scales[name], group, TOP)
            weight.copy_(rounded)
    return scales
