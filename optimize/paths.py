"""Where files named in recipes and suites are found: the one resolver for data paths.

A recipe names calibration files and eval suites by relative path; they are looked for beside the
recipe, in the working folder, in this source checkout, then among the files shipped inside the
wheel (`optimize/_shipped`). An eval suite names its public data set by a path that is looked for
beside the suite, under `$OPTIMIZE_DATA_ROOT`, then in `../shared/data` of a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from optimize.errors import UsageError

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


def find_training_data(relative: str, base_dir: Path | None = None) -> Path:
    """A data file a recipe trains on: found as recipe files are (`find`), else among the data roots."""
    found = find(relative, "calibration", base_dir)
    if found.exists():
        return found
    return next((root / relative for root in data_roots() if (root / relative).exists()), found)


def find_dataset(name: str, suite_path: Path) -> Path:
    """The data file an eval suite names (`data: stsb/sts-test.csv`)."""
    for root in [suite_path.parent, *data_roots()]:
        if (root / name).exists():
            return (root / name).resolve()
    raise UsageError(
        f"{suite_path}: data: {name} not found beside the suite, under $OPTIMIZE_DATA_ROOT "
        "or in ../shared/data; set OPTIMIZE_DATA_ROOT to the folder that holds it"
    )
