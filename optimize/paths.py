"""Where files named in recipes and suites are found: the one resolver for data paths.

A recipe names calibration files and eval suites by relative path; they are looked for beside the
recipe, in the working folder, in this source checkout, then among the files shipped inside the
wheel (`optimize/_shipped`). Data (calibration, training text, an eval suite's data set) is also
looked for under `$OPTIMIZE_DATA_ROOT`, then in `../shared/data` of a source checkout; what is
nowhere local is read from the Hugging Face hub (`optimize.data.load_rows`).
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "_shipped"  # recipes/, calibration/, evals/ in a wheel
SOURCE_TREE = Path(__file__).parent.parent  # the same folders in a source checkout


def find(relative: str, folder: str, base_dir: Path | None = None) -> Path:
    """A file named in a recipe (`folder` is `calibration`, `evals` or `recipes`): the first that
    exists of `relative` and `folder/relative` under each root; else the path beside the recipe, so
    the error that follows names what the user wrote."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        return path
    base = base_dir or Path.cwd()
    for root in (base, Path.cwd(), SOURCE_TREE, SHIPPED):
        for candidate in (root / path, root / folder / path):
            if candidate.exists():
                return candidate.resolve()
    return base / path


def data_roots() -> list[Path]:
    """Where public data sets live: `$OPTIMIZE_DATA_ROOT`, then `../shared/data` of a source checkout."""
    roots = [Path(os.environ["OPTIMIZE_DATA_ROOT"])] if os.environ.get("OPTIMIZE_DATA_ROOT") else []
    return [*roots, SOURCE_TREE.parent / "shared" / "data"]


def recipe_data(relative: str, base_dir: Path | None = None) -> list[Path]:
    """Where a data SPEC a recipe names may be, in order: as recipe files are found (`find`), then
    under the data roots. `data.load_rows` takes the first that exists, else reads it from the hub."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        return [path]
    return [find(relative, "calibration", base_dir), *(root / relative for root in data_roots())]


def suite_data(relative: str, suite_path: Path) -> list[Path]:
    """Where a data SPEC an eval suite names may be: beside the suite, then under the data roots."""
    path = Path(relative).expanduser()
    return [path] if path.is_absolute() else [root / relative for root in [suite_path.parent, *data_roots()]]


def named(name: str | Path, folder: str, base_dir: Path | None = None) -> Path:
    """A recipe or eval suite (`folder` is `recipes` or `evals`) given by its path, or by the name of
    one that ships with optimize: `minilm-int8` for recipes/minilm-int8.yaml, `stsb` for the one
    suite whose name starts so. Else the path as given, so the error that follows names it."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for candidate in (str(name), f"{name}.yaml"):
        found = find(candidate, folder, base_dir)
        if found.is_file():  # a recipe or suite is a file (evals/stsb/ is the STS-B suite's data)
            return found
    matches = {p.name: p for p in shipped(folder) if p.name.startswith(str(name))}
    return next(iter(matches.values())) if len(matches) == 1 else path


def shipped(folder: str) -> list[Path]:
    """The recipes or suites that ship with optimize (the source checkout's, else the wheel's)."""
    found: dict[str, Path] = {}
    for root in (SHIPPED / folder, SOURCE_TREE / folder):
        found.update({p.name: p for p in root.glob("*.yaml")} if root.is_dir() else {})
    return [found[n] for n in sorted(found)]
