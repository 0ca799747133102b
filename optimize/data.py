"""Reading text data named by a SPEC: a local .jsonl/.csv/.tsv/.txt/.parquet file or a folder saved
by `datasets`. Rows come back as dicts; a bad file is a `UsageError` naming it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from optimize.errors import UsageError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")


def read_rows(path: Path, delimiter: str | None = None) -> list[dict[str, Any]]:
    """All rows of a local data file; `.txt` gives one `{"text": line}` per non-empty line.

    `.csv`/`.tsv` files with no header are read with numbered columns ("0", "1", ...) when
    `delimiter` is given explicitly; otherwise the first row is the header.
    """
    if not path.exists():
        raise UsageError(f"{path}: no such data file")
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if suffix in (".csv", ".tsv") or delimiter is not None:
            return _read_delimited(path, delimiter)
        if suffix == ".txt" or suffix.startswith((".raw", ".dev", ".test", ".train")):
            return [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(path).to_pylist())
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from None
    raise UsageError(f"{path}: unknown data format {suffix!r}; use one of {', '.join(SUFFIXES)}")


Format = Literal["auto", "tsv-noheader", "label-text"]


def read_format(path: Path, fmt: Format, named_in: Path | str) -> list[dict[str, Any]]:
    """Rows of a data file in a named layout: `auto` (by suffix, see `read_rows`), `tsv-noheader`
    (numbered columns "0", "1", ...), or `label-text` (`<label> <text>` per line, as SST-2)."""
    if fmt == "tsv-noheader":
        return read_rows(path, delimiter="\t")
    if fmt == "label-text":
        if not path.is_file():
            raise UsageError(f"{path}: no such data file")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            label, _, text = line.strip().partition(" ")
            if not text or not label.lstrip("-").isdigit():
                raise UsageError(f"{path}:{number}: expected `<label> <text>` (format label-text in {named_in})")
            rows.append({"label": label, "text": text})
        return rows
    return read_rows(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        rows.append(row if isinstance(row, dict) else {"text": row})
    return rows


def _read_delimited(path: Path, delimiter: str | None) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        if delimiter is None:
            return list(csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        # Headerless files such as STS-B carry stray quotes: read them literally.
        reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        return [{str(i): value for i, value in enumerate(row)} for row in reader if row]


def _read_datasets_folder(path: Path) -> list[dict[str, Any]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a folder it cannot read
        raise UsageError(f"{path}: not a folder saved by `datasets` ({exc})") from None
    if isinstance(loaded, DatasetDict):
        loaded = loaded[next(iter(loaded))]
    assert isinstance(loaded, Dataset)
    return list(loaded.to_list())


def column(rows: list[dict[str, Any]], name: str | None, path: Path) -> list[str]:
    """The text column `name` (or the only/first text-looking column when None)."""
    if not rows:
        raise UsageError(f"{path}: no rows")
    if name is None:
        name = "text" if "text" in rows[0] else next((k for k, v in rows[0].items() if isinstance(v, str)), None)
        if name is None:
            raise UsageError(f"{path}: no text column; name one (columns: {', '.join(map(str, rows[0]))})")
    if name not in rows[0]:
        raise UsageError(f"{path}: no column {name!r} (columns: {', '.join(map(str, rows[0]))})")
    texts = [str(row.get(name) or "").strip() for row in rows]
    texts = [t for t in texts if t]
    if not texts:
        raise UsageError(f"{path}: column {name!r} holds no text")
    return texts


def split_calibration(
    texts: list[str], samples: int, holdout: int, seed: int, path: Path
) -> tuple[list[str], list[str]]:
    """Shuffle with the seed, then hold out `holdout` texts for fidelity and keep `samples` to calibrate."""
    if len(texts) < samples + holdout:
        raise UsageError(
            f"{path}: {len(texts)} texts, but calibration asks for samples={samples} plus "
            f"holdout={holdout}; lower calibration.samples or give more data"
        )
    order = list(texts)
    random.Random(seed).shuffle(order)
    return order[holdout : holdout + samples], order[:holdout]


def texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()
