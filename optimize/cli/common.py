"""What every `optimize` command shares: the stderr console, the option types, and the one JSON
object `--json` prints (DESIGN.md), in every outcome."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from optimize.errors import UsageError
from optimize.runtime.untyped import Json

if TYPE_CHECKING:
    from optimize.records import StageRecord

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
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Run even when the estimated peak memory is more than this machine has."),
]


@dataclass(frozen=True, kw_only=True)
class RunFlags:
    """The options every command that runs a recipe (run, quantize, distill, compile) takes."""

    out: OutOpt = None
    as_json: JsonOpt = False
    cache_dir: CacheOpt = None
    no_cache: NoCacheOpt = False
    dry_run: DryRunOpt = False
    allow_pickle: PickleOpt = False
    trust_remote_code: RemoteOpt = False
    overwrite: OverwriteOpt = False
    force: ForceOpt = False


def with_run_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the `RunFlags` options: typer sees them as options after the command's own,
    and the command receives them as one keyword argument, `flags`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
    options = typing.get_type_hints(RunFlags, include_extras=True)  # each field's typer option
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=options[f.name])
        for f in dataclasses.fields(RunFlags)
    ]

    @functools.wraps(command)
    def with_flags(**options: object) -> None:
        given: Json = {f.name: options.pop(f.name) for f in dataclasses.fields(RunFlags)}  # typer checked them
        flags = RunFlags(**given)
        command(**options, flags=flags)

    with_flags.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    with_flags.__annotations__ = {p.name: p.annotation for p in (*own, *shared)}
    return with_flags


def emit(
    as_json: bool,
    status: str,
    artifact: Path | None = None,
    stages: list[StageRecord] | None = None,
    error: str | None = None,
    **extra: object,
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


def measure_command(as_json: bool, work: Callable[[], Json]) -> None:
    """Shared by `eval` and `bench`: bad input is exit 2 with one message; the JSON has status and error."""
    try:
        result = work()
    except UsageError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        emit(as_json, "error", error=str(exc))
        raise typer.Exit(exc.exit_code) from None
    emit(as_json, "passed", **result)


def metrics_table(title: str, columns: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for metric in dict.fromkeys(m for values in columns.values() for m in values):
        table.add_row(metric, *[f"{v[metric]:.6g}" if metric in v else "-" for v in columns.values()])
    console.print(table)
