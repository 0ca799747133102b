"""What every stage shares: its recipe fields (a name and a gate) and what it is handed at run time.

A stage holds parameters, not state: `run(config, model, ctx)` takes a model handle and returns one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from optimize.gate import GateCheck


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
