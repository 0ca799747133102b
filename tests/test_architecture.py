"""The shape of the code: no import cycle, and a stage kind is one class plus one registry entry."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field
from typer.testing import CliRunner

from optimize import recipe as recipes
from optimize.cli import app
from optimize.model import ModelHandle
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
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    # the package's own __init__ imports nothing; naming it (`from optimize import x`) is no edge
    return found - {"optimize", module_name(path)}


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
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    assert graph["optimize.prepare"] >= {"optimize.recipe", "optimize.evaluate"}  # the walk sees imports
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
