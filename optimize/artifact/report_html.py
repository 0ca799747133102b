"""report.html: the run at a glance, one self-contained page (plots inline as SVG, no scripts, no
links) for a reviewer of a release: every gate check as a row (value against threshold, pass or
fail, the model it compared with), the metrics per stage beside the reference, quality against
latency and size (the Pareto view, points numbered so labels never overlap), what each search
chose among, per-layer sensitivity with the precision each layer got, and the distillation loss
curve. Plots are drawn by matplotlib (its Agg backend, no display needed).
"""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING

from optimize.metrics import METRICS
from optimize.records import LossPoint, RunSummary, StageRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Quality metrics in the order the Pareto view prefers them (the first one the run measured is used).
QUALITY = ("spearman", "accuracy", "perplexity", "cosine_mean", "top1_agreement")
PRECISION_COLORS = {"fp32": "#4c72b0", "int8": "#55a868", "int4": "#c44e52"}


def _svg(figure: Figure) -> str:
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
    # Stages that change no numerics sit on top of each other: each point carries its number, the
    # legend names it, and points within 4% of the plot of each other share one label ("3,4").
    xs = [float(p["latency_p50_ms"]) for _, p in points]
    ys = [float(p[metric]) for _, p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    labels: list[tuple[float, float, list[str]]] = []
    for number, ((name, values), x, y) in enumerate(zip(points, xs, ys, strict=True), 1):
        size = float(values.get("size_mb", largest))
        axes.scatter(x, y, s=60 + 540 * size / largest, alpha=0.55, label=f"{number}. {name} ({size:.1f} MB)")
        near = next((lb for lb in labels if abs(lb[0] - x) < 0.04 * span_x and abs(lb[1] - y) < 0.04 * span_y), None)
        if near is None:
            labels.append((x, y, [str(number)]))
        else:
            near[2].append(str(number))
    for x, y, numbers in labels:
        axes.annotate(",".join(numbers), (x, y), ha="center", va="center", fontsize=8, weight="bold")
    axes.legend(fontsize=7, markerscale=0.4, loc="best")
    axes.set_xlabel("latency p50 (ms, batch 1)")
    axes.set_ylabel(metric + ("" if METRICS[metric].higher_better else " (lower is better)"))
    axes.set_title(f"{metric} vs latency; marker area: size")
    axes.grid(alpha=0.3)
    return _svg(figure)


def sensitivity(scores: dict[str, float], plan: dict[str, str]) -> str | None:
    """Per-layer sensitivity (1 - cosine_mean with only that layer quantized), colored by precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def loss_curve(curve: list[LossPoint]) -> str:
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


def choices(stage: StageRecord) -> str | None:
    """What a search chose among (formulations, graph variants, genai candidates, precision plans):
    one bar per candidate, its latency where it was timed (else its fidelity), the chosen one marked,
    failed and broken ones greyed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optimize.artifact.report import stage_choices

    bars = stage_choices(stage)
    if len(bars) < 2:
        return None
    by_latency = all(b.latency_ms is not None for b in bars if b.passed)
    values = [float((b.latency_ms if by_latency else b.fidelity) or 0.0) for b in bars]
    figure, axes = plt.subplots(figsize=(6.4, 0.35 * len(bars) + 1.2))
    colors = ["#55a868" if b.chosen else ("#4c72b0" if b.passed else "#c8c8c8") for b in bars]
    axes.barh(range(len(bars)), values, color=colors)
    axes.set_yticks(range(len(bars)), [b.label[:40] + ("  (chosen)" if b.chosen else "") for b in bars], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("latency p50 (ms, batch 1)" if by_latency else "fidelity (cosine)")
    axes.set_title("candidates: green chosen, grey failed the gate or did not build")
    return _svg(figure)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else html.escape(str(value))


def gates_table(run: RunSummary) -> str:
    """Every gate check of every stage: value against threshold, verdict, where the check came from
    and which model its value was measured against."""
    rows = []
    for stage in run.stages:
        source, against = stage.gate.get("source", "recipe"), stage.gate.get("against", "")
        if source == "ungated":
            rows.append(f'<tr class="ungated"><td>{_cell(stage.name)}</td><td colspan="6">ungated (gate: [])</td></tr>')
        for check in stage.gate["checks"]:
            verdict = "pass" if check["passed"] else "FAIL"
            rows.append(
                f'<tr class="{verdict.lower()}"><td>{_cell(stage.name)}</td><td>{_cell(check["metric"])}</td>'
                f"<td>{_cell(check['value'])}</td><td>{_cell(check['op'])} {_cell(check['threshold'])}</td>"
                f"<td>{verdict}</td><td>{_cell(source)}</td><td>{_cell(against)}</td></tr>"
            )
    columns = ("stage", "metric", "value", "must be", "verdict", "gate", "against")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def metrics_table(run: RunSummary) -> str:
    """The metrics of the reference and of every stage, one column per metric."""
    names = list(dict.fromkeys([*run.reference, *(n for s in run.stages for n in s.metrics)]))
    head = "<tr><th>model</th>" + "".join(f"<th>{_cell(n)}</th>" for n in names) + "</tr>"
    rows = [("reference (input model)", run.reference), *((s.name, s.metrics) for s in run.stages)]
    body = "".join(
        f"<tr><td>{_cell(name)}</td>" + "".join(f"<td>{_cell(values.get(n))}</td>" for n in names) + "</tr>"
        for name, values in rows
    )
    return f"<table>{head}{body}</table>"


def page(run: RunSummary, plan: dict[str, str]) -> str:
    """The whole report: the gates and metrics as tables, then the plots."""
    sections = [("Gates", gates_table(run)), ("Metrics (fidelity against the input model)", metrics_table(run))]
    view = pareto(run)
    if view:
        sections.append(("Quality, latency and size per stage", view))
    for stage in run.stages:
        chart = choices(stage)
        if chart:
            sections.append((f"What {stage.name} chose among", chart))
        chart = sensitivity(stage.sensitivity(), plan)
        if chart:
            sections.append((f"Sensitivity ({stage.name})", chart))
        curve = stage.loss_curve()
        if curve:
            sections.append((f"Distillation loss ({stage.name})", loss_curve(curve)))
    body = "\n".join(
        f'<section><h2>{html.escape(title)}</h2>\n<div class="plot">{content}</div></section>'
        for title, content in sections
    )
    status = "passed" if run.status == "passed" else run.status
    css = "passed" if status == "passed" else "failed"
    failure = f'<p class="why">{html.escape(run.failure)}</p>' if run.failure else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.name)}: {html.escape(status)}</title>
<style>body{{font-family:sans-serif;max-width:64rem;margin:2rem auto;color:#222}}
h1 .passed{{color:#2a7d2a}} h1 .failed{{color:#b22}} .plot svg{{max-width:100%;height:auto}}
table{{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}}
td,th{{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}} td:first-child,th:first-child{{text-align:left}}
tr.pass td:nth-child(5){{color:#2a7d2a;font-weight:bold}} tr.fail td{{background:#fde8e8}}
tr.fail td:nth-child(5){{color:#b22;font-weight:bold}} tr.ungated td{{background:#fff6dd}}
.why{{background:#fde8e8;padding:.5rem}}</style></head>
<body><h1>{html.escape(run.name)}: <span class="{css}">{html.escape(status)}</span></h1>
{failure}
{body}
</body></html>
"""
