"""Gate checks: what a stage must hold, and the arithmetic that judges it.

A check compares one metric of the stage's output to an absolute bound (`min`, `max`) or to the
reference, the recipe's input model measured in the same run (`max_drop`, `max_ratio`). `max_drop`
is in the metric's own units and direction: for `spearman` it is how far it may fall, for
`latency_p50_ms` how far it may rise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

# Every metric name the project knows, shared by commands, reports and gates (DESIGN.md),
# mapped to True when higher is better.
METRICS: dict[str, bool] = {
    "cosine_mean": True,
    "cosine_min": True,
    "spearman": True,
    "accuracy": True,
    "top1_agreement": True,
    "kl_div": False,
    "perplexity": False,
    "latency_p50_ms": False,
    "latency_p90_ms": False,
    "latency_p99_ms": False,
    "throughput_per_s": True,
    "size_mb": False,
    "peak_rss_mb": False,
}

MetricName = Literal[
    "cosine_mean", "cosine_min", "spearman", "accuracy", "top1_agreement", "kl_div", "perplexity",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_per_s", "size_mb", "peak_rss_mb",
]

_BOUNDS = ("min", "max", "max_drop", "max_ratio")


class GateCheck(BaseModel):
    """One check, e.g. `{metric: spearman, max_drop: 0.003}`; exactly one bound is given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: MetricName
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    max_ratio: float | None = None

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


def judge(check: GateCheck, value: float | None, reference: float | None) -> dict[str, object]:
    """Evaluate one check; returns the JSON row of DESIGN.md (metric, value, op, threshold, passed)."""
    higher_better = METRICS[check.metric]
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
    passed = (
        value is not None
        and threshold is not None
        and (value >= threshold if op == ">=" else value <= threshold)
    )
    row: dict[str, object] = {"metric": check.metric, "value": value, "op": op, "threshold": threshold,
                              "passed": bool(passed)}
    if check.needs_reference:
        row["reference"] = reference
    return row


def judge_all(checks: list[GateCheck], metrics: dict[str, float], reference: dict[str, float]) -> dict[str, object]:
    rows = [judge(c, metrics.get(c.metric), reference.get(c.metric)) for c in checks]
    return {"passed": all(r["passed"] for r in rows), "checks": rows}
