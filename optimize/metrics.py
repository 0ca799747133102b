"""The metric table: every metric name the project knows (DESIGN.md), which way is better, its
unit, and what measures it. Gates, suites, the pipeline and the reports all read this one table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from optimize.tasks import embeds

# What produces a metric: fidelity to the reference on held-out texts (every model), fidelity of
# logits (classifiers and causal LMs), the speed and size measurement of every run, `optimize bench`
# only, or an eval suite whose task yields it (`suites.SUITE_TASKS`, `evals/*.yaml`).
Source = Literal["fidelity", "logits", "speed", "size", "bench", "suite"]


@dataclass(frozen=True)
class Metric:
    name: str
    higher_better: bool
    unit: str
    source: Source
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("cosine_mean", True, "", "fidelity", "mean cosine of outputs vs the reference on held-out texts"),
        Metric("cosine_min", True, "", "fidelity", "lowest cosine of outputs vs the reference on held-out texts"),
        Metric("top1_agreement", True, "", "logits", "share of rows whose top class or next token agrees"),
        Metric("kl_div", False, "nats", "logits", "mean KL(reference || candidate) of the output distributions"),
        Metric("spearman", True, "", "suite", "Spearman of embedding similarity vs gold similarity (STS)"),
        Metric("accuracy", True, "", "suite", "share of labels predicted right"),
        Metric("perplexity", False, "", "suite", "exp(mean negative log-likelihood) of a causal LM"),
        Metric("latency_p50_ms", False, "ms", "speed", "median wall time of one call"),
        Metric("latency_p90_ms", False, "ms", "speed", "90th percentile wall time of one call"),
        Metric("latency_p99_ms", False, "ms", "speed", "99th percentile wall time of one call"),
        Metric("throughput_per_s", True, "items/s", "speed", "items per second at the measured batch size"),
        Metric("size_mb", False, "MB", "size", "model files on disk"),
        Metric("peak_rss_mb", False, "MB", "bench", "peak resident memory of the process"),
    )
}


def measured(task: str | None, suite_metrics: Iterable[str]) -> set[str]:
    """The metrics a run measures for a model of `task` with eval suites yielding `suite_metrics`;
    an unknown task (not yet detected) may be any, so logit metrics count as measured until the
    model says otherwise."""
    sources = {"fidelity", "speed", "size"}
    if not embeds(task):
        sources.add("logits")
    return {m.name for m in METRICS.values() if m.source in sources} | set(suite_metrics)
