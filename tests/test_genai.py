"""Decoders through onnxruntime-genai's model builder (the genai stage) and the runtime's generation:
sampling with a seed, stop strings, streaming. A tiny random Llama, seconds each."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize.cli import app
from optimize.runtime.generation import Sampling, pick
from tests.conftest import write_recipe

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    """The tiny Llama through a genai stage whose first candidate (int4) cannot hold the gate."""
    folder = tmp_path_factory.mktemp("genai")
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "int4", "block_size": 32}, {"precision": "fp32"}],
        "gate": [{"metric": "top1_agreement", "min": 0.999}, {"metric": "kl_div", "max": 1e-4}],
    }
    recipe = write_recipe(folder, [stage], model=str(tiny_llama))
    out = folder / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def load(artifact):
    sys.path.insert(0, str(artifact))
    try:
        import runtime

        return runtime.load(artifact, available=["CPUExecutionProvider"])
    finally:
        sys.path.remove(str(artifact))
        sys.modules.pop("runtime", None)
        sys.modules.pop("runtime.generation", None)


def test_the_builder_search_records_every_candidate_and_keeps_the_first_that_holds(built):
    manifest = json.loads((built / "manifest.json").read_text())
    decisions = manifest["stages"][0]["details"]
    assert [c["passed"] for c in decisions["candidates"]] == [False, True]
    assert decisions["chosen"] == "fp32" and manifest["runtime"]["engine"] == "onnxruntime-genai"
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "config.json"} <= set(manifest["files"])


def test_greedy_generation_through_genai_equals_torch(built, tiny_llama):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = load(built)
    text = model.generate("the model", max_new_tokens=8)
    assert model._genai is not None  # onnxruntime-genai's loop made it
    torch_model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("the model").ids])
    expected = torch_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert text == tokenizer.decode(expected.tolist())


def test_sampling_repeats_with_its_seed_and_streams_the_same_text_it_returns(built):
    model = load(built)
    options = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = model.generate("the model", seed=3, **options)
    pieces: list[str] = []
    again = model.generate("the model", seed=3, on_text=pieces.append, **options)
    assert first == again == "".join(pieces) and len(pieces) > 1
    assert model.generate("the model", seed=4, **options) != first


def test_generation_ends_before_a_stop_string(built):
    model = load(built)
    full = model.generate("the model", max_new_tokens=12)
    stop = full[4:7]
    assert stop and model.generate("the model", max_new_tokens=12, stop=[stop]) == full[: full.find(stop)]


def test_the_sampler_follows_temperature_top_k_and_top_p():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    rng = np.random.default_rng(0)
    assert pick(logits, Sampling(), rng) == 1  # greedy
    assert {pick(logits, Sampling(temperature=5.0, top_k=1), rng) for _ in range(20)} == {1}
    assert {pick(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(50)} <= {1, 3}
    drawn = {pick(logits, Sampling(temperature=100.0), rng) for _ in range(200)}
    assert drawn == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_a_chat_prompt_is_rendered_by_the_models_template_and_refused_without_one(built, tmp_path):
    from optimize.runtime.generation import chat_prompt

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    assert chat_prompt(tmp_path, "Hi") == "<|user|>Hi</s><|assistant|>"
    with pytest.raises(ValueError, match="no chat template"):
        load(built).generate("Hi", chat=True)


def test_minmax_int4_lands_exactly_on_weights_dequantized_from_a_4_bit_grid(tiny_llama, tmp_path):
    """Weights put on a Q4_1-style grid (blocks of 32: d * q + m) come back exactly: the int4 model
    then agrees with its float reference as closely as float activations allow."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "on-grid"
    shutil.copytree(tiny_llama, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out, k = module.weight.shape
                scale = torch.rand(out, k // 32, 1, generator=generator) * 0.02 + 0.005
                low = -torch.rand(out, k // 32, 1, generator=generator) * 0.1
                q = torch.randint(0, 16, (out, k // 32, 32), generator=generator).float()
                q[..., 0], q[..., 1] = 0, 15  # every block spans its grid, as Q4_1's do
                module.weight.copy_((low + scale * q).reshape(out, k))
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder, safe_serialization=True)
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "int4", "algorithm": "minmax", "accuracy_level": 1}],
        "gate": [{"metric": "top1_agreement", "min": 0.99}, {"metric": "kl_div", "max": 1e-3}],
    }
    recipe = write_recipe(tmp_path, [stage], model=str(folder))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    tried = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]["candidates"][0]
    assert tried["reconstruction"]["max_error_4bit"] < 1e-6
    assert "max_error_embedding" in tried["reconstruction"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # the 4-bit weights, and the blocks' minimums
    assert "GatherBlockQuantized" in ops  # the 8-bit embedding
    assert load(out).generate("the model", max_new_tokens=4)  # onnxruntime-genai runs it
