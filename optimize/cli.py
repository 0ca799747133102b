"""The `optimize` command line: thin commands that build a recipe and hand it to the pipeline.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the commands, so `--help`
is instant. Exit codes (DESIGN.md): 0 done, 2 bad input, 3 a gate failed, 1 a bug.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console

from optimize import paths, tasks
from optimize.errors import INTERRUPTED, GateFailed, UsageError

if TYPE_CHECKING:
    from optimize.recipe import LoadedRecipe
    from optimize.records import StageRecord

app = typer.Typer(
    name="optimize",
    help="Take a trained checkpoint to a smaller, faster release artifact, with gates that prove quality held.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
cache_app = typer.Typer(help="See and free the stage cache (what reruns reuse).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

console = Console(stderr=True, soft_wrap=True)  # messages stay on one line, for grep and CI logs

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout; logs go to stderr.")]
OutOpt = Annotated[Path | None, typer.Option("-o", "--out", help="Artifact folder (default: artifacts/NAME).")]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="The cache folder: steps in stages/, GGUF conversions in gguf/ "
        "(default: $OPTIMIZE_CACHE_DIR, else ~/.cache/optimize).",
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        envvar="OPTIMIZE_NO_CACHE",
        help="Run every step: read nothing from the cache folder and store nothing in it.",
    ),
]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Load pickled (.bin) weights; they can run code.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run model code shipped with the checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the run passed).")]
SuiteOpt = Annotated[
    list[str], typer.Option("--suite", help="Eval suite the gate may use (repeatable), e.g. evals/stsb-test.yaml.")
]
GateOpt = Annotated[
    list[str],
    typer.Option(
        "--gate",
        help="A gate check (repeatable), e.g. 'spearman max_drop 0.001'; replaces the default fidelity gate.",
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue training from the checkpoints an unfinished run left beside OUT.")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")]


def _emit(
    as_json: bool,
    status: str,
    artifact: Path | None = None,
    stages: list[StageRecord] | None = None,
    error: str | None = None,
    **extra: Any,
) -> None:
    """`--json`: the one object every command prints on stdout, in every outcome (README, "JSON")."""
    if as_json:
        print(
            json.dumps(
                {
                    "status": status,
                    "artifact": str(artifact) if artifact else None,
                    "stages": [s.public() for s in stages or []],
                    "error": error,
                    **extra,
                },
                indent=2,
            )
        )


def _execute(
    build: Callable[[], LoadedRecipe],
    out: Path | None,
    as_json: bool,
    dry_run: bool = False,
    *,
    model: str | None = None,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> None:
    """Validate the recipe, run the pipeline, print the outcome and exit with DESIGN.md's code."""
    from optimize.training import is_main

    # Libraries (onnxruntime.quantization, optimum) log advice for every call; the run has its own report.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")

    def on_interrupt(signum: int, frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, on_interrupt)
        signal.signal(signal.SIGTERM, on_interrupt)  # a CI job cancelled: the same clean stop as Ctrl-C
    # Under torchrun, rank 0 speaks for the run; the other ranks only train beside it.
    run_console = console if is_main() else Console(stderr=True, quiet=True)
    try:
        loaded = build()
        if dry_run:
            text = _dry_run_text(loaded, model)
            if as_json:
                _emit(True, "dry_run", recipe=yaml.safe_load(text))
            else:
                print(text, end="")
            raise typer.Exit(0)
        from optimize.pipeline import RunOptions, run

        options = RunOptions(
            out=out or Path("artifacts") / loaded.recipe.name,
            model=model,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            no_cache=no_cache,
            overwrite=overwrite,
            resume=resume,
        )
        result = run(loaded, options, run_console)
    except UsageError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        _emit(as_json, "error", error=str(exc))
        raise typer.Exit(exc.exit_code) from None
    except GateFailed as exc:
        console.print(f"[red]gate failed:[/] {exc}", highlight=False)
        _emit(as_json, "gate_failed", None, exc.stages, str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message short
        console.print("[yellow]interrupted[/]: no artifact written")
        _emit(as_json, "error", error="interrupted")
        # The pipeline's cleanup has run. Exit now rather than through the interpreter's shutdown:
        # when the interrupt passed through a C extension's PyRun_* call, CPython remembers it as
        # unhandled and, at shutdown, kills the process with SIGINT instead of exiting 130 (seen
        # here in about 3 of 8 interrupted runs).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if result.status == "worker":
        return
    console.print(f"[green]passed[/]: artifact at {result.artifact}")
    _emit(as_json, result.status, result.artifact, result.stages, None)


def _dry_run_text(loaded: LoadedRecipe, model: str | None) -> str:
    """The resolved recipe with the gate in force on every stage: the default gate for the model's
    task where the recipe names none (found without loading the model when possible)."""
    from optimize.gate import default_gate
    from optimize.model import peek_task

    recipe = loaded.recipe
    spec = model or recipe.model
    task = recipe.task or (peek_task(spec, loaded.base_dir) if spec else None)
    if task is not None:
        return loaded.with_default_gates(task).text
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


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/minilm-cpu.yaml.")],
    out: OutOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    overrides: Annotated[list[str], typer.Option("--set", help="Override one key: --set stages.0.target=cpu.")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option("--model", help="Use this model instead of the recipe's.")] = None,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Run a whole recipe: reference, then each stage with its gate, then the artifact.

    Exits 0 with an artifact, 3 when a gate failed (no artifact), 2 on bad input.
    """
    from optimize import recipe as recipes

    _execute(
        lambda: recipes.load(paths.named(recipe, "recipes"), overrides),
        out,
        as_json,
        dry_run,
        model=model,
        cache_dir=cache_dir,
        no_cache=no_cache,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        resume=resume,
    )


def single_stage(
    kind: str, model: str, recipe: Path | None, settings: dict[str, Any], extra: dict[str, Any] | None = None
) -> LoadedRecipe:
    """The one-stage recipe a single-stage command runs: the stage of that kind from -r RECIPE
    (or a default one) with the command's options on top, and the recipe's calibration and evals."""
    from optimize import recipe as recipes

    data: dict[str, Any] = {}
    if recipe is not None:
        recipe = paths.named(recipe, "recipes")
        data, _ = recipes.load_data(recipe)
    stage = next(
        (dict(s) for s in data.get("stages", []) if isinstance(s, dict) and s.get("kind") == kind), {"kind": kind}
    )
    stage.update({k: v for k, v in settings.items() if v is not None})
    name = data.get("name") or re.sub(r"[^\w.-]+", "-", f"{Path(model).name or 'model'}-{kind}").strip("-.")
    data = {**data, "name": name, "model": model, "stages": [stage]}
    for key, value in (extra or {}).items():
        if value is not None:
            recipes.apply_override(data, f"{key}={json.dumps(value)}")
    source = f"optimize {kind} {model}" + (f" -r {recipe}" if recipe else "")
    return recipes.validate(data, source, base_dir=recipe.resolve().parent if recipe else Path.cwd())


@app.command("quantize")
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
    out: OutOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Quantize MODEL: measure each layer's sensitivity on calibration data, then choose the smallest,
    fastest precision plan whose gate holds (export to ONNX is inserted first)."""
    checks = [_parse_check(text) for text in gate]
    settings = {"precision": precision, "plan": str(plan.resolve()) if plan else None, "gate": checks or None}
    extra = {"calibration.data": calibration, "evals": suites or None}
    _execute(
        lambda: single_stage("quantize", model, recipe, settings, extra),
        out,
        as_json,
        dry_run,
        cache_dir=cache_dir,
        no_cache=no_cache,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )


@app.command("distill")
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
    out: OutOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
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
        lambda: single_stage("distill", teacher, recipe, settings, {"evals": suites or None}),
        out,
        as_json,
        dry_run,
        cache_dir=cache_dir,
        no_cache=no_cache,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        resume=resume,
    )


def _parse_layers(text: str) -> int | list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give layer indices like 0,2,4 or a count like 3") from None
    if not values:
        raise typer.BadParameter("give layer indices like 0,2,4 or a count like 3")
    return values[0] if len(values) == 1 and "," not in text else values


def _parse_check(text: str) -> dict[str, Any]:
    parts = text.replace("=", " ").split()
    if len(parts) != 3:
        raise typer.BadParameter(f"{text!r}: write METRIC BOUND VALUE, e.g. 'spearman max_drop 0.001'")
    try:
        return {"metric": parts[0], parts[1]: float(parts[2])}
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {parts[2]!r} is not a number") from None


@app.command("compile")
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
    out: OutOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export MODEL to ONNX and optimize the graph for a target, gated like any stage."""
    settings = {"target": target, "variants": variants or None}
    _execute(
        lambda: single_stage("compile", model, recipe, settings),
        out,
        as_json,
        dry_run,
        cache_dir=cache_dir,
        no_cache=no_cache,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )


def _measure_command(as_json: bool, work: Callable[[], dict[str, Any]]) -> None:
    """Shared by `eval` and `bench`: bad input is exit 2 with one message; the JSON has status and error."""
    try:
        result = work()
    except UsageError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        _emit(as_json, "error", error=str(exc))
        raise typer.Exit(exc.exit_code) from None
    _emit(as_json, "passed", **result)


def _metrics_table(title: str, columns: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for metric in dict.fromkeys(m for values in columns.values() for m in values):
        table.add_row(metric, *[f"{v[metric]:.6g}" if metric in v else "-" for v in columns.values()])
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, .onnx file or artifact folder.")],
    suites: Annotated[
        list[Path], typer.Option("--suite", help="Eval suite YAML (repeatable), e.g. evals/stsb-test.yaml.")
    ],
    reference: Annotated[str | None, typer.Option("--reference", help="Also measure this model and compare.")] = None,
    as_json: JsonOpt = False,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per text; longer texts are truncated.")] = 128,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Measure task quality (spearman, accuracy, perplexity) of MODEL on eval suites, in the runtime
    it would ship with (onnxruntime for ONNX, torch for checkpoints). With --reference, fidelity
    (cosine_mean, cosine_min) against the reference on the suites' texts is measured too."""

    def work() -> dict[str, Any]:
        from optimize.evaluate import Evaluator
        from optimize.model import open_any
        from optimize.suites import load_suite

        loaded = [load_suite(paths.named(path, "evals")) for path in suites]
        handle = open_any(model, allow_pickle, trust_remote_code)
        texts = loaded[0].texts()[:512] if reference and not loaded[0].task.stream else []
        against = open_any(reference, allow_pickle, trust_remote_code) if reference else None
        evaluator = Evaluator(texts, None, loaded, seq_len=seq_len, reference=against)
        result: dict[str, Any] = {"model": model, "reference": None, "suites": [s.suite.name for s in loaded]}
        columns = {}
        if against is not None:
            ref_metrics, _ = evaluator.measure(against)
            result["reference"] = {"model": reference, "metrics": ref_metrics}
            columns["reference"] = ref_metrics
        result["metrics"], details = evaluator.measure(handle)
        result["provider"] = details["provider"]
        columns[Path(model).name or model] = result["metrics"]
        _metrics_table("eval: " + ", ".join(result["suites"]), columns)
        return result

    _measure_command(as_json, work)


@app.command("bench")
def bench_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, .onnx file or artifact folder.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per call.")] = 1,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=1, help="Every text padded or cut to this many tokens.")
    ] = 128,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed calls after the warm-up.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed calls first.")] = 10,
    as_json: JsonOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Time MODEL on real sentences (shipped calibration texts) at a fixed batch size and sequence
    length: latency percentiles, throughput, size and peak memory, with the thread count and spread."""

    def work() -> dict[str, Any]:
        from optimize.evaluate import bench
        from optimize.model import open_any

        result = bench(open_any(model, allow_pickle, trust_remote_code), batch_size, seq_len, warmup, runs)
        threads = result["conditions"]["threads"]
        _metrics_table(f"bench: batch {batch_size}, seq_len {seq_len}, {threads} threads", {"value": result["metrics"]})
        return {"model": model, **result}

    _measure_command(as_json, work)


@app.command("inspect")
def inspect_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by optimize, or its .tar.gz.")],
    as_json: JsonOpt = False,
) -> None:
    """Verify an artifact's files against its manifest and summarize it (an archive is checked
    member by member and unpacked into a temporary folder first)."""
    import tempfile

    unpacked = Path(tempfile.mkdtemp(prefix="optimize-inspect-"))
    try:
        _inspect(artifact, unpacked, as_json)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def _inspect(artifact: Path, unpacked: Path, as_json: bool) -> None:
    from optimize import artifact as artifacts
    from optimize import runtime
    from optimize.records import StageRecord
    from optimize.report import decisions_table, print_stage

    try:
        if artifact.is_file() and artifact.name.endswith((".tar.gz", ".tgz", ".tar")):
            artifact = artifacts.extract(artifact, unpacked)
        manifest = runtime.verify(artifact)
        try:
            stages = [StageRecord(**stage) for stage in manifest["stages"]]
            provenance, reference = manifest["provenance"], manifest["reference"]["metrics"]
            source, digest, versions = provenance["source"], provenance["source_sha256"], dict(provenance["versions"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(
                f"{artifact / 'manifest.json'}: a field inspect reads is missing or malformed ({exc})"
            ) from None
    except (runtime.ArtifactError, UsageError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        _emit(as_json, "error", error=str(exc))
        raise typer.Exit(2) from None
    if as_json:
        _emit(True, "passed", artifact, stages, manifest=manifest)
        return
    console.print(f"[bold]{manifest['name']}[/] ({manifest.get('task')}), {len(manifest['files'])} files verified")
    console.print(f"source: {source} (sha256 {str(digest)[:12]})")
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for stage in stages:
        print_stage(console, stage, reference)
        choices = decisions_table(stage)
        if choices is not None:
            console.print(choices)


@app.command("package")
def package_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by optimize.")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="The archive (default: ARTIFACT.tar.gz).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify an artifact and pack it as a deterministic .tar.gz (sorted, fixed times and owners):
    the same artifact gives the same archive bytes, for release checksums."""
    from optimize import artifact as artifacts
    from optimize import runtime

    archive = out or artifact.with_name(artifact.name + ".tar.gz")
    try:
        runtime.verify(artifact)
        if not archive.parent.is_dir():
            raise UsageError(f"{archive.parent}: no such folder for the archive")
        artifacts.package(artifact, archive)
    except (runtime.ArtifactError, UsageError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        _emit(as_json, "error", error=str(exc))
        raise typer.Exit(2) from None
    console.print(f"packaged {artifact} as {archive} (sha256 {runtime.sha256_file(archive)})", highlight=False)
    _emit(as_json, "passed", artifact, archive=str(archive), sha256=runtime.sha256_file(archive))


def _stage_cache(cache_dir: Path | None) -> Any:
    from optimize import cache

    return cache.StageCache(cache_dir / "stages" if cache_dir else cache.default_root())


@cache_app.command("list")
def cache_list_cmd(cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """The cached steps (reference, export, stages), newest first, with their size."""
    import time

    store = _stage_cache(cache_dir)
    entries = store.entries()
    if not as_json:
        for entry in entries:
            age = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(entry["created"])))
            console.print(f"{entry['key']}  {age}  {entry['size_mb']:>9.3f} MB  {entry['recipe']}: {entry['step']}")
        total = sum(float(e["size_mb"]) for e in entries)
        console.print(f"{len(entries)} entries, {total:.1f} MB in {store.root}", highlight=False)
    _emit(as_json, "passed", entries=entries, root=str(store.root))


@cache_app.command("clear")
def cache_clear_cmd(cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """Remove every cached step and GGUF conversion (a later run recomputes what it needs)."""
    from optimize import cache
    from optimize.model import cache_root

    root = cache_dir or cache_root()
    freed = cache.clear_all(root)
    console.print(f"cleared {root}: {freed / 1e6:.1f} MB freed", highlight=False)
    _emit(as_json, "passed", root=str(root), freed_mb=round(freed / 1e6, 3))


@recipe_app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """The recipes and eval suites that ship with optimize, by the names `run` and `--suite` take."""
    found: dict[str, list[dict[str, str]]] = {"recipes": [], "evals": []}
    for folder, items in found.items():
        for path in paths.shipped(folder):
            lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("# ")]
            about = " ".join(lines[:2]) if lines else str(yaml.safe_load(path.read_text()).get("name", ""))
            items.append({"name": path.stem, "path": str(path), "about": about})
            if not as_json:
                console.print(f"[bold]{folder[:-1]:7}[/] {path.stem:24} {about}", highlight=False)
    _emit(as_json, "passed", recipes=found["recipes"], evals=found["evals"])


@recipe_app.command("validate")
def validate_cmd(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")], as_json: JsonOpt = False
) -> None:
    """Check recipes without loading any model; exit 2 naming file, line and key on the first problem."""
    from optimize import recipe as recipes

    errors = []
    for path in files:
        try:
            recipes.load(paths.named(path, "recipes"))
            console.print(f"[green]ok[/] {path}")
        except UsageError as exc:
            console.print(f"[red]error:[/] {exc}", highlight=False)
            errors.append(str(exc))
    _emit(as_json, "error" if errors else "passed", error="; ".join(errors) or None, files=[str(f) for f in files])
    if errors:
        raise typer.Exit(2)


def main() -> None:
    """The console script. Usage errors (a bad flag or value, a missing argument) are exit 2 with
    the usual message on stderr and, under `--json`, the one JSON object on stdout as well."""
    # typer.BadParameter derives from click's UsageError and ClickException (vendored by newer typer).
    usage_error: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    click_exception: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        _emit("--json" in sys.argv[1:], "error", error=exc.format_message())
        sys.exit(2)
    except click_exception as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
