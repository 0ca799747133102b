"""Students built from their teacher: the layers kept (weights copied, renumbered), a narrower
feed-forward keeping each layer's strongest neurons, fewer heads or a narrower width starting from
the leading block of every teacher weight, and the projection a narrower student learns to the
teacher's width. The distill stage (`optimize/stages/distill.py`) trains what this builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from optimize.errors import UsageError
from optimize.runtime.untyped import HfObject

if TYPE_CHECKING:
    import torch


class StudentConfig(BaseModel):
    """Config fields to change besides the layer count. A different `hidden_size` starts from the
    leading block of every teacher weight and learns a projection to the teacher's width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    projection: bool = Field(
        True,
        description="where widths differ, learn a projection to the teacher's; sentence embeddings ship it "
        "(a sentence-transformers Dense module), so they keep the teacher's width",
    )


def layer_list(model: torch.nn.Module, count: int) -> str:
    """The dotted name of the module list holding the transformer layers (`encoder.layer`, `model.layers`)."""
    import torch

    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not found:
        raise UsageError(f"distill: cannot find the {count} transformer layers of {type(model).__name__}")
    return str(min(found, key=len))


def chosen_layers(layers: list[int] | int, count: int) -> list[int]:
    """Explicit indices (checked), or `n` spread evenly over `count` with the first and last kept."""
    if isinstance(layers, int):
        if layers > count:
            raise UsageError(f"distill: layers: {layers} is more than the teacher's {count} layers")
        if layers == 1:
            return [count - 1]
        return sorted({round(i * (count - 1) / (layers - 1)) for i in range(layers)})
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise UsageError(f"distill: layers: {bad} out of range; the teacher has layers 0..{count - 1}")
    return sorted(layers)


def build_student(teacher: torch.nn.Module, layers: list[int], overrides: StudentConfig) -> torch.nn.Module:
    """A model of the teacher's class with `layers` (renumbered). Every weight starts as the teacher's,
    or, where the student's shape differs (narrower or wider), as the block they share (the leading
    rows and columns: with fewer heads of the same size, the first heads). A narrower feed-forward
    keeps each layer's strongest neurons (`ranked_by_strength`)."""
    import copy

    import torch

    config: HfObject = copy.deepcopy(teacher.config)
    count = int(config.num_hidden_layers)
    prefix = layer_list(teacher, count) + "."
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    for key, value in overrides.model_dump(exclude_none=True, exclude={"projection"}).items():
        setattr(config, key, value)
    student = type(teacher)(config)
    target = student.state_dict()
    state = teacher.state_dict()
    width = int(getattr(teacher.config, "intermediate_size", 0) or 0)
    if overrides.intermediate_size is not None and overrides.intermediate_size < width:
        state = ranked_by_strength(state, prefix, width)
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                if int(index) not in layers:
                    continue
                name = f"{prefix}{layers.index(int(index))}.{rest}"
            if name in target and target[name].ndim == tensor.ndim:
                block = tuple(slice(0, min(a, b)) for a, b in zip(target[name].shape, tensor.shape, strict=True))
                target[name][block] = tensor[block]
    student.load_state_dict(target)
    return student


def ranked_by_strength(state: dict[str, torch.Tensor], prefix: str, width: int) -> dict[str, torch.Tensor]:
    """The teacher's weights with each layer's feed-forward neurons reordered strongest first, so the
    leading block a narrower student copies holds them. A neuron's strength is the norm of the
    weights into it times the norm of the weights out of it; reordering neurons leaves the teacher's
    function unchanged. Tensors of a layer with `width` rows feed the neurons (BERT's
    `intermediate.dense`, Llama's `gate_proj`/`up_proj`), those with `width` columns read them."""
    import torch

    out = dict(state)
    by_layer: dict[str, list[str]] = {}
    for name in state:
        if name.startswith(prefix):
            by_layer.setdefault(name[len(prefix) :].split(".", 1)[0], []).append(name)
    for names in by_layer.values():
        into = [n for n in names if state[n].shape[0] == width and state[n].ndim <= 2]
        reads = [n for n in names if state[n].ndim == 2 and state[n].shape[1] == width]
        weights = [n for n in into if state[n].ndim == 2]
        if not weights or not reads or any(state[n].shape[1] == width for n in weights):
            continue  # no feed-forward recognised, or a square one: keep the order
        strength = torch.stack([state[n].norm(dim=1) for n in weights]).prod(0)
        strength = strength * torch.stack([state[n].norm(dim=0) for n in reads]).prod(0)
        order = torch.argsort(strength, descending=True)
        for n in into:
            out[n] = state[n][order]
        for n in reads:
            out[n] = state[n][:, order]
    return out


def with_projection(student: torch.nn.Module, width: int, teacher_width: int, layers: int) -> torch.nn.Module:
    """The student behind a learned projection to the teacher's width, on its last hidden state and on
    each mapped layer's, so the losses compare like with like. Starts as the identity on the shared
    dimensions. DDP wraps this module, so the projections are trained in step with the student."""
    import torch

    def linear() -> torch.nn.Linear:
        layer = torch.nn.Linear(width, teacher_width)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(teacher_width, width))
            layer.bias.zero_()
        return layer

    class Projected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = student
            self.last = linear()
            self.hidden = torch.nn.ModuleList(linear() for _ in range(layers))

        def forward(self, **batch: torch.Tensor) -> HfObject:
            from transformers.modeling_outputs import BaseModelOutput

            out = self.model(**batch)
            states = out.hidden_states
            if states is not None:  # [embeddings, layer 1, ...]: the mapped layers get their projection
                states = (states[0], *(p(h) for p, h in zip(self.hidden, states[1:], strict=True)))
            if getattr(out, "logits", None) is not None:
                out.hidden_states = states
                return out
            return BaseModelOutput(last_hidden_state=self.last(out[0]), hidden_states=states)

    return Projected()
