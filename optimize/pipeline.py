"""The pipeline: one loop you can read top to bottom.

    reference = measure(input model)
    for stage in recipe.stages: (export if it needs ONNX) -> run -> measure -> gate
    write the artifact (staged beside OUT, renamed into place at the end)

Every stage is gated: by its recipe's `gate`, or, when it names none, by the default fidelity gate
for the task (`gate.default_gate`); an explicit `gate: []` runs ungated and is reported as such on
stderr, in the report, the manifest and `--json`. The export step always gets the default gate.

Every command (`run`, `compile`, ...) ends here with a validated recipe.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from optimize import artifact, report
from optimize.data import column, read_rows, split_calibration, texts_sha256
from optimize.errors import GateFailed, UsageError
from optimize.evaluate import Evaluator, SpeedSettings
from optimize.export import content_sha256, export
from optimize.gate import GateCheck, GateSource, default_gate, judge_all
from optimize.model import ModelHandle, open_any
from optimize.recipe import LoadedRecipe
from optimize.stages import NEEDS_ONNX, RUNNERS
from optimize.stages.base import StageContext, StageResult
from optimize.suites import load_suite

BASE_METRICS = ("cosine_mean", "cosine_min", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                "throughput_per_s", "size_mb")
LOGIT_METRICS = ("top1_agreement", "kl_div")  # models that output logits (classifiers, causal LMs)


@dataclass(frozen=True)
class RunOptions:
    out: Path
    model: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: Path | None = None
    overwrite: bool = False


@dataclass
class RunResult:
    status: str
    artifact: Path | None
    stages: list[dict[str, Any]] = field(default_factory=list)


def run(loaded: LoadedRecipe, options: RunOptions, console: Console) -> RunResult:
    recipe = loaded.recipe
    artifact.check_destination(options.out, options.overwrite)
    spec = options.model or recipe.model
    if spec is None:
        raise UsageError(f"{loaded.source}: model: no model given; set `model:` in the recipe or pass --model")
    model = open_any(spec, options.allow_pickle, options.trust_remote_code,
                     loaded.base_dir if not options.model else None)
    if recipe.task is not None and recipe.task != model.task:
        model = dataclasses.replace(model, task=recipe.task)
    if not (model.checkpoint / "tokenizer.json").is_file():
        raise UsageError(f"model {spec!r}: no tokenizer.json; save the checkpoint with a fast tokenizer")
    cal = recipe.calibration
    cal_path = loaded.find(cal.data, "calibration")
    calibration, holdout = split_calibration(column(read_rows(cal_path), None, cal_path),
                                             cal.samples, cal.holdout, recipe.seed, cal_path)

    suites = [load_suite(loaded.find(name, "evals")) for name in recipe.evals]
    measured = set(BASE_METRICS) | {s.metric for s in suites}
    if model.task != "feature-extraction":
        measured |= set(LOGIT_METRICS)
    sources = [gate_source(stage.gate) for stage in recipe.stages]
    loaded = loaded.with_default_gates(default_gate(model.task))
    recipe = loaded.recipe
    for index, stage in enumerate(recipe.stages):
        if sources[index] == "ungated":
            console.print(f"[yellow]warning:[/] stage {index} ({stage.name or stage.kind}) is ungated (`gate: []`): "
                          "its output will not be checked against the input model", highlight=False)
        for check in stage.gate or []:
            if check.metric not in measured:
                raise UsageError(f"{loaded.source}: stages.{index}.gate: {check.metric} is not measured by this "
                                 f"recipe (measured: {', '.join(sorted(measured))}); add an eval suite under `evals:`")
    evaluator = Evaluator(holdout, SpeedSettings(seq_len=cal.seq_len), suites)
    if options.cache_dir is not None:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
    workroot = Path(tempfile.mkdtemp(prefix="optimize-", dir=options.cache_dir))
    staging: Path | None = None
    stages: list[dict[str, Any]] = []
    plan: dict[str, str] = {}
    runtime_settings: dict[str, Any] = {}
    try:
        with console.status("measuring the reference (input model)"):
            reference, reference_details = evaluator.measure(model)
        console.print(f"reference: {model.checkpoint} ({model.task})")

        def workdir(name: str) -> Path:
            path = workroot / f"{len(stages)}-{name}"
            path.mkdir()
            return path

        def fail(message: str) -> GateFailed:
            _write_failed_report(options.out, loaded, reference, stages, evaluator.conditions, message)
            return GateFailed(message, stages)

        def export_step(current: ModelHandle) -> ModelHandle:
            with console.status("exporting to ONNX"):
                exported, info = export(current, workdir("export"), holdout, cal.seq_len, options.cache_dir)
                metrics, details = evaluator.measure(exported)
            checked: dict[str, Any] = {"name": "export", "kind": "export", "config": info, "metrics": metrics,
                                       "details": details,
                                       "gate": judge_all(default_gate(current.task), metrics, reference, "default")}
            stages.append(checked)
            report.print_stage(console, checked, reference)
            if not checked["gate"]["passed"]:
                raise fail(f"export: the ONNX model does not agree with the checkpoint: {_failed_checks(checked)}")
            return exported

        for index, stage in enumerate(recipe.stages):
            if stage.kind in NEEDS_ONNX and not model.is_onnx:
                model = export_step(model)
            name = stage.name or stage.kind
            checks: list[GateCheck] = list(stage.gate or [])

            def judge(handle: ModelHandle, gate: list[GateCheck] = checks,
                      source: GateSource = sources[index]) -> tuple[dict[str, float], dict[str, Any]]:
                metrics, _ = evaluator.measure(handle)
                return metrics, judge_all(gate, metrics, reference, source)

            ctx = StageContext(workdir(stage.kind), tuple(calibration), cal.seq_len, recipe.seed, judge,
                               evaluator.probe)
            record: dict[str, Any] = {"name": name, "kind": stage.kind,
                                      "config": stage.model_dump(mode="json", exclude={"gate", "name"})}
            try:
                with console.status(f"stage {index} ({name}): running"):
                    result: StageResult = RUNNERS[stage.kind](stage, model, ctx)
            except GateFailed as exc:
                raise fail(f"stage {index} ({name}): {exc}") from None
            model, record["details"] = result.model, dict(result.decisions)
            plan.update(result.precision_plan)
            runtime_settings.update(result.runtime)
            with console.status(f"stage {index} ({name}): measuring"):
                metrics, record["details"]["speed"] = evaluator.measure(model)
            record.update(metrics=metrics, gate=judge_all(checks, metrics, reference, sources[index]))
            stages.append(record)
            report.print_stage(console, record, reference)
            if not record["gate"]["passed"]:
                advice = f"; {result.advice}" if result.advice else ""
                raise fail(f"stage {index} ({name}): gate failed: {_failed_checks(record)}{advice}")
        if not model.is_onnx:
            model = export_step(model)

        assert model.onnx_path is not None
        status = "passed"
        manifest = {
            "schema_version": artifact.SCHEMA_VERSION, "name": recipe.name, "task": model.task,
            "provenance": {"source": spec, "source_sha256": content_sha256(model.checkpoint),
                           "recipe": loaded.text, "recipe_sha256": loaded.sha256, "seed": recipe.seed,
                           "calibration": {"data": str(cal.data), "sha256": texts_sha256(calibration),
                                           "samples": len(calibration), "holdout": len(holdout)},
                           "versions": artifact.versions()},
            "reference": {"metrics": reference, "details": reference_details, "conditions": evaluator.conditions},
            "stages": stages,
            "precision_plan": plan,
            "runtime": {"target": _target(recipe.stages), "seq_len": cal.seq_len, "task": model.task,
                        "int8": "int8" in plan.values(), **runtime_settings},
        }
        summary = {"status": status, "reference": reference, "stages": stages, "conditions": evaluator.conditions}
        staging = artifact.staging_dir(options.out)
        artifact.write(options.out, staging, model.onnx_path, model.checkpoint, manifest,
                       report.markdown(recipe.name, status, reference, stages, evaluator.conditions),
                       summary, options.overwrite)
        staging = None
        return RunResult(status, options.out, stages)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def gate_source(gate: list[GateCheck] | None) -> GateSource:
    """Where a stage's checks come from: none given (the default gate), `[]` (ungated), or the recipe."""
    if gate is None:
        return "default"
    return "recipe" if gate else "ungated"


def _failed_checks(record: dict[str, Any]) -> str:
    return "; ".join(f"{c['metric']} = {c['value']} is not {c['op']} {c['threshold']}"
                     for c in record["gate"]["checks"] if not c["passed"])


def _target(stages: Any) -> str:
    return next((s.target for s in stages if s.kind == "compile"), "cpu")


def _write_failed_report(out: Path, loaded: LoadedRecipe, reference: dict[str, float],
                         stages: list[dict[str, Any]], conditions: dict[str, Any], message: str) -> None:
    """A failed gate emits no artifact, but leaves its report beside where OUT would have been."""
    path = out.resolve().parent / f"{out.name}.gate-failed.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.markdown(loaded.recipe.name, "gate failed", reference, stages, conditions, message))
