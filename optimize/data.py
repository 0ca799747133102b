"""Reading text data named by a SPEC, one grammar for calibration, distillation data and eval suites:
a local .jsonl/.csv/.tsv/.txt/.parquet file or a folder saved by `datasets` (found beside the recipe
or suite, in the working folder, among the shipped files, then under the data roots), or a Hugging
Face dataset `name[:config][:split]` loaded through `datasets.load_dataset`. Offline, a hub name is
looked up first as a folder laid out like the hub repository under a data root
(`$OPTIMIZE_DATA_ROOT/glue` for `glue:sst2:validation`). Rows come back as dicts; bad data is a
`UsageError` naming it and, for a wrong column, the columns that exist.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from optimize.errors import UsageError
from optimize.runtime.untyped import Json

# A data row as read: the file's own JSON values (strings, numbers, lists from a datasets folder);
# its consumers take the columns they name and convert them (`column`, `LoadedSuite.labels`).
Row: TypeAlias = Json  # one example, as datasets and JSON lines give it

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")


def read_rows(path: Path, delimiter: str | None = None) -> list[Row]:
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


def read_format(path: Path, fmt: Format, named_in: Path | str) -> list[Row]:
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


def _read_jsonl(path: Path) -> list[Row]:
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


def _read_delimited(path: Path, delimiter: str | None) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        if delimiter is None:  # a header row; the delimiter as the file's first lines show it
            sample = handle.read(1 << 16)
            handle.seek(0)
            try:
                found = csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
            except csv.Error:
                found = "\t" if path.suffix.lower() == ".tsv" else ","
            return list(csv.DictReader(handle, delimiter=found))
        # Headerless files such as STS-B carry stray quotes: read them literally.
        reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        return [{str(i): value for i, value in enumerate(row)} for row in reader if row]


def _read_datasets_folder(path: Path) -> list[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a folder it cannot read
        raise UsageError(f"{path}: not a folder saved by `datasets` ({exc})") from None
    if isinstance(loaded, DatasetDict):
        loaded = loaded[next(iter(loaded))]
    assert isinstance(loaded, Dataset)
    return list(loaded.to_list())


def column_name(rows: list[Row], name: str | None, path: Path) -> str:
    """`name` checked to be a column of the rows, or (None) the `text` column, else the first text one."""
    if not rows:
        raise UsageError(f"{path}: no rows")
    if name is None:
        name = "text" if "text" in rows[0] else next((k for k, v in rows[0].items() if isinstance(v, str)), None)
        if name is None:
            raise UsageError(f"{path}: no text column; name one (columns: {', '.join(map(str, rows[0]))})")
    if name not in rows[0]:
        raise UsageError(f"{path}: no column {name!r} (columns: {', '.join(map(str, rows[0]))})")
    return name


def column(rows: list[Row], name: str | None, path: Path) -> list[str]:
    """The non-empty texts of column `name` (or of the one `column_name` picks when None)."""
    name = column_name(rows, name, path)
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


# name[:config][:split]: a hub dataset id (`glue:sst2:validation`, `Salesforce/wikitext:wikitext-2-raw-v1:test`)
HUB_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<config>[\w.-]*))?(?::(?P<split>[\w.-]+))?$")


@dataclass(frozen=True)
class Rows:
    rows: list[Row]
    source: str  # the file or folder read, or the hub id (and where `datasets` found it)


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_SPEC.match(spec)) and Path(spec).suffix.lower() not in SUFFIXES


def load_rows(spec: str, local: Sequence[Path], fmt: Format = "auto", where: str = "data") -> Rows:
    """The rows of SPEC: the first of `local` (candidate paths for it, in order) that exists, else a
    hub dataset by id. `where` names the recipe or suite field in messages."""
    from optimize.paths import data_roots

    for path in local:
        if path.exists():
            return Rows(read_format(path, fmt, where), str(path))
    if not looks_like_hub_id(spec):
        raise UsageError(
            f"{where}: {spec} not found (looked in {', '.join(str(p) for p in local)}); "
            "name a file that exists or a hub dataset `name[:config][:split]`"
        )
    found = HUB_SPEC.match(spec)
    assert found is not None
    name, config, split = found["name"], found["config"] or None, found["split"] or "train"
    copy = next((root / name for root in data_roots() if (root / name).is_dir()), None)
    return Rows(read_hub(str(copy) if copy else name, config, split, spec, where), f"{spec} ({copy or 'hub'})")


def read_hub(path: str, config: str | None, split: str, spec: str, where: str) -> list[Row]:
    """One split of a hub dataset (or of a local folder laid out like its repository) via `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types: no network, no such config or split
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{where}: cannot load hub dataset {spec} ({message}); offline, put a copy laid out like its "
            "hub repository under $OPTIMIZE_DATA_ROOT/<name>"
        ) from None
    return list(loaded.to_list())


def columns_of(rows: list[Row], names: Sequence[str | None], source: str) -> list[str]:
    """The texts of each named column (None: the text one), in order; a wrong name is exit 2."""
    return [text for name in names for text in column(rows, name, Path(source))]
