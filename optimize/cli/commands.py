"""The `optimize` command line: thin commands that build a recipe and hand it to the pipeline.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the commands, so `--help`
is instant. Exit codes (DESIGN.md): 0 done, 2 bad input, 3 a gate failed, 1 a bug.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from optimize import paths, tasks
from optimize.cli import tools as cli_tools
from optimize.cli.common import GateOpt, ResumeOpt, RunFlags, SuiteOpt, console, emit, with_run_flags
from optimize.errors import INTERRUPTED, DependencyError, GateFailed, ResourceError, UsageError
from optimize.runtime.untyped import ClickError

if TYPE_CHECKING:
    from optimize.pipeline.recipe import LoadedRecipe

app = typer.Typer(
    name="optimize",
    help="Take a trained checkpoint to a smaller, faster release artifact, with gates that prove quality held.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_tools.tools)  # eval, bench, inspect, package
app.add_typer(cli_tools.recipe_app, name="recipe")
app.add_typer(cli_tools.cache_app, name="cache")


def _execute(
    build: Callable[[], LoadedRecipe], flags: RunFlags, *, model: str | None = None, resume: bool = False
) -> None:
    """Validate the recipe, run the pipeline, print the outcome and exit with DESIGN.md's code."""
    from optimize.stages.distill_training import is_main

    # Libraries (onnxruntime.quantization, optimum) log advice for every call; the run has its own report.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    _stop_on_signals()
    # Under torchrun, rank 0 speaks for the run; the other ranks only train beside it.
    run_console = console if is_main() else Console(stderr=True, quiet=True)
    try:
        loaded = build()
        if flags.dry_run:
            text = _dry_run_text(loaded, model)
            if flags.as_json:
                emit(True, "dry_run", recipe=yaml.safe_load(text))
            else:
                print(text, end="")
            raise typer.Exit(0)
        from optimize.pipeline.prepare import RunOptions
        from optimize.pipeline.run import run

        options = RunOptions(
            out=flags.out or Path("artifacts") / loaded.recipe.name,
            model=model,
            allow_pickle=flags.allow_pickle,
            trust_remote_code=flags.trust_remote_code,
            cache_dir=flags.cache_dir,
            no_cache=flags.no_cache,
            overwrite=flags.overwrite,
            resume=resume,
            force=flags.force,
        )
        result = run(loaded, options, run_console)
    except (UsageError, ResourceError, DependencyError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        emit(flags.as_json, "error", error=str(exc))
        raise typer.Exit(exc.exit_code) from None
    except MemoryError:
        message = "out of memory: the run needed more than this machine has; try a machine with more memory"
        console.print(f"[red]error:[/] {escape(message)}", highlight=False)
        emit(flags.as_json, "error", error=message)
        raise typer.Exit(ResourceError.exit_code) from None
    except GateFailed as exc:
        console.print(f"[red]gate failed:[/] {escape(str(exc))}", highlight=False)
        emit(flags.as_json, "gate_failed", None, exc.stages, str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _interrupted(flags.as_json)
    if result.status == "worker":
        return
    console.print(f"[green]passed[/]: artifact at {result.artifact}")
    emit(flags.as_json, result.status, result.artifact, result.stages, None)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a CI job cancelled) set INTERRUPTED and raise KeyboardInterrupt: the
    pipeline cleans up and writes no artifact."""

    def on_interrupt(signum: int, frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, on_interrupt)
        signal.signal(signal.SIGTERM, on_interrupt)


def _interrupted(as_json: bool) -> NoReturn:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message short
    console.print("[yellow]interrupted[/]: no artifact written")
    emit(as_json, "error", error="interrupted")
    # The pipeline's cleanup has run. Exit now rather than through the interpreter's shutdown: when
    # the interrupt passed through a C extension's PyRun_* call, CPython remembers it as unhandled
    # and, at shutdown, kills the process with SIGINT instead of exiting 130 (seen here in about 3 of
    # 8 interrupted runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _dry_run_text(loaded: LoadedRecipe, model: str | None) -> str:
    """The resolved recipe with the gate in force on every stage: the default gate for the model's
    task where the recipe names none (found without loading the model when possible)."""
    from optimize.evaluate.gate import default_gate
    from optimize.models.loading import peek_task

    recipe = loaded.recipe
    spec = model or recipe.model
    task = recipe.task or (peek_task(spec, loaded.base_dir) if spec else None)
    if task is not None:
        return loaded.with_default_gates(task, loaded.suite_metrics).text + _routes_text(loaded, spec, task)
    if all(stage.gate is not None for stage in recipe.stages):
        return loaded.text
    shown = {
        t: ", ".join(
            f"{c.metric} {'>=' if c.min is not None else '<='} {c.min if c.min is not None else c.max}"
            for c in default_gate(t)
        )
        for t in (tasks.EMBEDDING, tasks.GENERATION)
    }
    return (
        loaded.text + "# stages without `gate` get the default gate for the task found at run time: "
        f"embeddings {shown['feature-extraction']}; logits {shown['text-generation']}\n"
    )


def _routes_text(loaded: LoadedRecipe, spec: str | None, task: str) -> str:
    """The pre-flight's routes for the model's architecture, as YAML comments (empty where the model's
    config.json is not on this machine)."""
    from optimize.formats.table import FORMATS
    from optimize.models import routes
    from optimize.models.checkpoint import read_config
    from optimize.models.loading import peek_folder
    from optimize.stages.genai import GenAIStage

    folder = peek_folder(spec, loaded.base_dir) if spec else None
    if folder is None:
        return ""
    lines = routes.describe(read_config(folder), task, [stage.kind for stage in loaded.recipe.stages])
    for stage in loaded.recipe.stages:
        if isinstance(stage, GenAIStage):
            routed = {name: FORMATS[name].route(folder, stage.requested(name)) for name in stage.formats}
            lines += [f"  genai, format {name}: {route}" for name, route in routed.items()]
    return "# routes, " + "\n# ".join(lines) + "\n"


@app.command("run")
@with_run_flags
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/minilm-cpu.yaml.")],
    overrides: Annotated[list[str], typer.Option("--set", help="Override one key: --set stages.0.target=cpu.")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option("--model", help="Use this model instead of the recipe's.")] = None,
    resume: ResumeOpt = False,
    *,
    flags: RunFlags,
) -> None:
    """Run a whole recipe: reference, then each stage with its gate, then the artifact.

    Exits 0 with an artifact, 3 when a gate failed (no artifact), 2 on bad input.
    """
    from optimize.pipeline import recipe as recipes

    _execute(lambda: recipes.load(paths.named(recipe, "recipes"), overrides), flags, model=model, resume=resume)


def single_stage(
    kind: str,
    model: str,
    recipe: Path | None,
    settings: Mapping[str, object],
    extra: Mapping[str, object] | None = None,
) -> LoadedRecipe:
    """The one-stage recipe a single-stage command runs: the stage of that kind from -r RECIPE
    (or a default one) with the command's options on top, and the recipe's calibration and evals."""
    from optimize.pipeline import recipe as recipes

    data: recipes.RecipeData = {}
    if recipe is not None:
        recipe = paths.named(recipe, "recipes")
        data, _ = recipes.load_data(recipe)
    stages = data.get("stages")
    found = [s for s in stages if isinstance(s, dict) and s.get("kind") == kind] if isinstance(stages, list) else []
    stage: dict[str, object] = dict(found[0]) if found else {"kind": kind}
    stage.update({k: v for k, v in settings.items() if v is not None})
    name = data.get("name") or re.sub(r"[^\w.-]+", "-", f"{Path(model).name or 'model'}-{kind}").strip("-.")
    data = {**data, "name": name, "model": model, "stages": [stage]}
    for key, value in (extra or {}).items():
        if value is not None:
            recipes.apply_override(data, f"{key}={json.dumps(value)}")
    source = f"optimize {kind} {model}" + (f" -r {recipe}" if recipe else "")
    return recipes.validate(data, source, base_dir=recipe.resolve().parent if recipe else Path.cwd())


@app.command("quantize")
@with_run_flags
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, `package:NAME` or hub id.")],
    recipe: Annotated[
        Path | None,
        typer.Option(
            "-r", "--recipe", help="Take calibration, evals and the quantize stage (with its gate) from here."
        ),
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option("--calibration", help="Calibration texts: .jsonl/.csv/.txt/.parquet or a `datasets` folder."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="auto (search a mixed plan against the gate) | int8 | int4."),
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="Reuse a plan (a manifest.json or {layer: precision} JSON); skips the search."),
    ] = None,
    suites: SuiteOpt = [],  # noqa: B006
    gate: GateOpt = [],  # noqa: B006
    *,
    flags: RunFlags,
) -> None:
    """Quantize MODEL: measure the int8 formulations this CPU runs fastest (dynamic, fused, static,
    8-bit weights, OpenVINO's) against fp32, keep the fastest whose gate holds, one file per engine;
    where none holds, keep each layer's sensitivity in mind and choose the smallest, fastest mixed
    plan whose gate holds (export to ONNX is inserted first). `--precision int4` or `--plan` go
    straight to plans."""
    checks = [_parse_check(text) for text in gate]
    settings = {"precision": precision, "plan": str(plan.resolve()) if plan else None, "gate": checks or None}
    if recipe is None and plan is None and precision in (None, "auto", "int8"):
        # What the tool can do, by default: every int8 formulation for this CPU, measured against fp32,
        # then (precision auto) the mixed-plan search where none holds the gate.
        settings["formulations"] = "auto"
    extra = {"calibration.data": calibration, "evals": suites or None}
    _execute(lambda: single_stage("quantize", model, recipe, settings, extra), flags)


@app.command("distill")
@with_run_flags
def distill_cmd(
    teacher: Annotated[str, typer.Argument(help="Checkpoint folder, `package:NAME` or hub id: the model to shrink.")],
    recipe: Annotated[
        Path | None,
        typer.Option("-r", "--recipe", help="Take calibration, evals and the distill stage (with its gate) from here."),
    ] = None,
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="Training text file (repeatable): .txt/.jsonl/.csv/.parquet or a `datasets` folder."
        ),
    ] = [],  # noqa: B006
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Teacher layers to keep, e.g. 0,2,4, or how many (spread evenly), e.g. 3."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Optimizer steps (default: 3 passes over the data, 300 to 3000)."),
    ] = None,
    resume: ResumeOpt = False,
    suites: SuiteOpt = [],  # noqa: B006
    gate: GateOpt = [],  # noqa: B006
    *,
    flags: RunFlags,
) -> None:
    """Distill TEACHER into a student with fewer layers, trained to mimic it on unlabeled text, and gate
    the student against the teacher. Runs under `torchrun --nproc_per_node=N` as it is (DDP).

    Writes a checkpoint folder (safetensors, tokenizer, sentence-transformers files) that is also an
    artifact (model.onnx, runtime, manifest, report)."""
    checks = [_parse_check(text) for text in gate]
    settings = {
        "layers": _parse_layers(layers) if layers is not None else None,
        "steps": steps,
        "data": [{"path": spec} for spec in data] or None,
        "gate": checks or None,
    }
    _execute(
        lambda: single_stage("distill", teacher, recipe, settings, {"evals": suites or None}), flags, resume=resume
    )


def _parse_layers(text: str) -> int | list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give layer indices like 0,2,4 or a count like 3") from None
    if not values:
        raise typer.BadParameter("give layer indices like 0,2,4 or a count like 3")
    return values[0] if len(values) == 1 and "," not in text else values


def _parse_check(text: str) -> dict[str, str | float]:
    parts = text.replace("=", " ").split()
    if len(parts) != 3:
        raise typer.BadParameter(f"{text!r}: write METRIC BOUND VALUE, e.g. 'spearman max_drop 0.001'")
    try:
        return {"metric": parts[0], parts[1]: float(parts[2])}
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {parts[2]!r} is not a number") from None


@app.command("compile")
@with_run_flags
def compile_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, `package:NAME`, hub id, .onnx file or artifact.")],
    recipe: Annotated[Path | None, typer.Option("-r", "--recipe", help="Take calibration and gates from here.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="cpu (measured variants) | cuda | tensorrt.")] = None,
    variants: Annotated[
        list[str],
        typer.Option(
            "--variant",
            help="cpu: graph variant to measure (repeatable): as-is | basic | extended | fused. "
            "Default: all; pin one for byte-identical releases.",
        ),
    ] = [],  # noqa: B006
    *,
    flags: RunFlags,
) -> None:
    """Export MODEL to ONNX and optimize the graph for a target, gated like any stage."""
    settings = {"target": target, "variants": variants or None}
    _execute(lambda: single_stage("compile", model, recipe, settings), flags)


def main() -> None:
    """The console script. Usage errors (a bad flag or value, a missing argument) are exit 2 with
    the usual message on stderr and, under `--json`, the one JSON object on stdout as well."""
    # typer.BadParameter derives from click's UsageError and ClickException (vendored by newer typer).
    usage_error: ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    click_exception: ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        emit("--json" in sys.argv[1:], "error", error=exc.format_message())
        sys.exit(2)
    except click_exception as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
