"""The pipeline: one loop you can read top to bottom.

    prepared = prepare(recipe)             # model, data, suites, the gate in force per stage (prepare.py)
    reference = measure(input model)
    for stage in recipe.stages: (export if it needs ONNX) -> stage.run -> measure -> gate
    write the artifact (staged beside OUT, renamed into place at the end)

Every stage is gated: by its recipe's `gate`, or, when it names none, by the default fidelity gate
for the task (`gate.default_gate`); an explicit `gate: []` runs ungated and is reported as such on
stderr, in the report, the manifest and `--json`. The export step always gets the default gate.
Every command (`run`, `quantize`, `compile`, ...) ends here with a validated recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from optimize import costs
from optimize.artifact import manifest as manifests
from optimize.artifact import report, report_html
from optimize.artifact import write as artifact
from optimize.data import texts_sha256
from optimize.errors import INTERRUPTED, GateFailed, stop_if_interrupted
from optimize.evaluate.gate import default_gate
from optimize.models.checkpoint import folder_sha256
from optimize.models.handle import ModelHandle
from optimize.pipeline import cache as stage_cache
from optimize.pipeline.alternates import Alternates
from optimize.pipeline.export import export
from optimize.pipeline.judging import Judging
from optimize.pipeline.prepare import Prepared, RunOptions, prepare
from optimize.pipeline.recipe import LoadedRecipe
from optimize.records import RunSummary, StageRecord
from optimize.runtime.manifest import (
    EngineFile,
    GateResult,
    GateSource,
    JsonObject,
    Manifest,
    Reference,
    RuntimeSettings,
)
from optimize.stages import distill_training as training
from optimize.stages.base import StageBase, StageContext


@dataclass
class RunResult:
    status: str
    artifact: Path | None
    stages: list[StageRecord] = field(default_factory=list)


class _Run:
    """One run's working state: the reference, the records so far, and a scratch folder."""

    def __init__(self, prepared: Prepared, options: RunOptions, console: Console, workroot: Path):
        self.prepared, self.options, self.console, self.workroot = prepared, options, console, workroot
        self.evaluator = prepared.evaluator
        self.judging = Judging(prepared.evaluator, prepared.spec)  # the reference, and what gates compare to
        self.stages: list[StageRecord] = []
        self.reference_details: JsonObject = {}
        self.plan: dict[str, str] = {}
        self.runtime: RuntimeSettings = {}
        self.alternates = Alternates()  # the other engines' files, beside the run's model
        # The stage cache and the key of the run so far (each step chains its own onto it).
        use_cache = not options.no_cache and training.world_size() == 1
        root = options.cache_dir / "stages" if options.cache_dir else stage_cache.default_root()
        store = stage_cache.StageCache(root) if use_cache else None
        recipe, cal = prepared.loaded.recipe, prepared.loaded.recipe.calibration
        self.source_sha256 = folder_sha256(prepared.model.checkpoint)  # hashed once: the key and the manifest
        base = stage_cache.key(
            "run",
            self.source_sha256,
            prepared.model.task,
            texts_sha256(prepared.calibration),
            texts_sha256(prepared.holdout),
            cal.seq_len,
            recipe.seed,
            prepared.data,
            manifests.versions(),
            stage_cache.source_sha256() if store else "",
        )
        self.cache = stage_cache.RunCache(store, base, recipe.name)

    def cached(self, step: str, *parts: object) -> tuple[str, tuple[Path, stage_cache.Entry] | None]:
        step_key, found = self.cache.lookup(step, *parts)
        if found is not None:
            self.console.print(f"{step}: reused from the cache ({found[0]})", highlight=False)
        return step_key, found

    def reuse(self, step_key: str, found: tuple[Path, stage_cache.Entry], source: ModelHandle) -> ModelHandle:
        """A cached step's model and record, as if it had just run."""
        costs.replay(found[1].get("costs", []))
        self.record(StageRecord.of(found[1]["record"]))
        return self.cache.reuse(step_key, found, source)

    def workdir(self, name: str) -> Path:
        path = self.workroot / f"{len(self.stages)}-{name}"
        path.mkdir()
        return path

    def summary(self, status: str, failure: str | None = None) -> RunSummary:
        recipe, reference = self.prepared.loaded.recipe, self.judging.reference
        return RunSummary(recipe.name, status, reference, self.stages, self.evaluator.conditions, failure)

    def fail(self, message: str) -> GateFailed:
        """A failed gate emits no artifact, but leaves its report beside where OUT would have been."""
        out = self.options.out
        path = out.resolve().parent / f"{out.name}.gate-failed.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.markdown(self.summary("gate failed", message)))
        report.to_job_summary(path.read_text())
        return GateFailed(message, self.stages)

    def record(self, record: StageRecord) -> StageRecord:
        self.stages.append(record)
        report.print_stage(self.console, record, self.judging.reference)
        return record

    def export(self, model: ModelHandle) -> ModelHandle:
        stop_if_interrupted()
        step_key, found = self.cached("export")
        if found is not None:
            return self.reuse(step_key, found, model)
        cal, start = self.prepared.loaded.recipe.calibration, costs.mark()
        with self.console.status("exporting to ONNX"), contextlib.redirect_stdout(sys.stderr), costs.step("export"):
            exported, info = export(model, self.workdir("export"), self.prepared.holdout, cal.seq_len)
            measured, details = self.evaluator.measure(exported)
        gate = self.judging.judge(default_gate(model.task), measured, "default", exported)
        record = self.record(StageRecord("export", "export", info, measured, gate, details))
        if not record.passed:
            raise self.fail(f"export: the ONNX model does not agree with the checkpoint: {record.failed_checks()}")
        self.cache.keep(step_key, "export", {"record": record.to_json(), "costs": costs.since(start)}, exported, model)
        return exported

    def stage(self, index: int, stage: StageBase, model: ModelHandle) -> ModelHandle:
        """Run one stage on `model` and hold it to its gate; returns the stage's model."""
        stop_if_interrupted()
        if stage.needs_onnx and not model.is_onnx:
            model = self.export(model)
        name, checks, source = stage.name or stage.kind, list(stage.gate or []), self.prepared.sources[index]
        step = f"stage {index} ({name})"
        config = stage.model_dump(mode="json")
        files = stage_cache.referenced_files(config, self.prepared.loaded.base_dir) if self.cache.store else {}
        step_key, found = self.cached(step, config, source, files)
        if found is not None:
            return self.reuse_stage(stage, step_key, found, model, index, name)

        def judge(handle: ModelHandle) -> tuple[dict[str, float], GateResult]:
            measured, _ = self.evaluator.measure(handle)
            return measured, self.judging.judge(checks, measured, source, handle)

        ctx, start = self.context(index, stage, judge), costs.mark()
        try:
            # stdout is kept for --json: what a library prints during a stage goes to stderr.
            with (
                self.console.status(f"stage {index} ({name}): running"),
                contextlib.redirect_stdout(sys.stderr),
                costs.step(step),
            ):
                result = stage.run(model, ctx)
        except GateFailed as exc:  # a search that found nothing: its record shows what it measured
            raise self.search_failed(exc, index, stage, source) from None
        self.plan.update(result.precision_plan)
        self.runtime.update(result.runtime)
        self.alternates.adopt(stage.keeps_alternates, result.model, result.alternates, result.judged)
        with self.console.status(f"stage {index} ({name}): measuring"), costs.step(f"{step}: its output"):
            measured, speed = self.evaluator.measure(result.model)
        record = self.record(
            StageRecord(
                name,
                stage.kind,
                stage.model_dump(mode="json", exclude={"gate", "name"}),
                measured,
                self.judging.judge(checks, measured, source, result.model),
                {**result.decisions, "speed": speed},
            )
        )
        if result.model.checkpoint != model.checkpoint:
            self.judging.adopt_anchor(result.model, index, name)
        if not record.passed:
            advice = f"; {result.advice}" if result.advice else ""
            raise self.fail(f"stage {index} ({name}): gate failed: {record.failed_checks()}{advice}")
        entry: stage_cache.Entry = {
            "record": record.to_json(),
            "plan": result.precision_plan,
            "runtime": result.runtime,
            "costs": costs.since(start),
        }
        self.cache.keep(step_key, step, entry, result.model, model, result.alternates)
        return result.model

    def search_failed(self, exc: GateFailed, index: int, stage: StageBase, source: GateSource) -> GateFailed:
        """A stage whose search found nothing: recorded with what its closest candidate measured."""
        name = stage.name or stage.kind
        gate: GateResult = {
            "passed": False,
            "source": source,
            "checks": exc.checks,
            "against": self.judging.against(source),
        }
        fields = stage.model_dump(mode="json", exclude={"gate", "name"})
        self.record(StageRecord(name, stage.kind, fields, exc.metrics, gate, dict(exc.details)))
        return self.fail(f"stage {index} ({name}): {exc}")

    def shipped(self, model: ModelHandle) -> tuple[list[EngineFile], dict[str, Path]]:
        """Each engine's file held to the last stage's gate (`Alternates.shipped`)."""
        last = self.stages[-1]
        checks, source = list(self.prepared.loaded.recipe.stages[-1].gate or []), self.prepared.sources[-1]

        def measure(handle: ModelHandle) -> tuple[dict[str, float], GateResult]:
            measured, _ = self.evaluator.measure(handle)
            return measured, self.judging.judge(checks, measured, source, handle)

        return self.alternates.shipped(model, (last.metrics, last.gate), self.cache, measure, self.console)

    def reuse_stage(
        self,
        stage: StageBase,
        step_key: str,
        found: tuple[Path, stage_cache.Entry],
        model: ModelHandle,
        index: int,
        name: str,
    ) -> ModelHandle:
        """A cached stage: its model, record, plan and runtime settings, as if it had just run."""
        reused = self.reuse(step_key, found, model)
        self.plan.update(found[1]["plan"])
        self.runtime.update(found[1]["runtime"])
        self.alternates.adopt(stage.keeps_alternates, reused, self.cache.alternates(found, model), {})
        if reused.checkpoint != model.checkpoint:
            self.judging.adopt_anchor(reused, index, name)
        return reused

    def context(
        self, index: int, stage: StageBase, judge: Callable[[ModelHandle], tuple[dict[str, float], GateResult]]
    ) -> StageContext:
        loaded = self.prepared.loaded
        return StageContext(
            self.workdir(stage.kind),
            tuple(self.prepared.calibration),
            loaded.recipe.calibration.seq_len,
            loaded.recipe.seed,
            judge,
            self.judging.probe,
            self.console,
            loaded.base_dir,
            checkpoints=_checkpoints(self.options.out) / f"stage-{index}",
            resume=self.options.resume,
        )

    def manifest(self, model: ModelHandle, engines: list[EngineFile]) -> Manifest:
        """The artifact's manifest, from what the run read, measured and decided."""
        prepared, loaded = self.prepared, self.prepared.loaded
        recipe, cal = loaded.recipe, loaded.recipe.calibration
        trained = model.checkpoint != prepared.model.checkpoint
        source = manifests.provenance(
            prepared.spec,
            folder_sha256(model.checkpoint) if trained else self.source_sha256,
            loaded.text,
            loaded.sha256,
            recipe.seed,
            {
                "data": str(cal.data),
                "sha256": texts_sha256(prepared.calibration),
                "samples": len(prepared.calibration),
                "holdout": len(prepared.holdout),
            },
            prepared.data,
        )
        reference: Reference = {
            "metrics": self.judging.reference,
            "details": self.reference_details,
            "conditions": self.evaluator.conditions,
        }
        runtime: RuntimeSettings = {
            "target": recipe.target,
            "seq_len": cal.seq_len,
            "task": model.task,
            "int8": "int8" in self.plan.values(),
            "engine": model.engine,  # what runs model.onnx (runtime.ENGINES); the genai stage names its own
            **self.runtime,
        }
        stages = [s.to_json() for s in self.stages]
        return manifests.build(
            recipe.name, model.task, source, reference, stages, self.plan, runtime, engines, costs.rows()
        )


def run(loaded: LoadedRecipe, options: RunOptions, console: Console) -> RunResult:
    """Prepare, measure the reference, run every stage under its gate, write the artifact."""
    if options.cache_dir is not None:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
    workroot = Path(tempfile.mkdtemp(prefix="optimize-", dir=options.cache_dir))
    staging: Path | None = None
    costs.begin()
    try:
        prepared = prepare(loaded, options, console, workroot)
        state = _Run(prepared, options, console, workroot)
        if not training.is_main():
            return _train_only(state)
        model = prepared.model
        state.judging.reference, state.reference_details = _reference(state)
        console.print(f"reference: {model.checkpoint} ({model.task})")
        for index, stage in enumerate(prepared.loaded.recipe.stages):
            model = state.stage(index, stage, model)
        if not model.is_onnx:
            model = state.export(model)
        assert model.onnx_path is not None
        engines, shipped = state.shipped(model)
        stop_if_interrupted()
        staging = artifact.staging_dir(options.out)
        summary = dataclasses.replace(state.summary("passed"), engines=engines, costs=costs.rows())
        # A trained student ships its weights too, so the artifact is also a checkpoint folder that
        # transformers, sentence-transformers and a later `optimize quantize` take as it is.
        trained = model.checkpoint != prepared.model.checkpoint
        manifest = state.manifest(model, engines)
        artifact.write(
            options.out,
            staging,
            shipped,
            model.checkpoint,
            manifest,
            report.markdown(summary),
            summary.to_json(),
            options.overwrite,
            report_html=report_html.page(summary, state.plan),
            with_weights=trained,
        )
        staging = None
        report.to_job_summary(report.markdown(summary))
        if INTERRUPTED.is_set():  # Ctrl-C while the files were written: take the artifact back
            shutil.rmtree(options.out, ignore_errors=True)
            raise KeyboardInterrupt
        shutil.rmtree(_checkpoints(options.out), ignore_errors=True)  # the artifact supersedes them
        return RunResult("passed", options.out, state.stages)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _reference(state: _Run) -> tuple[dict[str, float], JsonObject]:
    """The input model measured (metrics and speed details), from the cache when it was before."""
    step_key, found = state.cache.lookup("reference")
    evaluator = state.prepared.evaluator
    if found is not None:
        evaluator.conditions = found[1]["conditions"]  # what the speed figures were measured under
        kept = found[1].get("losses", {})  # per token, for the gates' standard errors
        evaluator.keep_losses(state.prepared.model, {k: np.asarray(v) for k, v in kept.items()})
        costs.replay(found[1].get("costs", []))
        return found[1]["metrics"], found[1]["details"]
    start = costs.mark()
    with state.console.status("measuring the reference (input model)"), costs.step("reference"):
        measured, details = evaluator.measure(state.prepared.model)
    entry: stage_cache.Entry = {
        "step": "reference",
        "metrics": measured,
        "details": details,
        "conditions": evaluator.conditions,
        "losses": {k: v.tolist() for k, v in evaluator.losses(state.prepared.model).items()},
        "costs": costs.since(start),
    }
    state.cache.put(step_key, entry)
    return measured, details


def _checkpoints(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}.checkpoints"


def _train_only(state: _Run) -> RunResult:
    """A torchrun worker (rank > 0) only trains beside rank 0: the first stage, when it is one that
    trains (distill); rank 0 alone measures, gates and writes."""
    first = state.prepared.loaded.recipe.stages[0]
    if first.kind == "distill":
        unjudged: GateResult = {"passed": True, "source": "ungated", "checks": []}  # rank 0 judges
        first.run(state.prepared.model, state.context(0, first, lambda handle: ({}, unjudged)))
    return RunResult("worker", None)
