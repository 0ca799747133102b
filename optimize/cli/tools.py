"""The commands around a run: measure a model (`eval`, `bench`), look into and package an artifact
(`inspect`, `package`), and the `recipe` and `cache` groups. `optimize.cli.commands` adds them to its app.
Heavy libraries are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.markup import escape

from optimize import paths
from optimize.cli.common import CacheOpt, JsonOpt, PickleOpt, RemoteOpt, console, emit, measure_command, metrics_table
from optimize.errors import UsageError
from optimize.runtime.untyped import Json

if TYPE_CHECKING:
    from optimize.pipeline.cache import StageCache

tools = typer.Typer()
recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)
cache_app = typer.Typer(help="See and free the stage cache (what reruns reuse).", no_args_is_help=True)


@tools.command("eval")
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

    def work() -> Json:
        from optimize.evaluate.measure import Evaluator
        from optimize.evaluate.suites import load_suite
        from optimize.models.loading import open_any

        loaded = [load_suite(paths.named(path, "evals")) for path in suites]
        handle = open_any(model, allow_pickle, trust_remote_code)
        texts = loaded[0].texts()[:512] if reference and not loaded[0].task.stream else []
        against = open_any(reference, allow_pickle, trust_remote_code) if reference else None
        evaluator = Evaluator(texts, None, loaded, seq_len=seq_len, reference=against)
        result: Json = {"model": model, "reference": None, "suites": [s.suite.name for s in loaded]}
        columns = {}
        if against is not None:
            ref_metrics, _ = evaluator.measure(against)
            result["reference"] = {"model": reference, "metrics": ref_metrics}
            columns["reference"] = ref_metrics
        result["metrics"], details = evaluator.measure(handle)
        result["provider"] = details["provider"]
        columns[Path(model).name or model] = result["metrics"]
        metrics_table("eval: " + ", ".join(result["suites"]), columns)
        return result

    measure_command(as_json, work)


@tools.command("bench")
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

    def work() -> Json:
        from optimize.evaluate.measure import bench
        from optimize.models.loading import open_any

        result = bench(open_any(model, allow_pickle, trust_remote_code), batch_size, seq_len, warmup, runs)
        threads = result["conditions"]["threads"]
        metrics_table(f"bench: batch {batch_size}, seq_len {seq_len}, {threads} threads", {"value": result["metrics"]})
        return {"model": model, **result}

    measure_command(as_json, work)


@tools.command("inspect")
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
    from optimize import runtime
    from optimize.artifact import write as artifacts
    from optimize.artifact.report import decisions_table, print_stage
    from optimize.records import StageRecord

    try:
        if artifact.is_file() and artifact.name.endswith((".tar.gz", ".tgz", ".tar")):
            artifact = artifacts.extract(artifact, unpacked)
        manifest = runtime.verify(artifact)
        try:
            stages = [StageRecord.of(stage) for stage in manifest["stages"]]
            provenance, reference = manifest["provenance"], manifest["reference"]["metrics"]
            source, digest, versions = provenance["source"], provenance["source_sha256"], dict(provenance["versions"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(
                f"{artifact / 'manifest.json'}: a field inspect reads is missing or malformed ({exc})"
            ) from None
    except (runtime.ArtifactError, UsageError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        emit(as_json, "error", error=str(exc))
        raise typer.Exit(2) from None
    if as_json:
        emit(True, "passed", artifact, stages, manifest=manifest)
        return
    console.print(f"[bold]{manifest['name']}[/] ({manifest.get('task')}), {len(manifest['files'])} files verified")
    console.print(f"source: {source} (sha256 {str(digest)[:12]})")
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    engines = manifest.get("engines", [])
    if engines:  # fastest first: the runtime opens the first whose library is installed
        console.print("files per engine: " + ", ".join(f"{e['engine']} {e['file']}" for e in engines))
    for stage in stages:
        print_stage(console, stage, reference)
        choices = decisions_table(stage)
        if choices is not None:
            console.print(choices)


@tools.command("package")
def package_cmd(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder written by optimize.")],
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="The archive or repository (default: ARTIFACT.tar.gz, ARTIFACT-triton)."),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="tar: a deterministic .tar.gz; triton: a Triton Inference Server model repository (encoders).",
        ),
    ] = "tar",
    as_json: JsonOpt = False,
) -> None:
    """Verify an artifact and pack it as a deterministic .tar.gz (sorted, fixed times and owners):
    the same artifact gives the same archive bytes, for release checksums. `--format triton` writes
    a Triton model repository instead (config.pbtxt checked against Triton's schema and the graph)."""
    from optimize import runtime
    from optimize.artifact import write as artifacts

    if fmt == "triton":
        _triton(artifact, out or artifact.with_name(artifact.name + "-triton"), as_json)
        return
    if fmt != "tar":
        console.print(f"[red]error:[/] --format {fmt}: one of tar, triton", highlight=False)
        emit(as_json, "error", error=f"--format {fmt}: one of tar, triton")
        raise typer.Exit(2)
    archive = out or artifact.with_name(artifact.name + ".tar.gz")
    try:
        runtime.verify(artifact)
        if not archive.parent.is_dir():
            raise UsageError(f"{archive.parent}: no such folder for the archive")
        artifacts.package(artifact, archive)
    except (runtime.ArtifactError, UsageError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        emit(as_json, "error", error=str(exc))
        raise typer.Exit(2) from None
    console.print(f"packaged {artifact} as {archive} (sha256 {runtime.sha256_file(archive)})", highlight=False)
    emit(as_json, "passed", artifact, archive=str(archive), sha256=runtime.sha256_file(archive))


def _triton(artifact: Path, out: Path, as_json: bool) -> None:
    from optimize import runtime
    from optimize.artifact import triton

    try:
        model_dir = triton.write(artifact, out)
    except (runtime.ArtifactError, UsageError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        emit(as_json, "error", error=str(exc))
        raise typer.Exit(2) from None
    console.print(f"Triton model repository at {out} (model {model_dir.name})", highlight=False)
    emit(as_json, "passed", artifact, repository=str(out), model=model_dir.name)


def _stage_cache(cache_dir: Path | None) -> StageCache:
    from optimize.pipeline import cache

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
    emit(as_json, "passed", entries=entries, root=str(store.root))


@cache_app.command("clear")
def cache_clear_cmd(cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """Remove every cached step and GGUF conversion (a later run recomputes what it needs)."""
    from optimize.models.handle import cache_root
    from optimize.pipeline import cache

    root = cache_dir or cache_root()
    freed = cache.clear_all(root)
    console.print(f"cleared {root}: {freed / 1e6:.1f} MB freed", highlight=False)
    emit(as_json, "passed", root=str(root), freed_mb=round(freed / 1e6, 3))


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
    emit(as_json, "passed", recipes=found["recipes"], evals=found["evals"])


@recipe_app.command("validate")
def validate_cmd(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")], as_json: JsonOpt = False
) -> None:
    """Check recipes without loading any model; exit 2 naming file, line and key on the first problem."""
    from optimize.pipeline import recipe as recipes

    errors = []
    for path in files:
        try:
            recipes.load(paths.named(path, "recipes"))
            console.print(f"[green]ok[/] {path}")
        except UsageError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            errors.append(str(exc))
    emit(as_json, "error" if errors else "passed", error="; ".join(errors) or None, files=[str(f) for f in files])
    if errors:
        raise typer.Exit(2)
