"""What a run keeps: one record per stage and the run's summary. The report, the manifest and
`--json` are all written from these, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from optimize.gate import GateResult


@dataclass
class StageRecord:
    name: str
    kind: str
    config: dict[str, Any]  # the stage's recipe fields (the gate is in `gate`)
    metrics: dict[str, float]
    gate: GateResult  # DESIGN.md's gate object: passed, source, checks, against
    details: dict[str, Any] = field(default_factory=dict)  # what the stage decided; speed spread

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    def failed_checks(self) -> str:
        return "; ".join(
            f"{c['metric']} = {c['value']} is not {c['op']} {c['threshold']}"
            for c in self.gate["checks"]
            if not c["passed"]
        )

    def public(self) -> dict[str, Any]:
        """The stage as `--json` shows it (DESIGN.md)."""
        return {"name": self.name, "kind": self.kind, "metrics": self.metrics, "gate": self.gate}

    def to_json(self) -> dict[str, Any]:
        """The stage as the manifest records it."""
        return dataclasses.asdict(self)


@dataclass
class RunSummary:
    name: str
    status: str  # passed | gate failed
    reference: dict[str, float]
    stages: list[StageRecord]
    conditions: dict[str, Any]  # threads, batch size, sequence length, runs
    failure: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reference": self.reference,
            "stages": [s.to_json() for s in self.stages],
            "conditions": self.conditions,
            "failure": self.failure,
        }
