"""The manifest's shape (DESIGN.md, "Artifact layout"): `optimize` writes it, this runtime reads it.

The runtime ships without `optimize`, so the types live here and `optimize` imports them. Fields
the runtime reads are typed; what it carries for people (records, provenance) is JSON.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, TypedDict

# A JSON object whose shape belongs to the one who wrote it (a stage's decisions are read back as
# that stage's own TypedDict: `StageBase.choices`).
JsonObject: TypeAlias = dict[str, object]


class _Check(TypedDict):
    metric: str
    value: float | None
    op: str
    threshold: float | None
    passed: bool


class CheckResult(_Check, total=False):
    """One check's row (DESIGN.md, written by `optimize.evaluate.gate`); `reference` only where the
    bound is relative to it."""

    reference: float | None
    standard_error: float  # a perplexity's resolution on its tokens (paired with the reference's where relative)
    tokens: int  # how many tokens it was measured on


GateSource = Literal["recipe", "default", "ungated"]


class _Gate(TypedDict):
    passed: bool
    source: GateSource
    checks: list[CheckResult]


class GateResult(_Gate, total=False):
    """A stage's gate (DESIGN.md's object), where its checks came from, and the model its fidelity
    values were measured against (`against`, added by the pipeline)."""

    against: str


class CpuSummary(TypedDict):
    """The CPU an artifact's formulation or graph was chosen on (`optimize.cpu.Cpu.summary`)."""

    model: str
    machine: str
    flags: list[str]


class RuntimeSettings(TypedDict, total=False):
    """`runtime`: what the shipped runtime needs to open the model as it was measured."""

    target: str  # cpu | cuda | tensorrt
    seq_len: int
    task: str
    int8: bool  # some layer is int8 (TensorRT's int8 flag)
    fp16: bool  # cuda/tensorrt: float layers may run in fp16
    engine: str  # what runs model.onnx (runtime.ENGINES); the builder's engine for a decoder folder
    tuned_on: CpuSummary
    context_length: int | None
    generators: list[str]  # a decoder's engines, the fastest measured first (the runtime's `auto` order)


class EngineFile(TypedDict):
    """One file of the artifact for one engine (`engines`, fastest first): sentence-transformers'
    layout, `model.onnx` for onnxruntime and `openvino/openvino_model.xml` for OpenVINO."""

    engine: str  # runtime.ENGINES
    file: str
    metrics: dict[str, float]  # measured through this engine, as the stages' metrics are
    gate: GateResult  # the last stage's gate


class FileEntry(TypedDict):
    sha256: str
    bytes: int


class StageJson(TypedDict):
    """One stage as the manifest records it (`optimize.records.StageRecord`)."""

    name: str
    kind: str
    config: JsonObject  # the stage's recipe fields
    metrics: dict[str, float]
    gate: GateResult
    details: JsonObject  # what the stage decided (its kind reads it back: `choices`); speed spread


class Reference(TypedDict):
    metrics: dict[str, float]
    details: JsonObject
    conditions: JsonObject  # threads, batch size, sequence length, runs


class Provenance(TypedDict):
    source: str  # the model as the user named it
    source_sha256: str
    recipe: str  # the recipe's text
    recipe_sha256: str
    seed: int
    calibration: JsonObject
    data: list[JsonObject]  # each data set read: source, rows, sha256
    versions: dict[str, str]


class Manifest(TypedDict, total=False):
    schema_version: int
    name: str
    task: str
    provenance: Provenance
    reference: Reference
    stages: list[StageJson]
    precision_plan: dict[str, str]  # layer -> int8 | int4 | fp32
    runtime: RuntimeSettings
    engines: list[EngineFile]  # the runtime opens the first whose library is installed
    costs: list[JsonObject]  # each step's seconds and peak memory; moved to measurements.json on writing
    files: dict[str, FileEntry]  # every file but the measurements, hashed
    measurement_files: list[str]
