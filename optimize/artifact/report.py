"""Human-readable results: the rich tables printed during a run and the report.md of the artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from optimize.records import RunSummary, StageRecord

if TYPE_CHECKING:
    from optimize.stages.base import Choice


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def stage_table(stage: StageRecord, reference: dict[str, float]) -> Table:
    table = Table(title=f"stage {stage.name} ({stage.kind})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("reference", justify="right")
    for name, value in stage.metrics.items():
        table.add_row(name, _fmt(value), _fmt(reference.get(name)))
    source = stage.gate.get("source", "recipe")
    for check in stage.gate["checks"]:
        mark = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        label = f"gate {check['metric']}" + (" (default)" if source == "default" else "")
        table.add_row(label, f"{_fmt(check['value'])} {check['op']} {_fmt(check['threshold'])}", mark)
    if source == "ungated":
        table.add_row("gate", "[yellow]ungated[/] (gate: [])", "-")
    elif stage.gate.get("against"):
        table.add_row("gate fidelity against", str(stage.gate["against"]), "")
    return table


def print_stage(console: Console, stage: StageRecord, reference: dict[str, float]) -> None:
    console.print(stage_table(stage, reference))


def decisions_table(stage: StageRecord, shown: int = 12) -> Table | None:
    """What a stage chose among (formulations, graph variants, genai candidates) or, for a precision
    search, its most sensitive layers: what report.html plots, as a table for `optimize inspect`."""
    choices = stage_choices(stage)
    if choices:
        chosen = next((c.label for c in choices if c.chosen), "none")
        table = Table(title=f"stage {stage.name}: candidates (chosen: {chosen})")
        table.add_column("candidate")
        table.add_column("outcome")
        for choice in choices:
            table.add_row(choice.label, choice.outcome)
        return table
    scores = stage.sensitivity()
    if scores:
        table = Table(title=f"stage {stage.name}: most sensitive layers (1 - cosine_mean, that layer alone quantized)")
        table.add_column("layer")
        table.add_column("score", justify="right")
        for name, score in list(scores.items())[:shown]:
            table.add_row(name, _fmt(score))
        return table
    return None


def stage_choices(stage: StageRecord) -> list[Choice]:
    """What the stage chose among, as its kind reads its own decisions (`StageBase.choices`)."""
    from optimize.stages import KINDS

    kind = KINDS.get(stage.kind)
    return kind.choices(stage.details) if kind is not None else []


def markdown(run: RunSummary) -> str:
    """A summary fit for a CI job summary: one table of metrics per stage, then every gate check
    (marked when it is the default gate), the ungated stages, and why the run failed if it did."""
    reference, conditions = run.reference, run.conditions
    names = list(reference)
    lines = [
        f"# {run.name}: {run.status}",
        "",
        "Measured in one run against the input model (reference); fidelity gates name the model "
        "they compared with; speed at "
        f"batch {conditions.get('batch_size')}, sequence length {conditions.get('seq_len')}, "
        f"{conditions.get('threads')} threads, {conditions.get('runs')} runs.",
        "",
        "| stage | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| reference | " + " | ".join(_fmt(reference[n]) for n in names) + " |",
    ]
    for stage in run.stages:
        lines.append(f"| {stage.name} | " + " | ".join(_fmt(stage.metrics.get(n)) for n in names) + " |")
    lines += [*_gates(run), *_losses(run), *_engines(run, names), *_costs(run)]
    if run.failure:
        lines += ["", "## Why it failed", "", run.failure]
    return "\n".join(lines) + "\n"


def _gates(run: RunSummary) -> list[str]:
    """Every gate check, marked when it is the default gate, and the ungated stages."""
    lines: list[str] = []
    lines += ["", "## Gates", ""]
    for stage in run.stages:
        source = stage.gate.get("source", "recipe")
        for check in stage.gate["checks"]:
            verdict = "pass" if check["passed"] else "FAIL"
            lines.append(
                f"- {stage.name}: `{check['metric']}` = {_fmt(check['value'])} "
                f"{check['op']} {_fmt(check['threshold'])}: **{verdict}**"
                + (
                    f" (standard error {_fmt(check['standard_error'])} over {check.get('tokens')} tokens)"
                    if "standard_error" in check
                    else ""
                )
                + (" (default gate)" if source == "default" else "")
                + (f", against the {stage.gate['against']}" if stage.gate.get("against") else "")
            )
        if source == "ungated":
            lines.append(
                f"- {stage.name}: **ungated** (`gate: []` in the recipe): its output was not checked "
                "against the input model"
            )
    return lines


def _losses(run: RunSummary) -> list[str]:
    """Each distill stage's loss curve, at most a dozen points."""
    lines: list[str] = []
    for stage in run.stages:
        curve = stage.loss_curve()
        if curve:
            lines += [
                "",
                f"## Distillation loss ({stage.name})",
                "",
                "| step | train | held-out | lr |",
                "|---|---|---|---|",
            ]
            shown = curve if len(curve) <= 12 else [*curve[:: len(curve) // 12], curve[-1]]
            points = {point["step"]: point for point in shown}  # the last point may repeat
            lines += [
                f"| {p['step']} | {_fmt(p['train_loss'])} | {_fmt(p['heldout_loss'])} | {p['lr']:.2e} |"
                for p in points.values()
            ]
    return lines


def _engines(run: RunSummary, names: list[str]) -> list[str]:
    """Each engine's file and what it measured, where there are several."""
    lines: list[str] = []
    if len(run.engines) > 1:
        lines += ["", "## Files per engine (fastest first, each held to the last stage's gate)", ""]
        lines += ["| engine | file | gate | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
        lines += [
            f"| {e['engine']} | `{e['file']}` | {'pass' if e['gate']['passed'] else 'FAIL'} | "
            + " | ".join(_fmt(e["metrics"].get(n)) for n in names)
            + " |"
            for e in run.engines
        ]
    return lines


def _costs(run: RunSummary) -> list[str]:
    """Each step's time and memory."""
    lines: list[str] = []
    if run.costs:
        lines += ["", "## Cost per step (a step reused from the cache shows what it cost when it ran)", ""]
        lines += ["| step | seconds | peak RSS MB | worker's peak RSS MB |", "|---|---|---|---|"]
        lines += [
            f"| {row['step']} | {row['seconds']} | {row.get('peak_rss_mb', '')} | {row.get('worker_peak_rss_mb', '')} |"
            for row in run.costs
        ]
    return lines


def to_job_summary(text: str) -> None:
    """Append the report to the CI job summary when the job has one ($GITHUB_STEP_SUMMARY)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with Path(path).open("a") as summary:
            summary.write(text + "\n")
