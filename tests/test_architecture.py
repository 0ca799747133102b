"""The shape of the code: folders are layers (every import goes to its own layer or a lower one), no
import cycle, and a stage kind is one class plus one registry entry."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.models.handle import ModelHandle
from optimize.pipeline import recipe as recipes
from optimize.stages.base import StageBase, StageContext, StageResult
from optimize.stages.compile import CompileStage
from optimize.stages.quantize import QuantizeStage
from tests.conftest import write_recipe

PACKAGE = Path(__file__).resolve().parent.parent / "optimize"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The optimize modules `path` imports, at module level or inside functions alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optimize"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module (or package) itself
                found.add(node.module)
    # the package's own __init__ imports nothing; naming it (`from optimize import x`) is no edge
    return found - {"optimize", module_name(path)}


# Bottom to top: the shipped runtime (it imports nothing of ours), the base modules at the root, a
# model as input, a model as output for another engine, measuring, the stages, the artifact, the
# run, the command line. A module may import its own layer and the ones below it.
LAYERS = (
    ("runtime", ("optimize.runtime",)),
    ("base", ("optimize.errors", "optimize.tasks", "optimize.metrics", "optimize.data", "optimize.cpu")),
    ("base", ("optimize.paths", "optimize.records", "optimize.costs", "optimize")),
    ("models", ("optimize.models",)),
    ("formats", ("optimize.formats",)),
    ("evaluate", ("optimize.evaluate",)),
    ("stages", ("optimize.stages",)),
    ("artifact", ("optimize.artifact",)),
    ("pipeline", ("optimize.pipeline",)),
    ("cli", ("optimize.cli", "optimize.__main__")),
)
RANKS = {name: rank for rank, name in enumerate(dict.fromkeys(name for name, _ in LAYERS))}


def layer_of(module: str) -> str:
    """The layer of a module: the longest prefix listed (a package holds its modules)."""
    matches = [
        (len(p), name) for name, prefixes in LAYERS for p in prefixes if module == p or module.startswith(p + ".")
    ]
    assert matches, f"{module}: in no layer; add its package to LAYERS"
    return max(matches)[1]


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes to a higher layer, as `importer (layer) -> imported (layer)`."""
    return [
        f"{source} ({layer_of(source)}) -> {target} ({layer_of(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if RANKS[layer_of(target)] > RANKS[layer_of(source)]
    ]


def package_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_every_import_goes_to_its_own_layer_or_a_lower_one():
    graph = package_graph()
    assert graph["optimize.pipeline.run"] >= {"optimize.stages.base", "optimize.artifact.write"}  # the walk sees
    assert upward(graph) == []


def test_the_layer_check_finds_a_lower_layer_importing_a_higher_one():
    graph = package_graph()
    graph["optimize.models.loading"] = graph["optimize.models.loading"] | {"optimize.evaluate.measure"}
    graph["optimize.runtime.text"] = {"optimize.errors"}  # the shipped runtime may import nothing of ours
    assert upward(graph) == [
        "optimize.models.loading (models) -> optimize.evaluate.measure (evaluate)",
        "optimize.runtime.text (runtime) -> optimize.errors (base)",
    ]


def test_the_root_holds_the_packages_and_at_most_ten_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) <= 10, modules
    assert set(packages) == {name for name, _ in LAYERS} - {"base"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = package_graph()
    assert graph["optimize.pipeline.prepare"] >= {
        "optimize.pipeline.recipe",
        "optimize.evaluate.measure",
    }  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


class ToyStage(StageBase):
    """A stage as CONTRIBUTING.md shows it: recipe fields, its place in the order, and run()."""

    order: ClassVar[int] = 1
    kind: Literal["toy"] = "toy"
    note: str = "hello"

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        assert model.onnx_path is not None  # needs_onnx: the pipeline exported first
        out = ctx.workdir / "model.onnx"
        shutil.copyfile(model.onnx_path, out)
        return StageResult(model.with_onnx(out), {"note": self.note})


def test_a_toy_stage_registered_in_the_union_runs_through_the_pipeline(tiny_bert, tmp_path, monkeypatch):
    class ToyRecipe(recipes.Recipe):  # the one registry line, `Stage = ... | ToyStage`, made in a test
        stages: list[Annotated[QuantizeStage | CompileStage | ToyStage, Field(discriminator="kind")]] = Field(
            min_length=1
        )

    monkeypatch.setattr(recipes, "Recipe", ToyRecipe)
    recipe = write_recipe(tmp_path, [{"kind": "toy", "note": "from the recipe"}], model=str(tiny_bert))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [s["kind"] for s in stages] == ["export", "toy"]
    assert stages[1]["gate"]["source"] == "default" and stages[1]["gate"]["passed"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stages"][1]["details"]["note"] == "from the recipe"
    # its order is declared on the class: a toy stage after compile is refused at validation
    late = write_recipe(tmp_path, [{"kind": "compile"}, {"kind": "toy"}], model=str(tiny_bert), name="late")
    refused = CliRunner().invoke(app, ["recipe", "validate", str(late)])
    assert refused.exit_code == 2 and "toy cannot follow compile" in refused.stderr
