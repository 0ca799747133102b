"""Hostile and broken input, across recipes, flags, models, weight files, data files, manifests,
artifacts and archives: each case must end in exit 2 with one message naming the problem, no
traceback, and nothing written (no OUT, no archive, no temporary folder)."""

from __future__ import annotations

import collections
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from tests.conftest import write_recipe

COMPILE = [{"kind": "compile", "target": "cpu", "variants": ["basic"]}]


@pytest.fixture(scope="module")
def good_artifact(tiny_bert, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    recipe = write_recipe(folder, COMPILE, model=str(tiny_bert))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(folder / "art"), "--json"])
    assert result.exit_code == 0, result.output
    return folder / "art"


def _copy_model(tiny_bert: Path, tmp: Path) -> Path:
    model = tmp / "model"
    shutil.copytree(tiny_bert, model)
    return model


def _run(tmp: Path, model: str, **extra) -> list[str]:
    recipe = write_recipe(tmp, COMPILE, model=model, **extra)
    return ["run", str(recipe), "-o", str(tmp / "out")]


def _recipe_text(tmp: Path, text: str) -> list[str]:
    (tmp / "r.yaml").write_text(text)
    return ["run", str(tmp / "r.yaml"), "-o", str(tmp / "out")]


def _artifact(art: Path, tmp: Path, edit: Callable[[Path], None], command: str = "inspect") -> list[str]:
    copy = tmp / "art"
    shutil.copytree(art, copy)
    edit(copy)
    return [command, str(copy)]


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _archive(tmp: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> list[str]:
    path = tmp / "hostile.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return ["inspect", str(path)]


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])

    return apply


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda model: (model / name).write_text(text)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda model: (model / name).unlink()


def _model_case(edit: Callable[[Path], None]) -> Callable[[Path, Path, Path], list[str]]:
    def build(tiny: Path, art: Path, tmp: Path) -> list[str]:
        model = _copy_model(tiny, tmp)
        edit(model)
        return _run(tmp, str(model))

    return build


def _data_case(text: str | None, suffix: str = ".jsonl", **calibration) -> Callable[[Path, Path, Path], list[str]]:
    def build(tiny: Path, art: Path, tmp: Path) -> list[str]:
        path = tmp / f"cal{suffix}"
        if text is not None:
            path.write_text(text)
        cal = {"data": str(path), "samples": 4, "holdout": 2, "seq_len": 16, **calibration}
        return _run(tmp, str(tiny), calibration=cal)

    return build


CASES: dict[str, tuple[Callable[[Path, Path, Path], list[str]], str]] = {
    # recipes
    "recipe missing": (lambda t, a, tmp: ["run", str(tmp / "nope.yaml"), "-o", str(tmp / "out")], "nope.yaml"),
    "recipe not yaml": (lambda t, a, tmp: _recipe_text(tmp, "stages: [\n  - {kind: compile"), "r.yaml"),
    "recipe is a list": (lambda t, a, tmp: _recipe_text(tmp, "- 1\n- 2\n"), "r.yaml"),
    "recipe binary": (lambda t, a, tmp: _recipe_text(tmp, "\x00\x01\x02 garbage \xff"), "r.yaml"),
    "unknown key": (lambda t, a, tmp: _run(tmp, str(t), colour="blue"), "colour"),
    "wrong type": (lambda t, a, tmp: _run(tmp, str(t), seed="zero"), "seed"),
    "unknown stage kind": (
        lambda t, a, tmp: _recipe_text(tmp, "version: 1\nname: x\nstages: [{kind: prune}]\n"),
        "kind",
    ),
    "extends missing": (lambda t, a, tmp: _recipe_text(tmp, "extends: base-nope.yaml\nname: x\n"), "base-nope"),
    "extends itself": (lambda t, a, tmp: _recipe_text(tmp, "extends: r.yaml\nname: x\n"), "cycle"),
    "gate metric unknown": (
        lambda t, a, tmp: _recipe_text(
            tmp, f"version: 1\nname: x\nmodel: {t}\nstages: [{{kind: compile, gate: [{{metric: bleu, min: 1}}]}}]\n"
        ),
        "bleu",
    ),
    "int4 block size": (
        lambda t, a, tmp: _recipe_text(
            tmp,
            f"version: 1\nname: x\nmodel: {t}\nstages:\n"
            "  - {kind: quantize, precision: int4, method: {name: rtn, block_size: 100}}\n",
        ),
        "block_size",
    ),
    # flags
    "set without =": (lambda t, a, tmp: [*_run(tmp, str(t)), "--set", "seed"], "--set"),
    "set unknown key": (lambda t, a, tmp: [*_run(tmp, str(t)), "--set", "stages.0.speed=11"], "speed"),
    "precision bogus": (
        lambda t, a, tmp: ["quantize", str(t), "--precision", "int3", "-o", str(tmp / "out")],
        "precision",
    ),
    "gate flag malformed": (
        lambda t, a, tmp: ["quantize", str(t), "--gate", "spearman sideways 1", "-o", str(tmp / "out")],
        "sideways",
    ),
    "out is a file": (
        lambda t, a, tmp: (tmp / "out").write_text("x") and ["run", *_run(tmp, str(t))[1:], "--overwrite"],
        "not a folder",
    ),
    "no free disk": (lambda t, a, tmp: _run(tmp, str(t)), "MB free"),  # disk_usage faked below
    # models and weight files
    "model missing": (lambda t, a, tmp: _run(tmp, str(tmp / "no-model")), "no-model"),
    "config not json": (_model_case(_write("config.json", "{not json")), "config.json"),
    "config missing": (_model_case(_remove("config.json")), "config.json"),
    "tokenizer missing": (_model_case(_remove("tokenizer.json")), "tokenizer.json"),
    "weights truncated": (_model_case(_truncate("model.safetensors")), "model.safetensors"),
    "weights not safetensors": (
        _model_case(_write("model.safetensors", "hello, I am not a tensor file")),
        "model.safetensors",
    ),
    "weights missing": (_model_case(_remove("model.safetensors")), "safetensors"),
    "architecture unknown": (
        _model_case(
            lambda m: (m / "config.json").write_text(
                json.dumps({**json.loads((m / "config.json").read_text()), "model_type": "frobnicator"})
            )
        ),
        "frobnicator",
    ),
    "shard missing": (
        _model_case(
            lambda m: (m / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a.weight": "model.safetensors", "b.weight": "model-00002.safetensors"}})
            )
        ),
        "model-00002.safetensors",
    ),
    "gguf cut short": (
        lambda t, a, tmp: (
            (tmp / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20) and _run(tmp, str(tmp / "cut.gguf"))
        ),
        "cut.gguf",
    ),
    "remote code": (
        _model_case(
            lambda m: (m / "config.json").write_text(
                json.dumps(
                    {
                        **json.loads((m / "config.json").read_text()),
                        "model_type": "mine",
                        "auto_map": {"AutoModel": "x.Y"},
                    }
                )
            )
        ),
        "--trust-remote-code",
    ),
    # data files
    "calibration missing": (_data_case(None), "cal.jsonl"),
    "calibration empty": (_data_case(""), "no rows"),
    "calibration bad json line": (_data_case('{"text": "ok"}\n{"text": \n'), "cal.jsonl"),
    "calibration wrong column": (_data_case('{"body": "a"}\n' * 10, columns=["text"]), "text"),
    "calibration binary": (_data_case("\x00\xff\xfe" * 50, suffix=".csv"), "cal.csv"),
    "eval suite missing": (lambda t, a, tmp: _run(tmp, str(t), evals=[str(tmp / "suite-nope.yaml")]), "suite-nope"),
    # manifests and artifacts
    "manifest missing": (lambda t, a, tmp: _artifact(a, tmp, _remove("manifest.json")), "manifest.json"),
    "manifest not json": (lambda t, a, tmp: _artifact(a, tmp, _write("manifest.json", "{")), "manifest.json"),
    "manifest without provenance": (
        lambda t, a, tmp: _artifact(a, tmp, _manifest(lambda m: m.pop("provenance"))),
        "provenance",
    ),
    "manifest without files": (lambda t, a, tmp: _artifact(a, tmp, _manifest(lambda m: m.pop("files"))), "files"),
    "model not listed": (
        lambda t, a, tmp: _artifact(a, tmp, _manifest(lambda m: m["files"].pop("model.onnx"))),
        "not listed",
    ),
    "file outside folder": (
        lambda t, a, tmp: _artifact(
            a, tmp, _manifest(lambda m: m["files"].update({"../escape": {"sha256": "0", "bytes": 1}}))
        ),
        "../escape",
    ),
    "model tampered": (
        lambda t, a, tmp: _artifact(a, tmp, lambda f: (f / "model.onnx").write_bytes(b"evil")),
        "sha256",
    ),
    "stage record malformed": (
        lambda t, a, tmp: _artifact(a, tmp, _manifest(lambda m: m["stages"][0].pop("gate"))),
        "gate",
    ),
    "package tampered": (
        lambda t, a, tmp: _artifact(a, tmp, lambda f: (f / "model.onnx").write_bytes(b"evil"), command="package"),
        "sha256",
    ),
    # archives
    "archive absolute path": (lambda t, a, tmp: _archive(tmp, [(_member("/etc/evil"), b"x")]), "outside"),
    "archive dot dot": (lambda t, a, tmp: _archive(tmp, [(_member("art/../../evil"), b"x")]), "outside"),
    "archive symlink": (
        lambda t, a, tmp: _archive(tmp, [(_member("art/link", tarfile.SYMTYPE, "/etc/passwd"), None)]),
        "link",
    ),
    "archive hard link": (
        lambda t, a, tmp: _archive(tmp, [(_member("art/hard", tarfile.LNKTYPE, "/etc/passwd"), None)]),
        "link",
    ),
    "archive device": (lambda t, a, tmp: _archive(tmp, [(_member("art/dev", tarfile.CHRTYPE), None)]), "special"),
    "archive garbage": (
        lambda t, a, tmp: (tmp / "g.tar.gz").write_bytes(b"\x1f\x8b garbage") and ["inspect", str(tmp / "g.tar.gz")],
        "g.tar.gz",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_with_one_message_no_traceback_and_nothing_written(
    case, tiny_bert, good_artifact, tmp_path, monkeypatch
):
    make, expected = CASES[case]
    if case == "no free disk":  # OUT's file system reports 1 MB free
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    args = make(tiny_bert, good_artifact, tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(app, args)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}: {output[-2000:]}"
    assert "Traceback" not in output and not (result.exception and not isinstance(result.exception, SystemExit))
    assert expected in output, f"{case}: {output[-1500:]}"
    assert "error" in output.lower()
    written = sorted(str(p.relative_to(tmp_path)) for p in set(tmp_path.rglob("*")) - before)
    assert written == [], f"{case}: wrote {written}"
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}*"))  # no staging sibling either
