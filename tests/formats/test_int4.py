"""optimize.formats.int4 / awq / gptq: a decoder's Linears on the symmetric int4 grid by each method,
AWQ's scales folded without changing what the float model computes, and the onnxruntime-genai folder
built from those exact codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from optimize.formats import awq, gptq, int4

TEXTS = [json.loads(line)["text"] for line in (Path(__file__).parents[2] / "calibration/default.jsonl").open()][:64]


def _model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.train(False)
    return model


def _logits(model, ids: list[int]):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits


def test_awqs_scales_fold_into_the_norms_and_up_projection_leaving_the_float_model_as_it_was(tiny_llama: Path):
    import torch

    model = _model(tiny_llama)
    names = int4.linears(model)
    ids = gptq.windows(tiny_llama, TEXTS, 64)[0]
    before = _logits(model, ids)
    hessians = gptq.hessians(model, names, gptq.windows(tiny_llama, TEXTS, 64))
    norm = model.get_submodule("model.layers.0.input_layernorm").weight.detach().clone()
    alphas = awq.scale(model, hessians, 32)
    assert set(alphas) == {
        f"model.layers.{i}.{producer}"
        for i in (0, 1)
        for producer in ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")
    }
    assert torch.allclose(_logits(model, ids), before, atol=1e-4)
    if alphas["model.layers.0.input_layernorm"] > 0:
        assert not torch.equal(model.get_submodule("model.layers.0.input_layernorm").weight, norm)
    # the Hessians follow the inputs: each reader's now sees x / s
    after = gptq.hessians(model, names, gptq.windows(tiny_llama, TEXTS, 64))
    for name in names:
        assert torch.allclose(after[name], hessians[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("method", int4.METHODS)
def test_each_method_leaves_every_linear_on_its_scales_grid(tiny_llama: Path, method: str):
    import torch

    model = _model(tiny_llama)
    names = int4.linears(model)
    scales = int4.round_model(model, names, tiny_llama, TEXTS, method, 32)
    assert set(scales) == set(names) and "lm_head" not in scales
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        codes = weight.reshape(weight.shape[0], -1, 32) / scales[name].unsqueeze(-1)
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.round().min() >= -8 and codes.round().max() <= 7


def test_gptq_moves_each_layers_outputs_on_the_calibration_inputs_less_than_the_nearest_step(tiny_llama: Path):
    import torch

    model = _model(tiny_llama)
    names = int4.linears(model)
    hessians = gptq.hessians(model, names, gptq.windows(tiny_llama, TEXTS, 64))
    for name in names:
        weight = model.get_submodule(name).weight.detach().double()
        rounded, _ = gptq.quantize(weight, hessians[name], 32)

        def moved(q: torch.Tensor, w: torch.Tensor = weight, h: torch.Tensor = hessians[name]) -> float:
            return float(torch.trace((w - q) @ h @ (w - q).T))

        assert moved(rounded) < moved(awq.nearest(weight, 32)), name


def test_an_empty_calibration_is_refused_not_rounded_to_zero(tiny_llama: Path):
    from optimize.errors import UsageError

    model = _model(tiny_llama)
    with pytest.raises(UsageError, match="calibration"):
        int4.round_model(model, int4.linears(model), tiny_llama, [], "gptq", 32)


def test_the_onnxruntime_genai_folder_of_gptq_computes_its_rounded_weights(tiny_llama: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime_genai")
    import onnx
    from onnx import numpy_helper

    from optimize.stages.genai_build import Candidate, build

    candidate = Candidate(precision="int4", algorithm="gptq")
    assert candidate.prequantized("cuda") and candidate.label() == "int4 gptq b32 a4"
    out = tmp_path / "gptq"
    build(tiny_llama, out, candidate, "cpu", tmp_path / "cache", TEXTS)
    model = _model(tiny_llama)
    scales = int4.round_model(model, int4.linears(model), tiny_llama, TEXTS, "gptq", 32)
    graph = onnx.load(str(out / "model.onnx"))
    weights = {i.name: i for i in graph.graph.initializer}
    down = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "layers.1/mlp/down_proj" in n.name)
    packed = numpy_helper.to_array(weights[down.input[1]])  # (N, blocks, 16)
    stored = numpy_helper.to_array(weights[down.input[2]]).reshape(packed.shape[0], -1)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32) - 8
    expected = model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().numpy()
    assert np.allclose(stored, scales["model.layers.1.mlp.down_proj"].numpy(), rtol=1e-6)
    assert np.allclose(codes * np.repeat(stored, 32, axis=1), expected, atol=1e-5)
    assert not (tmp_path / "gptq-input").exists() and not (tmp_path / "gptq-input-rounded").exists()


def test_a_tied_models_int4_with_an_int8_lm_head_loads(tiny_llama: Path, tmp_path: Path):
    """The builder's int8 LM head shared with a tied embedding wrote a graph onnxruntime refused
    ("Node input 'lm_head.MatMul.weight_Q8G64' is not a graph input"): the two are kept apart."""
    pytest.importorskip("onnxruntime_genai")
    import shutil

    import onnxruntime
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimize.stages.genai_build import Candidate, build

    tied = tmp_path / "tied"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    config.tie_word_embeddings = True
    LlamaForCausalLM(config).save_pretrained(tied)
    shutil.copyfile(tiny_llama / "tokenizer.json", tied / "tokenizer.json")
    for algorithm in ("default", "gptq"):
        candidate = Candidate(precision="int4", algorithm=algorithm, block_size=64, int8=["last_matmul"])
        build(tied, tmp_path / algorithm, candidate, "cpu", tmp_path / "cache", TEXTS)
        onnxruntime.InferenceSession(str(tmp_path / algorithm / "model.onnx"))
