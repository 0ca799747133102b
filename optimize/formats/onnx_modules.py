"""The torch modules `export` traces: a model wrapped so its graph takes and gives the flat, named
tensors the runtime feeds and reads. Imported only when exporting (it imports torch at its top)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from transformers.cache_utils import DynamicCache

from optimize.runtime.untyped import HfObject


class FirstOutput(torch.nn.Module):
    """An encoder or classifier called by keyword (`names`, in the graph's input order), its first
    output (last hidden states, or logits) returned."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.eval()  # the exporter puts a module back in the mode it found it in: train would stay on

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out: HfObject = self.model(**dict(zip(self.names, tensors, strict=True)))
        first: torch.Tensor = out[0]
        return first


class WholeSequence(torch.nn.Module):
    """A decoder called without a cache: logits for every position."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits


class WithCache(torch.nn.Module):
    """A decoder whose cache comes in and goes out as flat tensors, keys then values, layer by
    layer: the cache of every layer is whole (a full DynamicLayer), so a sliding window is the
    attention mask's work, as in transformers' own full-cache path."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out: HfObject = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{cache_keyword(self.model): cache},
        )  # fmt: skip
        kept = returned_cache(out)
        return (out.logits, *(t for layer in kept.layers for t in (layer.keys, layer.values)))


def cache_keyword(model: torch.nn.Module) -> str:
    """What `model.forward` calls its cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: HfObject) -> HfObject:
    """The cache a forward pass returned (`cache` from transformers 5.24, `past_key_values` before)."""
    return out.get("cache", out.get("past_key_values"))


def rewritten(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """`model`'s architecture with its rewrite in REWRITES applied while it is exported: the same
    numbers, in operators ONNX has."""
    rewrite = REWRITES.get(str(getattr(getattr(model, "config", None), "model_type", "")))
    return rewrite() if rewrite is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _llama4_real_rotary() -> Iterator[None]:
    """Llama 4 rotates queries and keys in complex numbers (`torch.polar`, `view_as_complex`), which
    ONNX has no type for: the same rotation on (cos, sin) pairs."""
    from transformers.models.llama4 import modeling_llama4 as module

    def rotary(self: HfObject, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        pairs: torch.Tensor = torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling
        return pairs

    def apply(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = freqs[:, :, None, :, 0], freqs[:, :, None, :, 1]

        def turn(x: torch.Tensor) -> torch.Tensor:
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            real, imag = pairs[..., 0], pairs[..., 1]
            return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)

        return turn(xq), turn(xk)

    with (
        mock.patch.object(module, "apply_rotary_emb", apply),
        mock.patch.object(module.Llama4TextRotaryEmbedding, "forward", rotary),
    ):
        yield


# model_type -> a context in which the architecture exports (one line per architecture that needs one)
REWRITES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "llama4_text": _llama4_real_rotary,
}
