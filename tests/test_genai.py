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
    with pytest.raises(ValueError):
        Sampling(top_p=0)


def test_a_chat_prompt_is_rendered_by_the_models_template_and_refused_without_one(built, tmp_path):
    from optimize.runtime.generation import chat_prompt

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    assert chat_prompt(tmp_path, "Hi") == "<|user|>Hi</s><|assistant|>"
    with pytest.raises(ValueError, match="no chat template"):
        load(built).generate("Hi", chat=True)
