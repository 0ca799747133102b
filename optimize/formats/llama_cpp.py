"""llama.cpp's own tools, for a decoder that did not come as a GGUF: its converter
(`convert_hf_to_gguf.py`: each architecture's tensor layout, the tokenizer with its pre-tokenizer and
special tokens, the chat template), its importance matrix (`llama-imatrix`: each weight's input
columns weighted by the squared activations the calibration texts give them) and its quantizer
(`llama-quantize`: Q8_0 and the K-quants, rounding where that matrix says it matters least).

They are llama.cpp's source as llama-cpp-python's source release vendors it (the same release as the
bindings that load the file): downloaded once into the cache with pip, the two tools built there with
cmake (a few minutes, once). `$OPTIMIZE_LLAMA_CPP` names a llama.cpp checkout to use instead; tools
already on PATH (`llama-quantize`, `llama-imatrix`: brew, a llama.cpp release) are used as they are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal, get_args

from optimize.errors import DependencyError
from optimize.models.handle import cache_root

# The source release whose converter and tools were measured with this stack (transformers 5.25): a
# bindings release installed here takes precedence (its file format is the one it loads).
SOURCE_RELEASE = "0.3.36"
# llama-quantize's types: nominal bits per weight, for the order they are tried in (smallest first).
TYPES = {
    "Q2_K": 2, "Q3_K_S": 3, "Q3_K_M": 3, "Q3_K_L": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K_S": 4, "Q4_K_M": 4,
    "Q5_0": 5, "Q5_1": 5, "Q5_K_S": 5, "Q5_K_M": 5, "Q6_K": 6, "Q8_0": 8,
}  # fmt: skip
GgufType = Literal[
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M",
    "Q6_K", "Q8_0",
]  # fmt: skip
IMATRIX_CONTEXT = 128  # tokens per chunk the importance matrix is collected over
IMATRIX_CHUNKS = 2  # at least this many whole chunks of calibration text, or the matrix is refused


def release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return SOURCE_RELEASE


def source() -> Path:
    """llama.cpp's source: `$OPTIMIZE_LLAMA_CPP`, or the one vendored by llama-cpp-python's source
    release, downloaded into the cache the first time."""
    given = os.environ.get("OPTIMIZE_LLAMA_CPP")
    if given:
        return Path(given)
    folder = cache_root() / "llama.cpp" / release()
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="optimize-llama-cpp-") as tmp:
        command = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={release()}", "--no-deps"]
        done = subprocess.run([*command, "--no-binary", ":all:", "-d", tmp], capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise DependencyError(
                f"format gguf: cannot download llama.cpp's source (llama-cpp-python {release()}): {last}"
            )
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archives[0]) as archive:
            prefix = archive.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            archive.extractall(staging, members=[m for m in members if m.name], filter="data")
        staging.replace(folder)
    return folder


@cache
def architectures(root: Path) -> frozenset[str]:
    """The transformers classes llama.cpp's converter knows, read from its registrations."""
    texts = [p.read_text() for p in [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]]
    found: set[str] = set()
    for text in texts:
        for registered in re.findall(r"ModelBase\.register\(([^)]*)\)", text):
            found |= set(re.findall(r'"(\w+)"', registered))
    return frozenset(found)


def tool(name: str, root: Path) -> Path:
    """`llama-<name>` (quantize, imatrix): on PATH, else built from `root` once."""
    found = shutil.which(f"llama-{name}")
    if found:
        return Path(found)
    built = root / "build" / "bin" / f"llama-{name}"
    if built.is_file():
        return built
    configure = [
        "cmake", "-S", str(root), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    ]  # fmt: skip
    build = ["cmake", "--build", str(root / "build"), "--target", "llama-quantize", "llama-imatrix"]
    for command in (configure, [*build, "-j", str(os.cpu_count() or 1)]):
        _run(command, f"building llama.cpp's tools ({' '.join(command[:2])})")
    return built


def convert(checkpoint: Path, out: Path) -> None:
    """The checkpoint as one fp32 GGUF, by llama.cpp's converter (with the gguf-py it ships)."""
    root = source()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(out)]
    _run([*command, "--outtype", "f32"], "llama.cpp's converter", env)


def tokens_needed() -> int:
    return IMATRIX_CONTEXT * IMATRIX_CHUNKS


def imatrix(model: Path, texts: Sequence[str], out: Path) -> None:
    """llama.cpp's importance matrix of `model` over the calibration texts. Run in `out`'s folder with
    names relative to it: the quantizer copies the matrix's and its data's names into the GGUF it
    writes, and a path of this run's scratch folder would make each run's file differ."""
    root = source()
    (out.parent / "calibration.txt").write_text("\n".join(texts))
    command = [str(tool("imatrix", root)), "-m", str(model), "-f", "calibration.txt", "-o", out.name]
    run = [*command, "-c", str(IMATRIX_CONTEXT), "--no-ppl", "-t", str(os.cpu_count() or 1)]
    _run(run, "llama-imatrix", cwd=out.parent)


def quantize(model: Path, out: Path, kind: str, matrix: Path | None) -> None:
    """`model` at llama-quantize's `kind`, weighted by the importance matrix where there is one (named
    relative to its folder, where the quantizer runs: see `imatrix`)."""
    command = [str(tool("quantize", source()))]
    if matrix is not None:
        command += ["--imatrix", matrix.name]
    run = [*command, str(model.resolve()), str(out.resolve()), kind, str(os.cpu_count() or 1)]
    _run(run, "llama-quantize", cwd=matrix.parent if matrix is not None else None)


def _run(command: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    except FileNotFoundError:  # no cmake (or compiler) to build the tools with
        raise DependencyError(
            f"format gguf: {what} needs {command[0]}: install it (and a C++ compiler), or put llama.cpp's "
            "llama-quantize and llama-imatrix on PATH"
        ) from None
    if done.returncode:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DependencyError(f"format gguf: {what} failed (exit {done.returncode}): {lines[-1] if lines else ''}")


assert set(TYPES) == set(get_args(GgufType)), "a llama.cpp type is one entry of TYPES and one name of GgufType"
