"""Before the first measurement: open the model and the data, and settle each stage's gate, so
any bad input fails in seconds, not after minutes of work (`pipeline.run` calls `prepare` first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from optimize import metrics
from optimize.artifact import write as artifact
from optimize.data import columns_of, load_rows, split_calibration
from optimize.errors import UsageError
from optimize.evaluate.gate import GateCheck
from optimize.evaluate.measure import Evaluator, SpeedSettings
from optimize.evaluate.suites import load_suite
from optimize.models import memory
from optimize.models.handle import ModelHandle, cache_root
from optimize.models.loading import open_any
from optimize.paths import named, recipe_data
from optimize.pipeline.recipe import LoadedRecipe
from optimize.runtime.manifest import GateSource, JsonObject


@dataclass(frozen=True, kw_only=True)  # six flags: a swapped pair must not type-check
class RunOptions:
    out: Path
    model: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: Path | None = None  # the stage cache's folder (default: cache.default_root())
    no_cache: bool = False  # run every step, reuse and store nothing
    overwrite: bool = False
    resume: bool = False  # continue a training stage from its checkpoints beside OUT
    force: bool = False  # run even when the estimated peak memory is more than the machine has


@dataclass(frozen=True)
class Prepared:
    """Everything checked and loaded before the first measurement."""

    loaded: LoadedRecipe  # with the gate in force written into every stage
    spec: str  # the model as the user named it
    model: ModelHandle
    sources: list[GateSource]  # per stage: recipe, default or ungated
    calibration: list[str]
    holdout: list[str]
    evaluator: Evaluator
    data: list[JsonObject]  # what each data set read was (source, rows, sha256), for the manifest


def gate_source(gate: list[GateCheck] | None) -> GateSource:
    """Where a stage's checks come from: none given (the default gate), `[]` (ungated), or the recipe."""
    if gate is None:
        return "default"
    return "recipe" if gate else "ungated"


def prepare(loaded: LoadedRecipe, options: RunOptions, console: Console, workroot: Path) -> Prepared:
    """Open the model and the data, and settle each stage's gate; any bad input fails here, before
    minutes of work. A GGUF model is converted into the cache's `gguf/` folder, or, with
    `--no-cache`, into the run's scratch folder `workroot`, removed with it."""
    recipe = loaded.recipe
    artifact.check_destination(options.out, options.overwrite)
    spec = options.model or recipe.model
    if spec is None:
        raise UsageError(f"{loaded.source}: model: no model given; set `model:` in the recipe or pass --model")
    gguf_root = workroot / "gguf" if options.no_cache else (options.cache_dir or cache_root()) / "gguf"
    base_dir = loaded.base_dir if not options.model else None
    model = open_any(spec, options.allow_pickle, options.trust_remote_code, base_dir, gguf_root)
    if recipe.task is not None and recipe.task != model.task:
        model = dataclasses.replace(model, task=recipe.task)
    memory.check(model.checkpoint, recipe.stages, options.force)  # from the headers: nothing loaded yet
    memory.check_disk(model.checkpoint, recipe.stages, workroot, options.force)
    weights = [
        *model.checkpoint.glob("*.safetensors"),
        *model.checkpoint.glob("*.onnx*"),
        *model.checkpoint.glob("*.bin"),
    ]
    artifact.check_free_space(options.out, sum(p.stat().st_size for p in weights if p.is_file()))
    if not (model.checkpoint / "tokenizer.json").is_file():
        raise UsageError(f"model {spec!r}: no tokenizer.json; save the checkpoint with a fast tokenizer")
    cal = recipe.calibration
    found = load_rows(cal.data, recipe_data(cal.data, loaded.base_dir), cal.format, f"{loaded.source}: calibration")
    texts = columns_of(found.rows, list(cal.columns) or [None], found.source)
    calibration, holdout = split_calibration(texts, cal.samples, cal.holdout, recipe.seed, Path(found.source))
    suites = [load_suite(named(name, "evals", loaded.base_dir)) for name in recipe.evals]
    # Validation allowed logit metrics while the task was unknown; now the model says.
    suite_metrics = [s.metric for s in suites]
    measured = metrics.measured(model.task, suite_metrics)
    for index, stage in enumerate(recipe.stages):
        for check in stage.gate or []:
            if check.metric not in measured:
                raise UsageError(
                    f"{loaded.source}: stages.{index}.gate: {check.metric} is not measured for a "
                    f"{model.task} model (measured: {', '.join(sorted(measured))})"
                )
    for stage in recipe.stages:
        stage.check_input(model, loaded.base_dir, calibration)
    sources = [gate_source(stage.gate) for stage in recipe.stages]
    for index, stage in enumerate(recipe.stages):
        if sources[index] == "ungated":
            console.print(
                f"[yellow]warning:[/] stage {index} ({stage.name or stage.kind}) is ungated (`gate: []`): "
                "its output will not be checked against the input model",
                highlight=False,
            )
    evaluator = Evaluator(holdout, SpeedSettings(seq_len=cal.seq_len), suites, reference=model)
    data = [{"calibration": cal.data, "source": found.source, "rows": len(found.rows)}]
    data += [suite.provenance() for suite in suites]
    in_force = loaded.with_default_gates(model.task, suite_metrics)
    return Prepared(in_force, spec, model, sources, calibration, holdout, evaluator, data)
