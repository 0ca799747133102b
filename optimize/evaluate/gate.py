"""Gate checks: what a stage must hold, and the arithmetic that judges it.

A check compares one metric of the stage's output to an absolute bound (`min`, `max`) or to the
reference, the recipe's input model measured in the same run (`max_drop`, `max_ratio`). `max_drop`
is in the metric's own units and direction: for `spearman` it is how far it may fall, for
`latency_p50_ms` how far it may rise.

No stage that changes numerics runs ungated by default: a stage whose recipe gives no `gate` gets
`default_gate(task)`, fidelity to the input model on held-out texts. An explicit `gate: []` runs
the stage ungated, and every report says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from optimize.metrics import METRICS
from optimize.runtime.manifest import CheckResult, GateResult, GateSource
from optimize.tasks import embeds

_BOUNDS = ("min", "max", "max_drop", "max_ratio")


class GateCheck(BaseModel):
    """One check, e.g. `{metric: spearman, max_drop: 0.003}`; exactly one bound is given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    max_ratio: float | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
        return metric

    @model_validator(mode="after")
    def _exactly_one_bound(self) -> GateCheck:
        given = [b for b in _BOUNDS if getattr(self, b) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_BOUNDS)} (got {', '.join(given) or 'none'})")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max_drop must be >= 0")
        if self.max_ratio is not None and self.max_ratio <= 0:
            raise ValueError("max_ratio must be > 0")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.max_drop is not None or self.max_ratio is not None


# The default gates, from measurements (README.md has the table). Embeddings: int8 MiniLM keeps
# cosine_mean 0.9935 / cosine_min 0.9905 (AVX-512 VNNI CPU; 0.9919 / 0.9672 on another), while the
# int8 encoder that shipped noise scored 0.0102 / -0.0965. Logits (SmolLM2-135M, next-token logits at
# 512 held-out tokens): the fp32 export keeps 1.0 / 0.0; all-int8 dynamic scored top1_agreement
# 0.469 / kl_div 0.816, int8 with lm_head, embeddings and every down_proj in fp32 0.699 / 0.165,
# int4 RTN block 32 0.371 / 0.859 and block 128 0.334 / 1.14 (" the capital of the following
# nations:"). The bounds say "predictions unchanged on at least 9 tokens in 10".
EMBEDDING_GATE = (("cosine_mean", 0.99), ("cosine_min", 0.95))
LOGIT_GATE_TOP1 = 0.9
LOGIT_GATE_KL = 0.1


def default_gate(task: str) -> list[GateCheck]:
    """The gate a stage gets when its recipe names none: fidelity to the input model."""
    if embeds(task):
        return [GateCheck(metric=metric, min=bound) for metric, bound in EMBEDDING_GATE]
    return [GateCheck(metric="top1_agreement", min=LOGIT_GATE_TOP1), GateCheck(metric="kl_div", max=LOGIT_GATE_KL)]


# Distillation's default: a student is not its teacher, so the fidelity gate above (cosine 0.99)
# refuses every real student. Measured on MiniLM, students of layers [0, 2, 4] trained on the STS-B
# train sentences (cosine_mean against the teacher on held-out calibration texts / STS-B test
# Spearman; the teacher 0.8203): 4 steps 0.49132 / 0.6628, 300 steps at lr 2e-4 0.692212 / 0.7638,
# 1000 steps at 2e-4 0.758286 / 0.7973, 1000 steps at 5e-4 0.795032 / 0.8084; the shipped recipe's
# artifact (layers [0, 2, 5], 1500 steps on 19k sentences, then int8) 0.8677 / 0.8141. Where the
# recipe has an eval suite, its task metric may fall at most this much below the teacher's (0.02: the
# students at 0.8084 and 0.8141 pass, those at 0.7973 and below fail); without one, the embeddings must keep
# cosine_mean 0.75 with the teacher's (the 300- and 4-step students fail). The logit floor is not
# measured on a real decoder: top-1 agreement with the teacher on half the tokens, KL at most 1 nat.
STUDENT_MAX_DROP = {"spearman": 0.02, "accuracy": 0.02}
STUDENT_EMBEDDING_MIN = 0.75
STUDENT_LOGIT_TOP1, STUDENT_LOGIT_KL = 0.5, 1.0


def student_gate(task: str, suite_metrics: Sequence[str]) -> list[GateCheck]:
    """The default gate of a distilled student, against its teacher: the task metric of the recipe's
    eval suites where it has one, else a fidelity floor far below a quantizer's."""
    checks = [GateCheck(metric=m, max_drop=STUDENT_MAX_DROP[m]) for m in suite_metrics if m in STUDENT_MAX_DROP]
    if checks:
        return checks
    if embeds(task):
        return [GateCheck(metric="cosine_mean", min=STUDENT_EMBEDDING_MIN)]
    return [
        GateCheck(metric="top1_agreement", min=STUDENT_LOGIT_TOP1),
        GateCheck(metric="kl_div", max=STUDENT_LOGIT_KL),
    ]


def judge(check: GateCheck, value: float | None, reference: float | None) -> CheckResult:
    """Evaluate one check; returns the JSON row of DESIGN.md (metric, value, op, threshold, passed)."""
    higher_better = METRICS[check.metric].higher_better
    threshold: float | None
    if check.min is not None:
        op, threshold = ">=", check.min
    elif check.max is not None:
        op, threshold = "<=", check.max
    elif check.max_ratio is not None:
        op, threshold = "<=", None if reference is None else check.max_ratio * reference
    else:
        assert check.max_drop is not None
        if reference is None:
            op, threshold = (">=" if higher_better else "<="), None
        elif higher_better:
            op, threshold = ">=", reference - check.max_drop
        else:
            op, threshold = "<=", reference + check.max_drop
    passed = value is not None and threshold is not None and (value >= threshold if op == ">=" else value <= threshold)
    row: CheckResult = {
        "metric": check.metric,
        "value": value,
        "op": op,
        "threshold": threshold,
        "passed": bool(passed),
    }
    if check.needs_reference:
        row["reference"] = reference
    return row


def judge_all(
    checks: list[GateCheck], metrics: dict[str, float], reference: dict[str, float], source: GateSource = "recipe"
) -> GateResult:
    """The gate result of DESIGN.md, plus where the checks came from: the recipe, the default gate,
    or none at all (`gate: []`, "ungated": it passes, and the reports say it was never checked)."""
    rows = [judge(c, metrics.get(c.metric), reference.get(c.metric)) for c in checks]
    return {"passed": all(r["passed"] for r in rows), "source": source, "checks": rows}
