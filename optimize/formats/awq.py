"""AWQ's activation-aware scales (Lin et al., 2023): before int4 rounding, each input channel of the
Linears that read one activation is multiplied by s = energy^alpha (the channel's mean squared
input, from the calibration Hessians' diagonal), and the op that produced the activation divides its
output by s, so the float model computes the same; the channels that carry most of the signal get
finer steps. alpha is searched per activation over 0, 0.1, ... 1, the one whose rounding moves the
Linears' outputs least (tr(D H D^T), D the weights' rounding error) kept.

The producers that can absorb 1/s: a decoder layer's RMSNorm before attention and before the MLP
(whose weight multiplies its output: Llama, Mistral, Qwen, Granite; not Gemma's `1 + weight`), and
the MLP's up projection before its down projection (gated MLPs multiply act(gate) by up). Where a
model has none of these (post-norm OLMo 2, Gemma) its Linears are left unscaled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimize.formats import gptq

if TYPE_CHECKING:
    import torch

ALPHAS = tuple(k / 10 for k in range(11))
# (producer, how it absorbs 1/s, the Linears reading its output), by suffix within a decoder layer
PAIRS = (
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", "rows", ("mlp.down_proj",)),
)


def nearest(weight: torch.Tensor, group: int) -> torch.Tensor:
    """`weight` rounded to the nearest step of its group's absmax scale (the search's quick proxy)."""
    return gptq.on_grid(weight, gptq.absmax_scales(weight, group), group)


def _moved(weight: torch.Tensor, scaled: torch.Tensor, s: torch.Tensor, hessian: torch.Tensor, group: int) -> float:
    """How far the Linear's outputs move on the calibration inputs when its weights are scaled by
    `s`, rounded, and scaled back: tr(D H D^T)."""
    difference = weight - nearest(scaled, group) / s
    return float(((difference @ hessian) * difference).sum())


def _absorbs(producer: torch.nn.Module, how: str) -> bool:
    """Whether `producer` can take 1/s on its output: a Linear's rows, or a norm whose weight multiplies."""
    import torch

    if how == "rows":
        return isinstance(producer, torch.nn.Linear)
    name = type(producer).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(producer, "weight")


def scale(model: torch.nn.Module, hessians: dict[str, torch.Tensor], group: int) -> dict[str, float]:
    """Each `PAIRS` activation's scales folded into `model` (its producer divided, its readers
    multiplied) and into `hessians` (in place: a reader's inputs are now x / s); the alpha kept for
    each producer, by name."""
    import torch

    modules = dict(model.named_modules())
    layers = sorted({name.rsplit(".", 2)[0] for name in hessians if name.count(".") >= 3})
    chosen: dict[str, float] = {}
    with torch.no_grad():
        for layer in layers:
            for producer_name, how, readers in PAIRS:
                names = [f"{layer}.{reader}" for reader in readers]
                producer = modules.get(f"{layer}.{producer_name}")
                if producer is None or not all(n in hessians for n in names) or not _absorbs(producer, how):
                    continue
                alpha, s = _search([modules[n].get_parameter("weight") for n in names], hessians[names[0]], group)
                for name in names:
                    modules[name].get_parameter("weight").mul_(s)
                    hessians[name] = hessians[name] / s.double().unsqueeze(0) / s.double().unsqueeze(1)
                weight = producer.get_parameter("weight")
                weight.div_(s if how == "norm" else s.unsqueeze(1))
                chosen[f"{layer}.{producer_name}"] = alpha
    return chosen


def _search(weights: list[torch.Tensor], hessian: torch.Tensor, group: int) -> tuple[float, torch.Tensor]:
    """The alpha, and its scales, whose rounding moves these Linears' outputs least (alpha 0: no scaling)."""
    energy = hessian.diagonal().float().clamp(min=1e-12)
    h = hessian.float()
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in ALPHAS:
        s = energy ** (alpha / 2)
        s = s / (s.max() * s.min()).sqrt()  # centred, so neither side of the fold grows without bound
        moved = sum(_moved(w, w * s, s, h, group) for w in weights)
        if best is None or moved < best[0]:
            best = (moved, alpha, s)
    assert best is not None
    return best[1], best[2]
