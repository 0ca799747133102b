"""What a run keeps: one record per stage and the run's summary. The report, the manifest and
`--json` are all written from these, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict, cast

from optimize.runtime.manifest import EngineFile, GateResult, JsonObject, StageJson


class LossPoint(TypedDict):
    """One point of a training stage's `loss_curve` (written by `optimize.stages.distill_training`)."""

    step: int
    train_loss: float
    heldout_loss: float
    lr: float
    seconds: float  # since training began


@dataclass
class StageRecord:
    name: str
    kind: str
    config: JsonObject  # the stage's recipe fields (the gate is in `gate`)
    metrics: dict[str, float]
    gate: GateResult  # DESIGN.md's gate object: passed, source, checks, against
    details: JsonObject = field(default_factory=dict)  # what the stage decided (its kind's `choices`); speed

    @classmethod
    def of(cls, data: StageJson) -> StageRecord:
        """A record read back from a manifest or a cache entry."""
        return cls(data["name"], data["kind"], data["config"], data["metrics"], data["gate"], data["details"])

    def loss_curve(self) -> list[LossPoint]:
        """A training stage's loss per step (none for other kinds)."""
        return cast(list[LossPoint], self.details.get("loss_curve") or [])

    def sensitivity(self) -> dict[str, float]:
        """A plan search's per-layer sensitivity, most sensitive first (none for other searches)."""
        return cast(dict[str, float], self.details.get("sensitivity") or {})

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    def failed_checks(self) -> str:
        return failed_checks(self.gate)

    def public(self) -> dict[str, object]:
        """The stage as `--json` shows it (DESIGN.md)."""
        return {"name": self.name, "kind": self.kind, "metrics": self.metrics, "gate": self.gate}

    def to_json(self) -> StageJson:
        """The stage as the manifest records it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "config": self.config,
            "metrics": self.metrics,
            "gate": self.gate,
            "details": self.details,
        }


def failed_checks(gate: GateResult) -> str:
    """The checks a gate failed, in words."""
    return "; ".join(
        f"{c['metric']} = {c['value']} is not {c['op']} {c['threshold']}" for c in gate["checks"] if not c["passed"]
    )


@dataclass
class RunSummary:
    name: str
    status: str  # passed | gate failed
    reference: dict[str, float]
    stages: list[StageRecord]
    conditions: JsonObject  # threads, batch size, sequence length, runs
    failure: str | None = None
    engines: list[EngineFile] = field(default_factory=list)  # each engine's file, fastest first
    costs: list[JsonObject] = field(default_factory=list)  # each step's seconds and peak memory (costs.py)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "reference": self.reference,
            "stages": [s.to_json() for s in self.stages],
            "conditions": self.conditions,
            "failure": self.failure,
            "engines": self.engines,
            "costs": self.costs,
        }
