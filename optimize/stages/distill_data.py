"""The distill stage's texts: the data sources a recipe names (local files or hub datasets, with a
column), read and split into training and held-out texts, and the labels a classifier is taught."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from optimize.data import Format, column_name, columns_of, load_rows
from optimize.errors import UsageError
from optimize.stages.base import StageContext

if TYPE_CHECKING:
    pass


@dataclass
class Texts:
    train: list[str]
    heldout: list[str]
    sources: list[str]
    labels: dict[str, str]  # text -> its hard label, where the data gives one


def load_texts(data: Sequence[DataSource], holdout: int, ctx: StageContext) -> Texts:
    """Training texts, held-out texts, where they came from and their labels; bad or empty data is exit 2."""
    from optimize.paths import recipe_data

    texts: list[str] = []
    sources: list[str] = []
    labels: dict[str, str] = {}
    if not data:
        texts = list(ctx.calibration_texts)
        sources.append("calibration texts")
    for source in data:
        loaded = load_rows(source.path, recipe_data(source.path, ctx.base_dir), source.format, "distill: data")
        rows, path = loaded.rows, Path(loaded.source)
        names: list[str | None] = list(source.columns) or [None]
        found = columns_of(rows, names, loaded.source)
        if source.label is not None:
            label = column_name(rows, source.label, path)
            for key in (column_name(rows, name, path) for name in names):
                for row in rows:
                    labels.setdefault(str(row.get(key) or "").strip(), str(row[label]).strip())
        if source.limit is not None and len(found) > source.limit:
            found = random.Random(ctx.seed).sample(found, source.limit)
        texts += found
        sources.append(f"{source.path} ({len(found)} texts, from {loaded.source})")
    texts = list(dict.fromkeys(texts))  # a sentence seen twice is trained on once
    random.Random(ctx.seed).shuffle(texts)
    if len(texts) <= holdout:
        raise UsageError(f"distill: data: {len(texts)} texts, no more than holdout={holdout}; give more data")
    return Texts(texts[holdout:], texts[:holdout], sources, labels)


def label_ids(labels: dict[str, str], label2id: dict[str, int], classes: int) -> dict[str, int]:
    """Hard labels as class ids: numbers as they are, names through the model's `label2id`."""
    ids: dict[str, int] = {}
    for text, label in labels.items():
        value = int(label) if label.lstrip("-").isdigit() else label2id.get(label)
        if value is None or not 0 <= value < classes:
            raise UsageError(
                f"distill: label {label!r} is not a class of the model ({classes} classes: {', '.join(label2id)})"
            )
        ids[text] = value
    return ids


class DataSource(BaseModel):
    """Unlabeled training text: a SPEC (a file found like calibration files, then in the data roots;
    or a hub dataset `name[:config][:split]`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    format: Format = "auto"
    columns: list[str] = Field(default_factory=list, description="text columns to take (default: the text one)")
    label: str | None = Field(None, description="classifiers: the column of hard labels (ids or label names)")
    limit: int | None = Field(None, gt=0, description="at most this many texts (seeded sample)")
