"""The distill stage's loss: the student matched to the teacher on pooled embeddings or logits (with
hard labels for a classifier) and on the hidden states of the layers it kept, weighted as the recipe
says."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from optimize import tasks
from optimize.stages import distill_training as training

if TYPE_CHECKING:
    import torch


def pooled(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The sentence vector the model's own pooling makes (`runtime.Pooling`, before any normalization)."""
    import torch

    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":
        return states[torch.arange(len(states)), (mask.sum(1) - 1).clamp(min=0)]
    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "max":
        return states.masked_fill(weights == 0, -1e9).max(1).values
    count = weights.sum(1).clamp(min=1e-9)
    return (states * weights).sum(1) / (count.sqrt() if mode == "mean_sqrt_len" else count)


def loss_function(weights: Losses, task: str, layers: list[int], pooling: str = "mean") -> training.LossFn:
    import torch
    import torch.nn.functional as F

    def embeddings(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = weights.hidden_mse > 0
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=hidden)
        s = student(**batch, output_hidden_states=hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(s[0].dtype)
        a = pooled(s[0], batch["attention_mask"], pooling)
        b = pooled(t[0].to(s[0].dtype), batch["attention_mask"], pooling)
        loss = weights.embedding_mse * F.mse_loss(a, b)
        loss = loss + weights.embedding_cosine * (1 - F.cosine_similarity(a, b, dim=-1)).mean()
        if hidden:
            pairs = [(s.hidden_states[i + 1], t.hidden_states[j + 1]) for i, j in enumerate(layers)]
            loss = loss + weights.hidden_mse * sum(F.mse_loss(x * mask, y * mask) for x, y in pairs) / len(pairs)
        return loss

    def logits(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        temperature = weights.temperature
        labels = batch.pop("labels", None)
        with torch.no_grad():
            t = teacher(**batch).logits
        s = student(**batch).logits
        hard = s.new_zeros(())
        if s.ndim == 3:  # causal LM: every real token is a row; the hard label is the next token
            real = batch["attention_mask"].bool()
            if weights.hard_label > 0:
                targets = batch["input_ids"][:, 1:].masked_fill(~real[:, 1:], -100)
                hard = F.cross_entropy(s[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
            s, t = s[real], t[real]
        elif labels is not None and bool((labels >= 0).any()):
            hard = F.cross_entropy(s, labels, ignore_index=-100)
        kl = F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        loss: torch.Tensor = weights.logit_kl * kl * temperature**2 + weights.hard_label * hard
        return loss

    return embeddings if tasks.embeds(task) else logits


class Losses(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_mse: float = Field(1.0, ge=0, description="embeddings: MSE of mean-pooled embeddings")
    embedding_cosine: float = Field(1.0, ge=0, description="embeddings: 1 - cosine of mean-pooled embeddings")
    hidden_mse: float = Field(0.0, ge=0, description="embeddings: MSE of hidden states on the mapped layers")
    logit_kl: float = Field(1.0, ge=0, description="classifiers and LMs: KL of logits at the temperature")
    hard_label: float = Field(
        0.0, ge=0, description="classifiers: cross-entropy on the data's `label` column; LMs: on the next token"
    )
    temperature: float = Field(2.0, gt=0)
