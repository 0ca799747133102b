"""report.html: the run at a glance, one self-contained page (plots inline as SVG, no scripts, no
links): quality against latency and size per stage and the reference (the Pareto view), per-layer
sensitivity with the precision each layer got, and the distillation loss curve when there is one.
Plots are drawn by matplotlib (its Agg backend, no display needed); the tables are report.md's.
"""

from __future__ import annotations

import html
import io
from typing import Any

from optimize.records import RunSummary

# Quality metrics in the order the Pareto view prefers them (the first one the run measured is used).
QUALITY = ("spearman", "accuracy", "perplexity", "cosine_mean", "top1_agreement")
LOWER_IS_BETTER = {"perplexity", "kl_div"}
PRECISION_COLORS = {"fp32": "#4c72b0", "int8": "#55a868", "int4": "#c44e52"}


def _svg(figure: Any) -> str:
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "optimize"  # stable element ids: the same run, the same bytes
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline SVG in HTML


def pareto(run: RunSummary) -> str | None:
    """Quality vs latency p50, marker area by size, one point per stage and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("reference", run.reference)] + [(s.name, s.metrics) for s in run.stages]
    metric = next((m for m in QUALITY if all(m in p for _, p in points)), None)
    if metric is None or not all("latency_p50_ms" in p for _, p in points):
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    largest = max(float(p.get("size_mb", 1.0)) for _, p in points) or 1.0
    for name, values in points:
        size = float(values.get("size_mb", largest))
        axes.scatter(values["latency_p50_ms"], values[metric], s=60 + 540 * size / largest, alpha=0.6)
        axes.annotate(f"{name}\n{size:.1f} MB", (values["latency_p50_ms"], values[metric]), fontsize=8)
    axes.set_xlabel("latency p50 (ms, batch 1)")
    axes.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    axes.set_title(f"{metric} vs latency; marker area: size")
    axes.grid(alpha=0.3)
    return _svg(figure)


def sensitivity(details: dict[str, Any], plan: dict[str, str]) -> str | None:
    """Per-layer sensitivity (1 - cosine_mean with only that layer quantized), colored by precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = details.get("sensitivity")
    if not scores:
        return None
    names = list(scores)[:40]
    figure, axes = plt.subplots(figsize=(7.0, 0.22 * len(names) + 1.2))
    colors = [PRECISION_COLORS.get(plan.get(n, ""), "#8c8c8c") for n in names]
    axes.barh(range(len(names)), [scores[n] for n in names], color=colors)
    axes.set_yticks(range(len(names)), [n[-40:] for n in names], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("1 - cosine_mean with only this layer quantized")
    from matplotlib.patches import Patch

    handles = [Patch(color=c) for c in PRECISION_COLORS.values()]
    axes.legend(handles, list(PRECISION_COLORS), title="chosen precision", fontsize=7)
    axes.set_title("per-layer sensitivity, most sensitive first")
    return _svg(figure)


def loss_curve(curve: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    steps = [p["step"] for p in curve]
    axes.plot(steps, [p["train_loss"] for p in curve], label="train")
    axes.plot(steps, [p["heldout_loss"] for p in curve], label="held-out")
    axes.set_xlabel("step")
    axes.set_ylabel("distillation loss")
    axes.legend()
    axes.grid(alpha=0.3)
    return _svg(figure)


def page(run: RunSummary, plan: dict[str, str], markdown_text: str) -> str:
    """The whole report: plots first, then report.md's tables as preformatted text."""
    sections = []
    view = pareto(run)
    if view:
        sections.append(("Quality, latency and size per stage", view))
    for stage in run.stages:
        chart = sensitivity(stage.details, plan)
        if chart:
            sections.append((f"Sensitivity ({stage.name})", chart))
        curve = stage.details.get("loss_curve")
        if curve:
            sections.append((f"Distillation loss ({stage.name})", loss_curve(curve)))
    body = "\n".join(
        f'<section><h2>{html.escape(title)}</h2>\n<div class="plot">{svg}</div></section>' for title, svg in sections
    )
    status = "passed" if run.status == "passed" else run.status
    css = "passed" if status == "passed" else "failed"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.name)}: {html.escape(status)}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto;color:#222}}
h1 .passed{{color:#2a7d2a}} h1 .failed{{color:#b22}} .plot svg{{max-width:100%;height:auto}}
pre{{background:#f6f6f6;padding:1rem;overflow-x:auto;font-size:.8rem}}</style></head>
<body><h1>{html.escape(run.name)}: <span class="{css}">{html.escape(status)}</span></h1>
{body}
<section><h2>Tables (report.md)</h2><pre>{html.escape(markdown_text)}</pre></section>
</body></html>
"""
