"""The release artifact: one folder written beside OUT and renamed into place only when complete.

Layout (DESIGN.md): manifest.json, model.onnx, tokenizer files and config.json, runtime/ (the
torch-free runtime with its requirements), report.md and report.json. The manifest lists every
other file with its sha256 and size, so the runtime can refuse a changed file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from optimize.artifact.manifest import seal
from optimize.errors import UsageError
from optimize.models.checkpoint import copy_checkpoint_files
from optimize.runtime.engines import BASE_REQUIREMENTS, BUILDER, DEFAULT_ENGINE, ENGINES
from optimize.runtime.manifest import Manifest

RUNTIME_SOURCE = Path(__file__).parent.parent / "runtime"
# `python -m runtime ART serve` (with requirements.txt): the ASGI stack and Prometheus' client.
SERVE_REQUIREMENTS = (
    "starlette>=0.37,<2",
    "uvicorn>=0.30,<1",
    "prometheus-client>=0.20,<1",
    "jinja2>=3.1,<4  # chat templates",
    "uvloop>=0.19,<1; sys_platform != 'win32'  # the event loop and HTTP parser uvicorn takes when installed",
    "httptools>=0.6,<1",
)


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work when OUT cannot be written, so a long run never ends in a usage error."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"{parent}: not writable")


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Fail before any work when OUT's file system cannot hold the artifact (its model files, about
    the size of the input model's weights) plus its staging copy."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < 2 * needed_bytes:
        raise UsageError(
            f"{parent}: {free / 1e6:.0f} MB free, the artifact needs about {2 * needed_bytes / 1e6:.0f} MB "
            "(the model and its staging copy); free space or choose another -o"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(out: Path) -> Path:
    """A hidden sibling of OUT (same file system, so the final rename is atomic). Siblings left by
    runs that were killed (their process is gone) are removed first."""
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    for stale in out.resolve().parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def write_runtime(folder: Path, *engines: str) -> None:
    """The runtime's source and its requirements: the base lines, then each engine's own row's
    (`runtime.ENGINES`), once each, for the engines the artifact names."""
    runtime = folder / "runtime"
    runtime.mkdir()
    for source in sorted(RUNTIME_SOURCE.glob("*.py")):
        shutil.copyfile(source, runtime / source.name)
    (runtime / "requirements-serve.txt").write_text("\n".join(SERVE_REQUIREMENTS) + "\n")
    named = {ENGINES[e].library for e in engines if e in ENGINES}
    if (folder / ENGINES[BUILDER].opens).is_file():  # the artifact is the model builder's folder
        named.add(BUILDER)
    rows = [e.requirements for e in ENGINES.values() if e.name == e.library and e.name in named]
    listed = [*BASE_REQUIREMENTS, *(line for lines in rows for line in lines)]
    (runtime / "requirements.txt").write_text("\n".join(listed) + "\n")


# Each engine family's file (`runtime.ENGINES`' path), in sentence-transformers' layout
# (`SentenceTransformer(OUT, backend=...)` finds them by these names); anything else runs model.onnx.
ENGINE_FILES = {e.library: e.path for e in ENGINES.values() if e.path != "."}


def write_model_file(source: Path, staging: Path, name: str) -> None:
    """`name` in `staging` from the ONNX file `source`: a copy (with its external data), or for an
    OpenVINO IR (`.xml`) the graph as OpenVINO reads it, saved with its weights unchanged (`.bin`)."""
    target = staging / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
        return
    if target.suffix == ".xml":
        import openvino

        model = openvino.Core().read_model(str(source))
        # Ops OpenVINO names itself take a process-wide counter (`Convert_355855`): renamed by their
        # place in the graph, so the same ONNX file gives the same bytes in any process.
        for index, op in enumerate(model.get_ordered_ops()):
            if re.fullmatch(rf"{op.get_type_name()}_\d+", op.get_friendly_name()):
                op.set_friendly_name(f"{op.get_type_name()}_{index}")
        openvino.save_model(model, str(target), compress_to_fp16=False)
        return
    copy_onnx(source, target)


def copy_onnx(source: Path, target: Path) -> None:
    """An ONNX file to `target` and its external data, if any, beside it under the name the graph
    refers to it by."""
    shutil.copyfile(source, target)
    external = source.with_name(source.name + ".data")
    if external.is_file():
        shutil.copyfile(external, target.parent / external.name)


def write(
    out: Path,
    staging: Path,
    model_files: Mapping[str, Path],
    checkpoint: Path,
    manifest: Manifest,
    report_md: str,
    report: dict[str, object],
    overwrite: bool,
    report_html: str | None = None,
    with_weights: bool = False,
) -> None:
    """Fill `staging`, write the manifest last, then rename it to OUT. `model_files`: each model file
    (model.onnx and the other engines' `ENGINE_FILES`) and the ONNX file it is made from.
    `with_weights` also copies the checkpoint's safetensors and sentence-transformers files (a model
    this run trained)."""
    for name, source in model_files.items():
        write_model_file(source, staging, name)
    # The tokenizer, config and sentence-transformers files (the model's pooling, read by the runtime
    # and by sentence-transformers loading the artifact), and the weights of a model this run trained.
    weights = [p.name for p in sorted(checkpoint.glob("*.safetensors"))] if with_weights else []
    copy_checkpoint_files(checkpoint, staging, weights)
    engines = [str(manifest.get("runtime", {}).get("engine", DEFAULT_ENGINE))]
    write_runtime(staging, *engines, *(e["engine"] for e in manifest.get("engines", [])))
    (staging / "report.md").write_text(report_md)
    if report_html is not None:
        (staging / "report.html").write_text(report_html)
    (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    seal(manifest, staging)
    swap_into_place(staging, out, overwrite)


def swap_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete `staging` folder to OUT. An existing OUT (with --overwrite) is first
    renamed aside and removed only once the new one is in place: the old artifact stays until the
    new one is complete, and no moment shows a half-written OUT."""
    old = None
    if out.exists() and overwrite:
        old = out.resolve().parent / f".{out.name}.replaced-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)  # put the old artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def package(folder: Path, archive: Path) -> None:
    """A deterministic .tar.gz of an artifact folder: entries in sorted order, fixed mtime (0),
    owner root:root with no names, modes 0644 / 0755, and a gzip header without time or name; the
    same folder gives the same bytes. Written beside `archive` and renamed into place."""
    import gzip
    import io
    import tarfile

    partial = archive.with_name(archive.name + ".partial")
    paths = sorted(p for p in folder.rglob("*") if "__pycache__" not in p.parts)
    with (
        partial.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in paths:
            if path.is_symlink():
                raise UsageError(f"{path}: an artifact holds no links; refusing to package it")
            info = tarfile.TarInfo(f"{folder.name}/{path.relative_to(folder).as_posix()}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            data = path.read_bytes()
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    partial.replace(archive)


def extract(archive: Path, dest: Path) -> Path:
    """Unpack an artifact archive into `dest` after checking every member: no absolute paths, no
    `..`, no links, devices or other special files, one top folder. Returns that folder."""
    import tarfile

    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (opened here to name a bad file; `with tar:` closes it)
    except (OSError, tarfile.TarError) as exc:
        raise UsageError(f"{archive}: not a readable .tar.gz archive ({exc})") from None
    with tar:
        members = tar.getmembers()
        tops = set()
        for member in members:
            name = member.name
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
                raise UsageError(f"{archive}: member {name!r} would land outside the folder; refusing to extract")
            if not (member.isfile() or member.isdir()):
                raise UsageError(f"{archive}: member {name!r} is a link or special file; refusing to extract")
            tops.add(parts[0] if parts else "")
        if len(tops) != 1 or "" in tops:
            raise UsageError(f"{archive}: an artifact archive holds one top folder, this one has {len(tops)}")
        tar.extractall(dest, filter="data")
    return dest / tops.pop()
