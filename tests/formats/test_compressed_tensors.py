"""optimize.formats.compressed_tensors: a decoder's compressed-tensors folder (vLLM, SGLang), written beside the
onnxruntime-genai folder at the smallest precision whose gate holds through transformers' loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimize import runtime
from optimize.formats import compressed_tensors as compressed
from tests.conftest import run_recipe

pytest.importorskip("compressed_tensors")
pytest.importorskip("onnxruntime_genai")


def _built(folder: Path, model: Path, methods: list[str], top1: float) -> Path:
    """An fp32 genai build of `model` with compressed-tensors beside it, int4 by `methods` first."""
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "fp32"}],
        "formats": ["compressed-tensors"],
        "int4_methods": methods,
        "gate": [{"metric": "top1_agreement", "min": top1}],
    }
    return run_recipe(folder, [stage], model, "--json")


@pytest.fixture(scope="module")
def artifact(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built(tmp_path_factory.mktemp("compressed"), tiny_llama, ["rtn"], 0.9)


@pytest.fixture(scope="module")
def calibrated(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same at int4 by each calibrated method, a gate every int4 holds: gptq's folder ships."""
    return _built(tmp_path_factory.mktemp("calibrated"), tiny_llama, ["gptq", "awq"], 0.0)


def test_the_folder_carries_the_quantization_config_vllm_reads(artifact: Path) -> None:
    manifest = runtime.verify(artifact)
    tried = manifest["stages"][0]["details"]["formats"]
    assert tried[0]["bits"] == 4 and tried[-1]["passed"]  # the smallest first, the last held
    bits = tried[-1]["bits"]
    config = json.loads((artifact / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    weights = group["weights"]
    assert weights["num_bits"] == bits and weights["type"] == "int" and weights["symmetric"] is True
    assert (weights["strategy"], weights["group_size"]) == (("group", 32) if bits == 4 else ("channel", None))
    listed = {e["engine"]: e for e in manifest["engines"]}
    assert (
        listed["compressed-tensors"]["file"] == "compressed-tensors" and listed["compressed-tensors"]["gate"]["passed"]
    )
    assert listed["onnxruntime-genai"]["file"] == "model.onnx"


def test_transformers_reloads_exactly_the_codes_and_scales_written(artifact: Path, tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    shipped = runtime.verify(artifact)["stages"][0]["details"]["formats"][-1]
    bits, group = shipped["bits"], shipped["written"]["group_size"]
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    decompressed = CompressedTensorsConfig(run_compressed=False)  # dense weights, as vLLM's kernels compute
    folder = artifact / "compressed-tensors"
    reloaded = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, quantization_config=decompressed)
    top = 2 ** (bits - 1) - 1
    for name, module in original.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        rows = w.reshape(w.shape[0], -1, group) if bits == 4 else w.unsqueeze(1)
        scale = rows.abs().amax(-1, keepdim=True) / top
        expected = (torch.clamp(torch.round(rows / scale), -top - 1, top) * scale).reshape(w.shape)
        got = reloaded.get_submodule(name).weight.detach()
        assert (got - expected).abs().max().item() < 1e-6, name
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.isfinite(reloaded(ids).logits).all()


def test_a_calibrated_int4_folder_reloads_on_its_grid_and_says_how_it_was_rounded(calibrated: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    tried = runtime.verify(calibrated)["stages"][0]["details"]["formats"]
    written = [(t["level"], t["written"]["method"], t["written"]["group_size"]) for t in tried]
    assert written == [("int4-gptq-g32", "gptq", 32)]  # the first held
    folder = calibrated / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (config["weights"]["num_bits"], config["weights"]["group_size"]) == (4, 32)
    packed = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)  # codes and scales as stored
    dense = AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    linear = dense.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    scale = packed.get_submodule("model.layers.0.mlp.down_proj").weight_scale.detach().float()
    codes = linear.reshape(linear.shape[0], -1, 32) / scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= 8


def test_calibrated_int4_ships_the_same_bytes_and_verdicts_cold_warm_and_without_the_cache(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import hashlib

    stage = {
        "kind": "genai",
        "candidates": [{"precision": "int4", "algorithm": "gptq", "block_size": 32}],
        "formats": ["compressed-tensors"],
        "int4_methods": ["awq", "gptq"],
        "gate": [{"metric": "top1_agreement", "min": 0.0}],
    }
    runs = [
        run_recipe(tmp_path, [stage], tiny_llama, *flags, out=out)
        for out, flags in (("cold", ()), ("warm", ()), ("fresh", ("--no-cache",)))
    ]

    def shipped(artifact: Path) -> tuple[object, ...]:
        details = runtime.verify(artifact)["stages"][0]["details"]
        files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.parent.name in ("compressed-tensors", "out"))
        digests = {p.relative_to(artifact).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        timeless = ("latency", "throughput")
        verdicts = [
            (t["level"], t["passed"], {k: v for k, v in t["metrics"].items() if not k.startswith(timeless)})
            for t in details["formats"]
        ]
        candidates = [(c["label"], c["passed"], c["metrics"].get("top1_agreement")) for c in details["candidates"]]
        onnx = hashlib.sha256((artifact / "model.onnx").read_bytes()).hexdigest()
        return digests.get("compressed-tensors/model.safetensors"), onnx, verdicts, candidates

    cold = shipped(runs[0])
    assert cold[0] is not None and [shipped(r) for r in runs[1:]] == [cold, cold]


def test_a_plan_that_splits_a_fused_shard_is_widened_to_the_whole_shard() -> None:
    kept, notes = compressed.merge_fused(["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"])
    assert kept == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert len(notes) == 2 and "fused shard" in notes[0]
    assert compressed.merge_fused(["model.layers.0.mlp.down_proj"]) == (["model.layers.0.mlp.down_proj"], [])


def test_the_group_is_the_largest_vllm_takes_that_divides_every_width() -> None:
    assert compressed.group_size([576, 1536]) == 64  # SmolLM2: 576 = 9 x 64
    assert compressed.group_size([4096, 11008]) == 128 and compressed.group_size([32, 64]) == 32


def test_each_int4_method_is_tried_at_the_largest_group_then_at_32_before_int8(tiny_llama: Path, tmp_path: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    assert compressed.levels(tiny_llama, ["gptq", "rtn"]) == ("int4-gptq-g32", "int4-rtn-g32", 8)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert compressed.levels(tmp_path, ["gptq"]) == ("int4-gptq-g128", "int4-gptq-g32", 8)
    assert compressed.route(tmp_path, ["gptq"]).startswith("symmetric int4-gptq-g128, then int4-gptq-g32, then int8")


def test_vllms_int4_kernel_limits_are_named() -> None:
    assert compressed.limits(4, {"a.q_proj": 576, "a.o_proj": 512})[0].startswith("vLLM's int4 GPU kernels")
    assert compressed.limits(4, {"a.o_proj": 512}) == [] and compressed.limits(8, {"a.q_proj": 576}) == []
