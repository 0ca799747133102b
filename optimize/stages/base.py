"""What every stage shares: its recipe fields (a name and a gate), what it is handed at run time,
and what it returns.

A stage holds parameters, not state: `run(config, model, ctx)` takes a model handle and returns a
`StageResult` holding the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from optimize.evaluate.gate import GateCheck, default_gate
from optimize.models.handle import ModelHandle
from optimize.runtime.manifest import GateResult, JsonObject, RuntimeSettings


class StageBase(BaseModel):
    """A stage's recipe fields. A kind declares where it may stand and what it takes; `run` does it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order: ClassVar[int]  # stages run in this order: distill 0, quantize 1, compile 2
    repeatable: ClassVar[bool] = True  # may the same kind follow itself (quantize twice: yes)
    needs_onnx: ClassVar[bool] = True  # the pipeline inserts an export before a stage that needs ONNX
    # A stage that rewrites one engine's graph and leaves the weights alone (compile) keeps the
    # other engines' files an earlier stage chose; any other stage's model replaces them.
    keeps_alternates: ClassVar[bool] = False

    kind: str  # the registry's discriminator: a Literal in each kind
    name: str | None = None
    gate: list[GateCheck] | None = Field(
        None,
        description="checks the stage's output must hold; omitted: the default fidelity gate for "
        "the task; []: ungated (reported as such)",
    )

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        raise NotImplementedError(f"stage kind {type(self).__name__} has no run()")

    def default_gate(self, task: str, suite_metrics: Sequence[str]) -> list[GateCheck]:
        """The gate this stage gets when its recipe names none, for a model of `task` in a recipe
        whose eval suites yield `suite_metrics`: fidelity to the stage's input model."""
        return default_gate(task)

    @classmethod
    def choices(cls, details: JsonObject) -> list[Choice]:
        """What a run of this kind chose among, read from the decisions its `run` recorded: what
        `optimize inspect` lists and report.html plots (none for a kind that searches nothing).
        Each kind reads `details` as the decisions TypedDict its `run` writes."""
        return []

    def peak_memory(self) -> tuple[float, float] | None:
        """The measured whole-process peak RSS of a run with this stage, as (MB, MB per MB of the
        checkpoint at 2 bytes a weight): `memory.check` refuses a run that cannot fit before
        anything loads. None: not measured."""
        return None

    def scratch_disk(self) -> float | None:
        """The measured size of what this stage writes in the run's scratch folder, in MB per MB of
        the checkpoint at 2 bytes a weight: `memory.check_disk` refuses a run that cannot fit there.
        None: not measured."""
        return None

    def lower_memory(self) -> str:
        """What in this stage's config would need less memory, said when a run is refused ('': nothing)."""
        return ""

    def check_input(self, model: ModelHandle, base_dir: Path, calibration: Sequence[str] = ()) -> None:
        """Raise `UsageError` for what this stage cannot do with the recipe's model (read from its
        config, no weights loaded): called before the reference is measured."""

    def problems(self, target: str) -> list[tuple[tuple[str | int, ...], str]]:
        """Recipe-level problems only this kind knows of (key path within the stage, message), given
        the recipe's compile target; found by validation, before any model loads."""
        return []


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One candidate a stage chose among, as the reports show it."""

    label: str
    outcome: str  # what it measured, in words
    passed: bool  # held the gate (or agreed with its input), and built
    chosen: bool
    latency_ms: float | None = None  # batch 1, where it was timed
    fidelity: float | None = None  # cosine against the reference (or the input model), where measured


@dataclass(frozen=True)
class StageContext:
    """Run-time inputs a stage may use; built once by the pipeline, never mutated."""

    workdir: Path  # a private scratch folder for this stage, removed with the run
    calibration_texts: tuple[str, ...]
    seq_len: int
    seed: int
    # Full evaluation of a candidate against this stage's gate: (metrics, gate result).
    judge: Callable[[ModelHandle], tuple[dict[str, float], GateResult]]
    # Cheap fidelity probe on the held-out texts (cosine_mean, cosine_min vs the reference).
    probe: Callable[[ModelHandle], dict[str, float]]
    console: Console  # progress and tables (stderr: stdout is kept for --json)
    base_dir: Path = Path()  # relative data paths in the recipe resolve against this folder first
    checkpoints: Path | None = None  # where a training stage keeps checkpoints a rerun resumes
    resume: bool = False  # continue from those checkpoints (--resume)


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: the new model, and what it decided, for the manifest and the report."""

    model: ModelHandle
    decisions: Mapping[str, object] = field(default_factory=dict)  # the kind's decisions TypedDict
    precision_plan: dict[str, str] = field(default_factory=dict)  # layer -> int8 | int4 | fp32
    runtime: RuntimeSettings = field(default_factory=lambda: RuntimeSettings())  # what the shipped runtime needs
    advice: str | None = None  # what to change in the recipe if this stage's gate fails
    # The fastest model for each other engine family (`runtime.family`): files the artifact ships beside
    # the stage's model, e.g. {"openvino": ...} when onnxruntime's int8 graph was the fastest.
    alternates: Mapping[str, ModelHandle] = field(default_factory=dict)
    # What this stage's judge measured of an alternate (its metrics and gate), so the run does not
    # measure it again when this is the last stage.
    judged: Mapping[str, tuple[dict[str, float], GateResult]] = field(default_factory=dict)
