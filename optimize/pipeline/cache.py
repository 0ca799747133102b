"""The stage cache: what each step of a run produced, kept under a key of everything it depended on,
so a rerun reuses it and an interrupted run resumes at the first step it had not finished.

A key chains: the run's base key hashes the input model's bytes, the calibration and held-out texts,
the eval suites' data, the sequence length, the seed, the tool versions and optimize's own source;
each step's key hashes the previous key with that step's config and gate. An entry is a folder
(`<root>/<key>/`): the step's output model files and `entry.json` (its record, plan and runtime
settings). Entries are written to a temporary folder and renamed into place under a file lock
(`filelock`), so two runs sharing the folder never see half an entry, and a killed run leaves at
most a temporary folder that `optimize cache clear` removes.

The root is `--cache-dir`, else `$OPTIMIZE_CACHE_DIR` (default `~/.cache/optimize`): the stage
cache in `stages/`, GGUF files converted to checkpoints in `gguf/`. `--no-cache` reads and writes
neither (a GGUF is converted into the run's scratch folder), and `optimize cache clear` empties both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import optimize
from optimize.artifact.write import copy_onnx
from optimize.models.checkpoint import folder_sha256
from optimize.models.handle import ModelHandle
from optimize.runtime.engines import DEFAULT_ENGINE
from optimize.runtime.manifest import GateResult, JsonObject, RuntimeSettings, StageJson

ENTRY = "entry.json"


class Entry(TypedDict, total=False):
    """`entry.json`: the step, where its model files are in the folder, and what the run reuses."""

    step: str
    recipe: str  # the recipe's name, for `optimize cache list`
    created: float
    engine: str  # what runs the step's ONNX file
    onnx: str | None  # relative to the entry's folder
    checkpoint: str | None  # a checkpoint the step made (a trained student, an engine folder)
    record: StageJson  # an export or a stage: its record, its plan and runtime settings
    plan: dict[str, str]
    runtime: RuntimeSettings
    metrics: dict[str, float]  # the reference: what it measured, and under which conditions
    losses: dict[str, list[float]]  # the reference's per-token losses behind its perplexity
    costs: list[JsonObject]  # what the step cost when it ran (optimize/costs.py), replayed when reused
    details: JsonObject
    conditions: JsonObject
    gate: GateResult  # an engine's file: its gate
    alternates: dict[str, Alternate]  # a stage's other engines' files


class Alternate(TypedDict):
    onnx: str | None  # relative to the entry's folder: an ONNX file, or
    checkpoint: str | None  # a folder (another format's checkpoint)
    engine: str


class Listed(TypedDict):
    key: str
    step: str
    recipe: str
    size_mb: float
    created: float


# What lives under the cache's root: the stage cache, GGUF conversions, and `export/`, where
# releases before the export became a stage-cache step kept their own copies (cleared, never read).
PARTS = ("stages", "gguf", "export")


def default_root() -> Path:
    from optimize.models.handle import cache_root

    return cache_root() / "stages"


def clear_all(root: Path) -> int:
    """Empty every part of the cache under `root`; returns the bytes freed."""
    return sum(StageCache(root / part).clear() for part in PARTS)


def key(*parts: object) -> str:
    """A stable hash of JSON-able parts (sorted keys; paths and other objects as strings)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def source_sha256() -> str:
    """optimize's own source: a change to the code that made an entry invalidates it."""
    return folder_sha256(Path(optimize.__file__).parent, "*.py")


def referenced_files(config: object, base_dir: Path) -> dict[str, str]:
    """The sha256 of every local file a stage's config names (distillation data, a plan file), found
    as the stage would find it: a changed file under the same name is a different step."""
    from optimize.paths import recipe_data
    from optimize.runtime import sha256_file

    found: dict[str, str] = {}

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and ("/" in value or "." in value) and len(value) < 500:
            path = next((c for c in recipe_data(value, base_dir) if c.is_file()), None)
            if path is not None:
                found[value] = sha256_file(path)

    walk(config)
    return found


@dataclass(frozen=True)
class StageCache:
    root: Path

    def get(self, entry_key: str) -> tuple[Path, Entry] | None:
        folder = self.root / entry_key
        try:
            return folder, cast(Entry, json.loads((folder / ENTRY).read_text()))
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, entry_key: str, fill: Callable[[Path], Entry]) -> tuple[Path, Entry]:
        """Make the entry with `fill(folder) -> entry` unless another run already has; atomic."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{entry_key}.lock")):
            found = self.get(entry_key)
            if found is not None:
                return found
            staging = Path(tempfile.mkdtemp(prefix=f".{entry_key}.", dir=self.root))
            try:
                entry = fill(staging)
                entry["created"] = time.time()
                (staging / ENTRY).write_text(json.dumps(entry, indent=1, default=str))  # metrics keep their order
                staging.rename(self.root / entry_key)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        found = self.get(entry_key)
        assert found is not None
        return found

    def entries(self) -> list[Listed]:
        """What is cached: key, step, size in MB, age, newest first."""
        rows: list[Listed] = []
        for folder in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            found = self.get(folder.name) if folder.is_dir() and not folder.name.startswith(".") else None
            if found is None:
                continue
            size = _bytes(folder)
            entry = found[1]
            rows.append(
                {
                    "key": folder.name,
                    "step": entry.get("step", "?"),
                    "recipe": entry.get("recipe", "?"),
                    "size_mb": round(size / 1e6, 3),
                    "created": entry.get("created", 0),
                }
            )
        return sorted(rows, key=lambda r: -r["created"])

    def clear(self) -> int:
        """Remove every entry, lock and leftover temporary folder; returns the bytes freed."""
        freed = 0
        for path in list(self.root.glob("*")) if self.root.is_dir() else []:
            freed += _bytes(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return freed


def _bytes(path: Path) -> int:
    """The size of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def store_model(folder: Path, onnx_path: Path | None, checkpoint: Path, own_checkpoint: bool) -> Entry:
    """Copy a step's output model into an entry folder: its ONNX file (with external data) and, when
    the step made a new checkpoint (a trained student, a decoder engine folder), that folder."""
    stored: Entry = {"onnx": None, "checkpoint": None}
    if own_checkpoint:
        shutil.copytree(checkpoint, folder / "checkpoint")
        stored["checkpoint"] = "checkpoint"
    if onnx_path is not None:
        if own_checkpoint and onnx_path.parent == checkpoint:
            stored["onnx"] = f"checkpoint/{onnx_path.name}"
        else:
            (folder / "onnx").mkdir()
            copy_onnx(onnx_path, folder / "onnx" / onnx_path.name)
            stored["onnx"] = f"onnx/{onnx_path.name}"
    return stored


@dataclass
class RunCache:
    """One run's chain of steps in the stage cache: a step's key hashes the run's key so far with the
    step's own parts, and a step kept (or reused) moves the run's key on. Without a store
    (`--no-cache`, or a torchrun worker) nothing is read or kept, and the keys still chain."""

    store: StageCache | None
    key: str
    recipe: str  # named in each entry, for `optimize cache list`

    def lookup(self, step: str, *parts: object) -> tuple[str, tuple[Path, Entry] | None]:
        """The key of the next step and its cache entry, if any."""
        step_key = key(self.key, step, *parts)
        return step_key, self.store.get(step_key) if self.store else None

    def keep(
        self,
        step_key: str,
        step: str,
        entry: Entry,
        model: ModelHandle,
        source: ModelHandle,
        alternates: Mapping[str, ModelHandle] | None = None,
    ) -> None:
        """Store a finished step's model (its ONNX file, and its checkpoint when the step made one),
        its other engines' files, and `entry` under its key, and move the run's key on."""
        if self.store is not None:
            own = model.checkpoint != source.checkpoint

            def fill(folder: Path) -> Entry:
                stored = store_model(folder, model.onnx_path, model.checkpoint, own)
                kept: dict[str, Alternate] = {}
                for engine, handle in sorted((alternates or {}).items()):
                    where = folder / "alternates" / engine
                    if handle.onnx_path is None:  # a folder format
                        shutil.copytree(handle.checkpoint, where)
                        kept[engine] = {"onnx": None, "checkpoint": f"alternates/{engine}", "engine": handle.engine}
                        continue
                    where.mkdir(parents=True)
                    copy_onnx(handle.onnx_path, where / handle.onnx_path.name)
                    onnx = f"alternates/{engine}/{handle.onnx_path.name}"
                    kept[engine] = {"onnx": onnx, "checkpoint": None, "engine": handle.engine}
                stored["alternates"] = kept
                return {**entry, "step": step, "recipe": self.recipe, "engine": model.engine, **stored}

            self.store.put(step_key, fill)
        self.key = step_key

    def reuse(self, step_key: str, found: tuple[Path, Entry], source: ModelHandle) -> ModelHandle:
        """A cached step's model, as if the step had just made it from `source`; moves the key on."""
        folder, entry = found
        stored_checkpoint, stored_onnx = entry.get("checkpoint"), entry.get("onnx")
        checkpoint = folder / stored_checkpoint if stored_checkpoint else source.checkpoint
        onnx = folder / stored_onnx if stored_onnx else None
        self.key = step_key
        engine = entry.get("engine", DEFAULT_ENGINE)
        return dataclasses.replace(source, checkpoint=checkpoint, onnx_path=onnx, engine=engine)

    def alternates(self, found: tuple[Path, Entry], source: ModelHandle) -> dict[str, ModelHandle]:
        """A cached stage's other engines' files, as `keep` stored them."""
        folder, entry = found
        handles = {}
        for engine, kept in entry.get("alternates", {}).items():
            onnx, checkpoint = kept.get("onnx"), kept.get("checkpoint")
            handles[engine] = dataclasses.replace(
                source,
                checkpoint=folder / checkpoint if checkpoint else source.checkpoint,
                onnx_path=folder / onnx if onnx else None,
                engine=kept["engine"],
            )
        return handles

    def put(self, step_key: str, entry: Entry) -> None:
        """Keep a step that makes no model (the reference measurement)."""
        if self.store is not None:
            self.store.put(step_key, lambda _: {**entry, "recipe": self.recipe})
