"""What every stage shares: its recipe fields (a name and a gate) and what it is handed at run time.

A stage holds parameters, not state: `run(config, model, ctx)` takes a model handle and returns one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from optimize.gate import GateCheck
from optimize.model import ModelHandle


class StageBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    gate: list[GateCheck] = []


@dataclass(frozen=True)
class StageContext:
    """Run-time inputs a stage may use; built once by the pipeline, never mutated."""

    workdir: Path            # a private scratch folder for this stage, removed with the run
    calibration_texts: tuple[str, ...]
    seq_len: int
    seed: int
    # Full evaluation of a candidate against this stage's gate: (metrics, gate result).
    judge: Callable[[ModelHandle], tuple[dict[str, float], dict[str, Any]]]
    # Cheap fidelity probe on the held-out texts (cosine_mean, cosine_min vs the reference).
    probe: Callable[[ModelHandle], dict[str, float]]


# What a stage returns: the new model and what it decided (plan, candidates tried), for the manifest.
StageOutput = tuple[ModelHandle, dict[str, Any]]
