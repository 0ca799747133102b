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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from optimize import costs, runtime
from optimize.artifact import report, report_html
from optimize.artifact import write as artifact
from optimize.data import texts_sha256
from optimize.errors import INTERRUPTED, GateFailed, stop_if_interrupted
from optimize.evaluate.gate import GateCheck, default_gate, judge_all
from optimize.models.checkpoint import content_sha256
from optimize.models.handle import ModelHandle
from optimize.pipeline import cache as stage_cache
from optimize.pipeline.export import export
from optimize.pipeline.prepare import Prepared, RunOptions, prepare
from optimize.pipeline.recipe import LoadedRecipe
from optimize.records import RunSummary, StageRecord, failed_checks
from optimize.runtime.manifest import EngineFile, GateResult, GateSource, JsonObject, Manifest, RuntimeSettings
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
        self.stages: list[StageRecord] = []
        self.reference: dict[str, float] = {}
        self.reference_details: JsonObject = {}
        self.plan: dict[str, str] = {}
        self.runtime: RuntimeSettings = {}
        self.alternates: dict[str, ModelHandle] = {}  # engine family -> its file's model, beside the run's
        self.judged: dict[str, tuple[dict[str, float], GateResult]] = {}  # what the last stage measured of them
        # What default gates measure fidelity against: the reference (None) until a stage changes the
        # weights (distillation); from then on the newest trained model, so a later stage is judged on
        # what it changed, not on the distance the student already is from its teacher.
        self.anchor: ModelHandle | None = None
        self.anchor_name = ""  # which stage made it, for the records
        # The stage cache and the key of the run so far (each step chains its own onto it).
        use_cache = not options.no_cache and training.world_size() == 1
        root = options.cache_dir / "stages" if options.cache_dir else stage_cache.default_root()
        store = stage_cache.StageCache(root) if use_cache else None
        recipe, cal = prepared.loaded.recipe, prepared.loaded.recipe.calibration
        self.source_sha256 = content_sha256(prepared.model.checkpoint)  # hashed once: the key and the manifest
        base = stage_cache.key(
            "run",
            self.source_sha256,
            prepared.model.task,
            texts_sha256(prepared.calibration),
            texts_sha256(prepared.holdout),
            cal.seq_len,
            recipe.seed,
            prepared.data,
            artifact.versions(),
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
        return f"input model ({self.prepared.spec})"

    def adopt_anchor(self, handle: ModelHandle, index: int, name: str) -> None:
        """New weights (a trained student): later default gates compare against them."""
        self.anchor, self.anchor_name = handle, f"stage {index} ({name}) output"

    def probe(self, handle: ModelHandle) -> dict[str, float]:
        if self.anchor is None:
            return self.evaluator.probe(handle)
        return self.evaluator.agreement(handle, self.anchor)

    def workdir(self, name: str) -> Path:
        path = self.workroot / f"{len(self.stages)}-{name}"
        path.mkdir()
        return path

    def summary(self, status: str, failure: str | None = None) -> RunSummary:
        return RunSummary(
            self.prepared.loaded.recipe.name, status, self.reference, self.stages, self.evaluator.conditions, failure
        )

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
        report.print_stage(self.console, record, self.reference)
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
        gate = self.judge(default_gate(model.task), measured, "default", exported)
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
            return measured, self.judge(checks, measured, source, handle)

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
            gate: GateResult = {
                "passed": False,
                "source": source,
                "checks": exc.checks,
                "against": self.against(source),
            }
            fields = stage.model_dump(mode="json", exclude={"gate", "name"})
            self.record(StageRecord(name, stage.kind, fields, exc.metrics, gate, dict(exc.details)))
            raise self.fail(f"stage {index} ({name}): {exc}") from None
        self.plan.update(result.precision_plan)
        self.runtime.update(result.runtime)
        self.adopt_alternates(stage, result.model, result.alternates, result.judged)
        with self.console.status(f"stage {index} ({name}): measuring"), costs.step(f"{step}: its output"):
            measured, speed = self.evaluator.measure(result.model)
        record = self.record(
            StageRecord(
                name,
                stage.kind,
                stage.model_dump(mode="json", exclude={"gate", "name"}),
                measured,
                self.judge(checks, measured, source, result.model),
                {**result.decisions, "speed": speed},
            )
        )
        if result.model.checkpoint != model.checkpoint:
            self.adopt_anchor(result.model, index, name)
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

    def adopt_alternates(
        self,
        stage: StageBase,
        model: ModelHandle,
        alternates: Mapping[str, ModelHandle],
        judged: Mapping[str, tuple[dict[str, float], GateResult]],
    ) -> None:
        """The other engines' files after `stage` made `model`: its own, and an earlier stage's where
        this kind keeps them (compile); never one for the family `model` itself runs on. What this
        stage measured of them (`judged`) stands for its gate; an earlier stage's does not."""
        if not stage.keeps_alternates:
            self.alternates = {}
        self.alternates.update(alternates)
        self.alternates.pop(runtime.family(model.engine), None)
        self.judged = dict(judged)

    def engine_files(self, model: ModelHandle) -> tuple[list[EngineFile], dict[str, Path]]:
        """Each engine's file, fastest first (the run's model, then the other engines' alternates),
        each held to the last stage's gate through its engine: one that fails is reported, not
        shipped. Returns the manifest's `engines` and, per artifact file, the ONNX file it is made from."""
        last = self.stages[-1]
        found = [(model, last.metrics, last.gate)]
        checks, source = list(self.prepared.loaded.recipe.stages[-1].gate or []), self.prepared.sources[-1]
        for engine, handle in sorted(self.alternates.items()):
            step_key, cached = self.cached(f"{engine} file")
            start = costs.mark()
            if cached is None:
                if engine in self.judged:  # the last stage judged it against this same gate
                    measured, gate = self.judged[engine]
                else:
                    with self.console.status(f"measuring the {engine} file"):
                        measured, _ = self.evaluator.measure(handle)
                    gate = self.judge(checks, measured, source, handle)
                entry: stage_cache.Entry = {"step": f"{engine} file", "metrics": measured, "gate": gate}
                self.cache.put(step_key, {**entry, "costs": costs.since(start)})
            else:
                measured, gate = cached[1]["metrics"], cached[1]["gate"]
                costs.replay(cached[1].get("costs", []))
            if gate["passed"]:
                found.append((handle, measured, gate))
            else:
                failed = failed_checks(gate)
                self.console.print(f"[yellow]warning:[/] the {engine} file is not shipped: {failed}", highlight=False)
        engines: list[EngineFile] = []
        shipped: dict[str, Path] = {}
        for handle, measured, gate in found:
            name = artifact.ENGINE_FILES.get(runtime.family(handle.engine), "model.onnx")
            engines.append({"engine": handle.engine, "file": name, "metrics": measured, "gate": gate})
            shipped[name] = handle.onnx_path or handle.checkpoint  # a file, or a folder format
        assert model.onnx_path is not None
        shipped.setdefault("model.onnx", model.onnx_path)  # where no onnxruntime file holds: the run's graph
        return engines, shipped

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
        self.adopt_alternates(stage, reused, self.cache.alternates(found, model), {})
        if reused.checkpoint != model.checkpoint:
            self.adopt_anchor(reused, index, name)
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
            self.probe,
            self.console,
            loaded.base_dir,
            checkpoints=_checkpoints(self.options.out) / f"stage-{index}",
            resume=self.options.resume,
        )

    def manifest(self, model: ModelHandle) -> Manifest:
        prepared, loaded = self.prepared, self.prepared.loaded
        recipe, cal = loaded.recipe, loaded.recipe.calibration
        return {
            "schema_version": artifact.SCHEMA_VERSION,
            "name": recipe.name,
            "task": model.task,
            "provenance": {
                "source": prepared.spec,
                "source_sha256": self.source_sha256
                if model.checkpoint == prepared.model.checkpoint
                else content_sha256(model.checkpoint),
                "recipe": loaded.text,
                "recipe_sha256": loaded.sha256,
                "seed": recipe.seed,
                "calibration": {
                    "data": str(cal.data),
                    "sha256": texts_sha256(prepared.calibration),
                    "samples": len(prepared.calibration),
                    "holdout": len(prepared.holdout),
                },
                "data": prepared.data,
                "versions": artifact.versions(),
            },
            "reference": {
                "metrics": self.reference,
                "details": self.reference_details,
                "conditions": self.evaluator.conditions,
            },
            "stages": [s.to_json() for s in self.stages],
            "precision_plan": self.plan,
            "runtime": {
                "target": recipe.target,
                "seq_len": cal.seq_len,
                "task": model.task,
                "int8": "int8" in self.plan.values(),
                "engine": model.engine,  # what runs model.onnx (runtime.ENGINES); the genai stage names its own
                **self.runtime,
            },
        }


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
        state.reference, state.reference_details = _reference(state)
        console.print(f"reference: {model.checkpoint} ({model.task})")
        for index, stage in enumerate(prepared.loaded.recipe.stages):
            model = state.stage(index, stage, model)
        if not model.is_onnx:
            model = state.export(model)
        assert model.onnx_path is not None
        engines, shipped = state.engine_files(model)
        stop_if_interrupted()
        staging = artifact.staging_dir(options.out)
        summary = dataclasses.replace(state.summary("passed"), engines=engines, costs=costs.rows())
        # A trained student ships its weights too, so the artifact is also a checkpoint folder that
        # transformers, sentence-transformers and a later `optimize quantize` take as it is.
        trained = model.checkpoint != prepared.model.checkpoint
        manifest = state.manifest(model)
        manifest["engines"] = engines
        manifest["costs"] = costs.rows()  # measurements.json only (artifact.VOLATILE)
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
