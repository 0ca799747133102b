"""The builder's int4 from a checkpoint quantized here one tensor at a time (optimize/formats/genai_prequantized.py)
computes what the builder's own int4 computes from the float checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from optimize.formats import genai_prequantized as prequantize
from optimize.stages.genai import Candidate, build

pytest.importorskip("onnxruntime_genai")


def _logits(folder, ids):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    return np.asarray(generator.get_output("logits"))


def test_a_prequantized_build_computes_the_logits_of_the_builders_own_int4(tiny_llama, tmp_path):
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"  # what users bring: the reader widens bf16 the way transformers does
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(bf16)
    (bf16 / "tokenizer.json").write_bytes((tiny_llama / "tokenizer.json").read_bytes())
    candidate = Candidate(precision="int4")
    assert candidate.prequantized("cpu") and prequantize.applies(bf16, 32)
    ours = tmp_path / "ours"
    build(bf16, ours, candidate, "cpu", tmp_path / "cache")
    theirs = tmp_path / "theirs"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(bf16), "-o", str(theirs)]
    command += ["-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]
    command += ["--extra_options", *candidate.builder_options()]
    subprocess.run(command, check=True, capture_output=True)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 290, 40)]
    assert np.array_equal(_logits(ours, ids), _logits(theirs, ids))
    nodes = [n for n in onnx.load(str(ours / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 5 + 1  # per layer qkv, o, gate, up, down; the LM head (quantized by the builder)
    # the default zero point (8) is implied, as in the builder's own symmetric graph
    assert {len(n.input) for n in nodes} == {3}
    assert not (tmp_path / "ours-input").exists()  # the quantized checkpoint is gone once built


def test_checkpoints_the_writer_cannot_read_go_to_the_builder_as_they_are(tiny_llama):
    assert prequantize.applies(tiny_llama, 32)
    assert not prequantize.applies(tiny_llama, 64)  # hidden 32: not a whole block of 64
    assert not Candidate(precision="int4", algorithm="rtn").prequantized("cpu")
    assert not Candidate(precision="int4", symmetric=False).prequantized("cpu")
    assert not Candidate(precision="int4", int8=["last_matmul"]).prequantized("cpu")
    assert not Candidate(precision="int4").prequantized("cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_weight_is_read_widened_and_transposed_band_by_band_exactly(dtype, tmp_path):
    import torch
    from safetensors.torch import save_file

    from optimize.models.safetensors import ROWS, header, read_float_transposed

    weight = torch.randn(ROWS * 2 + 17, 48).to(getattr(torch, dtype))  # three bands, the last one short
    save_file({"w": weight}, tmp_path / "w.safetensors")
    tensors, start = header(tmp_path / "w.safetensors")
    read = read_float_transposed(tmp_path / "w.safetensors", start, tensors["w"])
    assert read.dtype == np.float32 and read.flags.c_contiguous
    assert np.array_equal(read, weight.float().T.numpy())


def test_a_checkpoint_cut_short_is_bad_input_not_a_hang(tiny_llama, tmp_path):
    from optimize.errors import UsageError
    from optimize.models.safetensors import header, read_float_transposed

    cut = tmp_path / "model.safetensors"
    data = (tiny_llama / "model.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    tensors, start = header(cut)
    last = max(tensors.values(), key=lambda e: e["data_offsets"][1])
    with pytest.raises(UsageError, match="ends before the tensors"):
        read_float_transposed(cut, start, last)
