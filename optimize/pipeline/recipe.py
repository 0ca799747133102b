"""Recipes: the YAML that describes a whole pipeline, validated completely before any weights load.

Loading does four things in order: parse the YAML (keeping line numbers), merge `extends` bases,
apply `--set key=value` overrides, and validate against the frozen pydantic schema below. Every
problem becomes one `UsageError` whose lines read `file:line: key: message`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optimize import metrics, paths
from optimize.data import Format
from optimize.errors import UsageError
from optimize.evaluate.suites import SUITE_TASKS, read_suite
from optimize.stages import Stage
from optimize.tasks import Task


class Calibration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field("calibration/default.jsonl", description="SPEC: a file, a `datasets` folder or a hub id")
    format: Format = "auto"
    columns: list[str] = Field(default_factory=list, description="text columns to take (default: the text one)")
    samples: int = Field(256, gt=0, description="texts used to calibrate")
    seq_len: int = Field(128, gt=0, le=8192, description="tokens per text; longer texts are truncated")
    holdout: int = Field(64, gt=0, description="texts kept out of calibration to measure fidelity")


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    model: str | None = None
    task: Task | None = None
    seed: int = 0
    calibration: Calibration = Calibration()
    evals: list[str] = []
    stages: list[Stage] = Field(min_length=1)

    @property
    def target(self) -> str:
        """What the recipe compiles for: the compile stage's target, else cpu."""
        return next((getattr(s, "target", "cpu") for s in self.stages if s.kind in ("compile", "genai")), "cpu")


Problem = tuple[tuple[str | int, ...], str]  # (key path in the recipe, message)


def problems(recipe: Recipe, base_dir: Path) -> list[Problem]:
    """What the schema alone cannot see, found before any model loads: stage order, what a stage
    kind refuses for this recipe's target, and gates on metrics that nothing in the recipe measures."""
    found: list[Problem] = []
    stages = recipe.stages
    for i in range(1, len(stages)):
        before, stage = stages[i - 1], stages[i]
        if stage.order < before.order or (type(stage) is type(before) and not stage.repeatable):
            found.append(
                (
                    ("stages", i, "kind"),
                    f"{stage.kind} cannot follow {before.kind}; stages run in the order distill, quantize, compile",
                )
            )
    for i, stage in enumerate(stages):
        found += [(("stages", i, *loc), message) for loc, message in stage.problems(recipe.target)]
    suite_metrics = []
    for j, name in enumerate(recipe.evals):
        try:
            suite_metrics.append(SUITE_TASKS[read_suite(paths.named(name, "evals", base_dir)).task].metric)
        except UsageError as exc:
            found.append((("evals", j), str(exc)))
    measured = metrics.measured(recipe.task, suite_metrics)
    for i, stage in enumerate(stages):
        for j, check in enumerate(stage.gate or []):
            if check.metric not in measured:
                source = metrics.METRICS[check.metric].source
                fix = (
                    "add an eval suite of task "
                    + " or ".join(t.name for t in SUITE_TASKS.values() if t.metric == check.metric)
                    + " under `evals:`"
                    if source == "suite"
                    else "it is not measured for this task"
                )
                found.append(
                    (
                        ("stages", i, "gate", j, "metric"),
                        f"{check.metric} is not measured by this recipe "
                        f"(measured: {', '.join(sorted(measured))}); {fix}",
                    )
                )
    return found


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    base_dir: Path  # relative paths in the recipe resolve against this folder first
    source: str  # the recipe file, or a description of the command that built it

    @property
    def text(self) -> str:
        """The resolved recipe as YAML: what `--dry-run` prints and the manifest records."""
        return yaml.safe_dump(self.recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @property
    def suite_metrics(self) -> list[str]:
        """The metric each of the recipe's eval suites yields, read from their settings (no data)."""
        return [SUITE_TASKS[read_suite(paths.named(n, "evals", self.base_dir)).task].metric for n in self.recipe.evals]

    def with_default_gates(self, task: str, suite_metrics: list[str]) -> LoadedRecipe:
        """The recipe with each stage's default gate for a model of `task` in a recipe whose suites
        yield `suite_metrics` (`StageBase.default_gate`) written into every stage that gives none
        (`gate: []` stays empty), so what `--dry-run` prints and the manifest records is the gate in force."""
        stages = [
            s if s.gate is not None else s.model_copy(update={"gate": s.default_gate(task, suite_metrics)})
            for s in self.recipe.stages
        ]
        return dataclasses.replace(self, recipe=self.recipe.model_copy(update={"stages": stages}))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


# A recipe as YAML gives it, before validation; each file with its node tree (for line numbers);
# a key path as pydantic reports it (union tags included).
RecipeData: TypeAlias = dict[str, object]
Tree: TypeAlias = tuple[Path, "yaml.Node | None"]
Loc: TypeAlias = tuple[str | int, ...]


def _read_yaml(path: Path) -> tuple[RecipeData, yaml.Node | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read recipe ({exc})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise UsageError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise UsageError(f"{path}:1: a recipe is a mapping of keys (version, name, model, stages, ...)")
    return data, node


def _merge(base: object, override: object) -> object:
    """Mappings merge key by key; anything else (lists included) is replaced by the override."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return copy.deepcopy(override)


def load_data(path: Path, seen: tuple[Path, ...] = ()) -> tuple[RecipeData, list[Tree]]:
    """Returns the merged data and, child first, each file with its YAML node tree for line lookup."""
    path = path.resolve()
    if path in seen:
        raise UsageError(f"{path}: `extends` forms a cycle ({' -> '.join(p.name for p in (*seen, path))})")
    data, node = _read_yaml(path)
    trees: list[Tree] = [(path, node)]
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, trees
    if not isinstance(base_name, str):
        raise UsageError(f"{path}:{_line(node, ('extends',))}: extends: give the path of a base recipe")
    base_path = path.parent / base_name
    base, base_trees = load_data(base_path, (*seen, path))
    return cast(RecipeData, _merge(base, data)), trees + base_trees  # two mappings merge into one


def _line(node: yaml.Node | None, loc: Loc) -> int | None:
    """Line of the deepest YAML node along `loc`; parts that are not in the YAML (union tags) are skipped."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key_node = next((k for k, v in node.value if k.value == part), None)
            if match is None or key_node is None:
                continue
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def apply_override(data: RecipeData, assignment: str) -> None:
    """Apply one `--set stages.1.precision=int8` in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {assignment!r}: write it as key.path=value, e.g. stages.0.target=cpu")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    target: object = data
    for i, part in enumerate(parts[:-1]):
        found, child = _child(target, part)
        if found:
            target = child
        elif isinstance(target, dict) and isinstance(part, str):
            target = target.setdefault(part, {})
        else:
            raise UsageError(f"--set {key}: {'.'.join(map(str, parts[: i + 1]))} does not exist")
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            raise UsageError(f"--set {key}: {last} is not an index of this list")
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise UsageError(f"--set {key}: {'.'.join(map(str, parts[:-1]))} is not a mapping")


def _child(node: object, part: str | int) -> tuple[bool, object]:
    """Whether a mapping has the key `part` (a list, the index), and the value there."""
    if isinstance(node, dict):
        return part in node, node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return True, node[part]
    return False, None


def _dotted(loc: Loc, data: object) -> str:
    """`('stages', 0, 'compile', 'targt')` -> `stages.0.targt`: drop the union tags pydantic adds."""
    parts: list[str] = []
    node = data
    for part in loc:
        found, child = _child(node, part)
        if found:
            node = child
        elif (
            isinstance(node, dict)
            and not isinstance(part, int)
            and parts
            and part not in node
            and isinstance(loc[-1], str)
            and part != loc[-1]
        ):
            continue
        parts.append(str(part))
    return ".".join(parts)


def validate(
    data: RecipeData,
    source: str,
    trees: list[Tree] | None = None,
    base_dir: Path | None = None,
    overrides: Sequence[str] = (),
) -> LoadedRecipe:
    """The schema, then `problems`; every error becomes one line `file:line: key: message` (or
    `--set KEY=VALUE: key: message` when an override put the value there)."""
    base_dir = base_dir or Path.cwd()
    found: list[Problem]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        found = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (check the spelling; `optimize recipe validate` lists the allowed keys)"
            found.append((tuple(error["loc"]), message))
    else:
        found = problems(recipe, base_dir)
    if not found:
        return LoadedRecipe(recipe, base_dir, source)
    lines = []
    for loc, message in found:
        key = _dotted(loc, data) or "(recipe)"
        where = source
        override = next((o for o in overrides if (key + ".").startswith(o.partition("=")[0] + ".")), None)
        for path, tree in [] if override else trees or []:
            line = _line(tree, loc)
            if line is not None:
                where = f"{path}:{line}"
                break
        lines.append(f"{f'--set {override}' if override else where}: {key}: {message}")
    raise UsageError("\n".join(dict.fromkeys(lines)))


def load(path: Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    data, trees = load_data(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data, str(path), trees, path.resolve().parent, overrides)
