"""int8 must not destroy encoders of other architectures than MiniLM (issue 9: a 12-layer encoder's
int8 embeddings were noise, cosine 0.01 to its float model, and shipped as "passed").

Tiny random models of each architecture (transformers builds them offline from a config) go
through export and all-int8, and must keep their sentence embeddings on held-out texts. The weights
are drawn wider than transformers' default (std 0.2, not 0.02) so the layers, not the embedding
table, shape the output: at 0.02 a random encoder's output barely depends on its layers and any
quantization looks harmless.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import cpu
from optimize.cli.commands import app
from optimize.stages.quantize import QuantizeStage
from optimize.stages.quantize_methods import int8_weight_range
from tests.conftest import TOKENIZER_FILES, minilm_path, write_recipe

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "initializer_range": 0.2,
}
ARCHITECTURES = {
    "bert": ("BertConfig", SMALL),
    "roberta": ("RobertaConfig", {**SMALL, "max_position_embeddings": 514}),
    "xlm-roberta": ("XLMRobertaConfig", {**SMALL, "max_position_embeddings": 514}),
    "mpnet": ("MPNetConfig", {**SMALL, "max_position_embeddings": 514}),
    "electra": ("ElectraConfig", {**SMALL, "embedding_size": 32}),
    "deberta-v2": ("DebertaV2Config", SMALL),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 30522, "initializer_range": 0.2},
    ),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_int8_keeps_the_sentence_embeddings_of_each_encoder_architecture(architecture, tmp_path):
    import torch
    import transformers

    config_class, fields = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(getattr(transformers, config_class)(**fields))
    folder = tmp_path / architecture
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_path() / name, folder / name)
    stage = {
        "kind": "quantize",
        "precision": "int8",
        "require_speedup": False,
        "gate": [{"metric": "cosine_mean", "min": 0.98}],
    }
    recipe = write_recipe(tmp_path, [stage], model=str(folder))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    report = json.loads(result.stdout)
    quantized = report["stages"][-1]
    print(architecture, quantized["metrics"]["cosine_mean"], quantized["metrics"]["cosine_min"])
    assert result.exit_code == 0, report["error"]
    assert quantized["kind"] == "quantize" and quantized["metrics"]["cosine_mean"] >= 0.98


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "s8-reduced"),  # AVX2 only: 16-bit pair sums would saturate
        ({"avx2", "avx512f", "avx512_vnni"}, "s8"),
        ({"avx2", "avx_vnni"}, "s8"),
        ({"asimd", "asimddp"}, "s8"),  # ARM with the dot-product extension
        (set(), "s8-reduced"),  # unknown CPU: the safe choice
    ],
)
def test_the_int8_weight_range_follows_what_the_cpu_can_sum_without_saturating(flags, expected):
    assert int8_weight_range("auto", cpu.CpuInfo("test cpu", frozenset(flags))) == expected
    assert int8_weight_range("s8", cpu.CpuInfo("x", frozenset(flags))) == "s8"  # a recipe may insist


def _saturating_matmul(path):
    """One MatMul whose int8 product saturates 16-bit pair sums: positive activations (uint8 up to
    255) against weights that, in every pair of rows, are both at the column's maximum (int8 +-127):
    255 x 127 x 2 = 64,770 > 32,767."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    signs = np.repeat(rng.choice([-1.0, 1.0], size=(32, 64)), 2, axis=0).astype(np.float32)  # rows in equal pairs
    weight = signs * rng.uniform(0.9, 1.0, size=(64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="MatMul_0")],
        "saturates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return rng.uniform(0.5, 1.0, size=(64, 64)).astype(np.float32)


def test_the_int8_weights_chosen_for_this_cpu_do_not_saturate(tmp_path):
    import onnxruntime as ort

    from optimize.models.handle import ModelHandle
    from optimize.stages.quantize import build

    inputs = _saturating_matmul(tmp_path / "float.onnx")
    source = ModelHandle(tmp_path, "feature-extraction", onnx_path=tmp_path / "float.onnx")

    def output(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": inputs})[0]

    expected = output(tmp_path / "float.onnx")
    chosen = int8_weight_range("auto", cpu.current())
    # the safe range and u8u8 everywhere, and full range where this CPU is said to sum it safely
    for weights in {"s8-reduced", "u8", chosen}:
        config = QuantizeStage(precision="int8", method={"name": "dynamic", "weights": weights})
        quantized = build(config, source, {"MatMul_0": "int8"}, tmp_path / f"{weights}.onnx", None)  # type: ignore[arg-type]
        got = output(quantized.onnx_path)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error < 0.05, f"{weights} on {cpu.current().model}: relative error {error:.3f}"
