"""What a run's gates measure against: the reference's metrics and, once a stage has trained new
weights (distillation), the newest trained model (the anchor), so a later stage is judged on what it
changed, not on the distance the student already is from its teacher. Each check's row also says how
finely the tokens it was measured on resolve it (its standard error)."""

from __future__ import annotations

from optimize.evaluate.gate import GateCheck, judge_all
from optimize.evaluate.measure import Evaluator
from optimize.models.handle import ModelHandle
from optimize.runtime.manifest import GateResult, GateSource


class Judging:
    def __init__(self, evaluator: Evaluator, spec: str):
        self.evaluator, self.spec = evaluator, spec
        self.reference: dict[str, float] = {}  # the input model's metrics (measured first)
        # What default gates measure fidelity against: the reference (None) until a stage changes the
        # weights; from then on the newest trained model.
        self.anchor: ModelHandle | None = None
        self.anchor_name = ""  # which stage made it, for the records

    def judge(
        self, checks: list[GateCheck], measured: dict[str, float], source: GateSource, handle: ModelHandle
    ) -> GateResult:
        """The gate result, with the model its fidelity values were measured against (`against`)."""
        values = measured
        if source == "default" and self.anchor is not None:
            values = {**measured, **self.evaluator.agreement(handle, self.anchor)}
        judged = judge_all(checks, values, self.reference, source)
        resolution = self.evaluator.resolution(handle)
        for row in judged["checks"]:  # how finely the tokens it was measured on resolve it
            found = resolution.get(row["metric"])
            if found:
                relative = row.get("reference") is not None and "ratio_standard_error" in found
                error = (
                    found["ratio_standard_error"] * float(row["reference"] or 0)
                    if relative
                    else found["standard_error"]
                )
                row["standard_error"], row["tokens"] = round(error, 6), int(found["tokens"])
        return {**judged, "against": self.against(source)}

    def against(self, source: GateSource) -> str:
        """The model a gate's fidelity values are measured against: the input model, except for a
        default gate after distillation (the newest trained model)."""
        if source == "default" and self.anchor is not None:
            return self.anchor_name
        return f"input model ({self.spec})"

    def adopt_anchor(self, handle: ModelHandle, index: int, name: str) -> None:
        """New weights (a trained student): later default gates compare against them."""
        self.anchor, self.anchor_name = handle, f"stage {index} ({name}) output"

    def probe(self, handle: ModelHandle) -> dict[str, float]:
        """The cheap fidelity check on held-out texts, against the anchor once there is one."""
        if self.anchor is None:
            return self.evaluator.probe(handle)
        return self.evaluator.agreement(handle, self.anchor)
