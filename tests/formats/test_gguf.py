"""optimize.formats.gguf: a decoder's GGUF (llama.cpp, Ollama) written beside the onnxruntime-genai
folder, with the header of the GGUF the model came as, gated through the loader that reads it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from optimize.formats import gguf as gguf_format
from optimize.models.gguf_input import from_gguf
from tests.conftest import run_recipe, write_recipe

gguf = pytest.importorskip("gguf")
pytest.importorskip("onnxruntime_genai")

GGUF_STAGE = {
    "kind": "genai",
    "candidates": [{"precision": "fp32"}],
    "formats": ["gguf"],
    "gate": [{"metric": "cosine_mean", "min": 0.99}],
}


@pytest.fixture(scope="module")
def artifact(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-run")
    return run_recipe(folder, [GGUF_STAGE], tiny_gguf, "--json", "--cache-dir", str(folder / "cache"))


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


def test_weights_from_a_q4_1_gguf_are_written_back_to_the_same_bytes(artifact: Path, tiny_gguf: Path) -> None:
    """Read as a checkpoint (transformers dequantizes and un-permutes q/k), written again at int4:
    every tensor has its type and bytes of the input, and the header its keys and tokenizer."""
    manifest = runtime.verify(artifact)
    tried = manifest["stages"][0]["details"]["formats"]
    assert [(t["format"], t["bits"], t["passed"]) for t in tried] == [("gguf", 4, True)]
    assert tried[0]["loader"] == gguf_format.loader() and tried[0]["metrics"]["cosine_mean"] >= 0.99
    written = artifact / "gguf" / "model.gguf"
    assert _tensors(written) == _tensors(tiny_gguf)
    header, source = gguf.GGUFReader(written).fields, gguf.GGUFReader(tiny_gguf).fields
    assert set(header) == set(source)
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "llama.attention.head_count_kv", "general.file_type"):
        assert header[key].contents() == source[key].contents(), key
    assert header["tokenizer.ggml.tokens"].contents()[:50] == source["tokenizer.ggml.tokens"].contents()[:50]
    listed = {e["engine"]: e for e in manifest["engines"]}
    assert listed["llama.cpp"]["file"] == "gguf" and listed["llama.cpp"]["gate"]["passed"]
    hashed = json.loads((artifact / "manifest.json").read_text())["files"]
    assert "gguf/model.gguf" in hashed


def test_int8_is_q8_0_throughout_and_reads_back_within_its_rounding(tiny_gguf: Path, tmp_path: Path) -> None:
    checkpoint = from_gguf(tiny_gguf, tmp_path / "converted")
    gguf_format.write(checkpoint, tmp_path / "int8", 8, ())
    written = gguf.GGUFReader(tmp_path / "int8" / "model.gguf")
    assert {t.tensor_type.name for t in written.tensors} == {"Q8_0", "F32"}
    assert written.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    source = {t.name: t for t in gguf.GGUFReader(tiny_gguf).tensors}
    for tensor in written.tensors:
        exact = gguf.quants.dequantize(source[tensor.name].data, source[tensor.name].tensor_type)
        ours = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        step = np.abs(exact).max(axis=-1, keepdims=True) / 127  # Q8_0's step is at most the row's
        assert (np.abs(ours - exact) <= step + 1e-6).all(), tensor.name


def test_the_runtime_generates_from_the_gguf_and_says_so(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With llama-cpp-python the GGUF generates what onnxruntime-genai generates from the same
    weights (greedy); `--engine` names it, a missing engine is one clear line."""
    from optimize.runtime.__main__ import main

    model = runtime.load(artifact)
    assert "llama.cpp" in (artifact / "runtime" / "requirements.txt").read_text()
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ValueError, match="needs llama-cpp-python"):
            model.generate("Hello", engine="llama.cpp")
        return
    assert model.generators() == ["onnxruntime-genai", "llama.cpp"]
    genai = model.generate("The capital of France is", max_new_tokens=8, engine="onnxruntime-genai")
    assert model.generate("The capital of France is", max_new_tokens=8, engine="llama.cpp") == genai
    assert model.engine("llama.cpp").llm.n_threads == os.cpu_count()  # as the gate ran it (not its half default)
    assert main([str(artifact), "generate", "--prompt", "Hi", "--engine", "llama.cpp", "--max-new-tokens", "2"]) == 0
    assert "generating with llama.cpp" in capsys.readouterr().err


def test_the_server_gives_concurrent_llama_cpp_streams_each_its_own_answer(artifact: Path) -> None:
    """llama.cpp keeps one sequence: `serve --engine llama.cpp` serves streams one after another
    (interleaved on one context they read each other's cache)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn")
    from tests.runtime.test_serve import serving, streamed

    model = runtime.load(artifact)
    prompts = ["The capital of France is", "def mean(values):", "one two three one two", "Hello"]
    expected = [model.generate(p, max_new_tokens=12, engine="llama.cpp") for p in prompts]
    with serving(artifact, engine="llama.cpp") as url:
        assert streamed(url, prompts, 12) == expected


@pytest.mark.parametrize(
    ("model", "stage", "message"),
    [
        ("tiny_llama", {"formats": ["onnx-mlir"]}, "formats"),  # no such format
        ("tiny_llama", {"formats": ["gguf"], "gguf_types": ["Q4_K_X"]}, "gguf_types"),  # no such llama.cpp type
        ("tiny_bert", {"formats": ["gguf"]}, "builds decoder LMs"),  # GGUF of an encoder
    ],
)
def test_a_format_that_cannot_be_written_is_refused_before_anything_is_built(
    request: pytest.FixtureRequest, tmp_path: Path, model: str, stage: dict[str, object], message: str
) -> None:
    stage = {"kind": "genai", "candidates": [{"precision": "fp32"}], **stage}
    recipe = write_recipe(tmp_path, [stage], model=str(request.getfixturevalue(model)))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _converter_source(folder: Path) -> Path:
    """A llama.cpp source tree as far as validation reads it: the converter's registrations."""
    (folder / "conversion").mkdir(parents=True)
    (folder / "convert_hf_to_gguf.py").write_text("")
    (folder / "conversion" / "llama.py").write_text(
        '@ModelBase.register(\n    "LlamaForCausalLM",\n    "MistralForCausalLM",\n)\nclass LlamaModel: ...\n'
    )
    return folder


def test_a_checkpoint_the_converter_does_not_know_or_too_little_text_is_refused_by_validation(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimize.formats import llama_cpp

    monkeypatch.setenv("OPTIMIZE_LLAMA_CPP", str(_converter_source(tmp_path / "llama.cpp")))
    texts = (Path(__file__).resolve().parents[2] / "calibration" / "default.jsonl").read_text().splitlines()
    assert gguf_format.problem(tiny_llama, texts[:64]) is None  # known, and enough text
    short = gguf_format.problem(tiny_llama, ["a few words"])
    assert short is not None and f"needs at least {llama_cpp.tokens_needed()} tokens" in short
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    refused = gguf_format.problem(other, texts)
    assert refused is not None and "converter" in refused and "does not know NoSuchForCausalLM" in refused
    assert gguf_format.levels(tiny_llama, ["Q8_0", "Q4_K_M"]) == ("Q4_K_M", "Q8_0")  # smallest first


def _verdicts(artifact: Path) -> tuple[object, ...]:
    manifest = runtime.verify(artifact)
    tried = [(t["format"], t["bits"], t["passed"]) for t in manifest["stages"][0]["details"]["formats"]]
    engines = [(e["engine"], e["file"], e["gate"]["passed"]) for e in manifest["engines"]]
    return tried, engines, runtime.sha256_file(artifact / "gguf" / "model.gguf")


def test_the_gguf_and_its_verdict_are_the_same_warm_and_cold(artifact: Path, tiny_gguf: Path) -> None:
    """Rerun with the stage cache the first run filled (every step reused) and with --no-cache."""
    folder = artifact.parent
    warm = run_recipe(folder, [GGUF_STAGE], tiny_gguf, "--cache-dir", str(folder / "cache"), out="warm")
    cold = run_recipe(folder, [GGUF_STAGE], tiny_gguf, "--no-cache", out="cold")
    assert _verdicts(warm) == _verdicts(artifact) == _verdicts(cold)
    first = runtime.verify(artifact)["engines"]
    assert [e["metrics"] for e in runtime.verify(warm)["engines"]] == [e["metrics"] for e in first]
