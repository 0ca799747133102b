"""GPTQ (Frantar et al., 2022) for symmetric grouped int4 weights: each Linear's weights rounded a
column at a time, the rounding error of each column spread over the columns not yet rounded in
proportion to the inverse Hessian of the layer's inputs (H = X^T X over the calibration tokens), so
the layer's outputs on those inputs move as little as the grid allows. Scales are absmax per group,
taken from the weights as they stand when the group's first column is reached (compressed-tensors'
symmetric W4A16: codes in [-8, 7], the scale absmax / 7).

llm-compressor implements this on compressed-tensors, but it holds transformers at 5.17 and
huggingface-hub below 2 (`pip install --dry-run llmcompressor`, December 2026): here it is written
over torch alone, one forward pass collecting every Linear's Hessian (not layer by layer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from optimize.runtime import Tokenizer

if TYPE_CHECKING:
    import torch

DAMP = 0.01  # fraction of the Hessian's mean diagonal added to it (GPTQ's default)
BLOCK = 128  # columns rounded together before their error is carried to the rest


def hessians(
    model: torch.nn.Module, names: Sequence[str], checkpoint: Path, texts: Sequence[str], seq_len: int
) -> dict[str, torch.Tensor]:
    """X^T X of each named Linear's inputs over the calibration texts (one text per forward pass)."""
    import torch

    modules = dict(model.named_modules())
    found = {
        name: torch.zeros(modules[name].in_features, modules[name].in_features, dtype=torch.float64) for name in names
    }
    counts = dict.fromkeys(names, 0)

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def collect(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            found[name] += x.T @ x
            counts[name] += x.shape[0]

        return collect

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    tokenizer = Tokenizer(checkpoint / "tokenizer.json", seq_len)
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer.ids(text)[:seq_len]
                if ids:
                    model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: found[name] / max(counts[name], 1) for name in names}


def quantize(
    weight: torch.Tensor, hessian: torch.Tensor, group: int, top: int = 7
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (out x in) on the symmetric int4 grid by GPTQ: (the weights on the grid, as floats;
    the scale of each group, out x in / group)."""
    import torch

    w = weight.detach().to(torch.float64).clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns = w.shape[1]
    scales = torch.zeros(w.shape[0], columns // group, dtype=torch.float64)
    q = torch.zeros_like(w)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=torch.float64)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:  # the group's scale, from its weights as they stand now
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group]
                scales[:, column // group] = (current.abs().amax(dim=1) / top).clamp(min=1e-12)
            scale = scales[:, column // group]
            rounded = torch.clamp(torch.round(block[:, i] / scale), -top - 1, top) * scale
            q[:, column] = rounded
            error = (block[:, i] - rounded) / inv[i, i]
            block[:, i:] -= error.unsqueeze(1) @ inv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q.to(weight.dtype), scales.to(weight.dtype)
