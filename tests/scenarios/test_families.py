"""The architectures users bring today, each as a tiny random model built from its transformers
config (a real tokenizer beside it), through the CLI with defaults as a new user runs it:
`optimize compile` exits 0 and the artifact's runtime greedy-generates, token for token, what
transformers generates (decoders) or embeds as torch does (encoders); `optimize quantize` exits 0 or
3 (a gate may fail on a random model), never 1."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from tests.conftest import TOKENIZER_FILES, minilm_path, write_recipe

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 1,
}
# model_type -> what its config needs beyond SMALL to be small and valid (two layers of each kind)
DECODERS: dict[str, dict[str, object]] = {
    "qwen3_5_text": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "gemma4_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 8,
        "vocab_size_per_layer_input": 300,
        "hidden_size_per_layer_input": 8,
    },
    "smollm3": {},
    "olmo3": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
    "llama4_text": {"num_local_experts": 2, "intermediate_size_mlp": 128, "attention_chunk_size": 8},
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_ff_dim": 128},
    "phi3": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"rotary_pct": 0.25},
    "qwen3": {},
}
ENCODERS: dict[str, dict[str, object]] = {
    "nomic_bert": {},
    "eurobert": {},
    "modernbert": {},
    "jina_embeddings_v3": {},
    "embedding_gemma2_text": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
}
PROMPT = "The capital of France is"


def tiny(model_type: str, folder: Path, bpe_tokenizer: Path) -> Path:
    """A random model of `model_type`, SMALL, saved as safetensors in `folder` with its tokenizer:
    a decoder with the 300-token BPE, an encoder with MiniLM's WordPiece."""
    import torch
    import transformers

    decoder = model_type in DECODERS
    extra = DECODERS[model_type] if decoder else ENCODERS[model_type]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, **{**SMALL, "vocab_size": 300 if decoder else 30522, **extra}
    )
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
    auto.from_config(config).save_pretrained(folder)
    if decoder:
        shutil.copyfile(bpe_tokenizer, folder / "tokenizer.json")
    for name in () if decoder else TOKENIZER_FILES:
        shutil.copyfile(minilm_path() / name, folder / name)
    return folder


def invoke(*args: str) -> int:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code in (0, 3), result.output  # never 1 (a bug) nor 2 (refused)
    return result.exit_code


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_a_decoder_compiles_and_its_runtime_generates_what_transformers_generates(
    model_type: str, bpe_tokenizer: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = tiny(model_type, tmp_path / "model", bpe_tokenizer)
    out = tmp_path / "out"
    assert invoke("compile", str(checkpoint), "-o", str(out)) == 0
    model = runtime.load(out)
    ids = model.prompt_ids(PROMPT)
    generated = list(islice(model.tokens(ids, runtime.Sampling(max_new_tokens=12)), 12))
    with torch.inference_mode():
        reference = (
            AutoModelForCausalLM.from_pretrained(checkpoint)
            .generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
            .tolist()
        )
    expected = reference[: reference.index(1)] if 1 in reference else reference  # up to the end of sequence
    assert generated == expected
    exported = json.loads((out / "manifest.json").read_text())["stages"][0]
    assert exported["name"] == "export" and exported["config"]["route"] in ("kv-cache", "whole-sequence")


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_an_encoder_compiles_and_embeds_as_torch_does(model_type: str, bpe_tokenizer: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel

    checkpoint = tiny(model_type, tmp_path / "model", bpe_tokenizer)
    out = tmp_path / "out"
    assert invoke("compile", str(checkpoint), "-o", str(out)) == 0
    texts = ["a cat sat on the mat", "the weather is fine today, is it not?"]
    embedded = runtime.load(out).embed(texts)
    model = AutoModel.from_pretrained(checkpoint).eval()
    for text, row in zip(texts, embedded, strict=True):
        inputs = runtime.Tokenizer(checkpoint / "tokenizer.json", 128)([text])
        with torch.inference_mode():
            hidden = model(**{k: torch.from_numpy(v) for k, v in inputs.items() if k != "token_type_ids"})[0]
        np.testing.assert_allclose(row, hidden[0].mean(0).numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(DECODERS) + sorted(ENCODERS))
def test_quantize_takes_every_family_to_a_verdict(model_type: str, bpe_tokenizer: Path, tmp_path: Path) -> None:
    checkpoint = tiny(model_type, tmp_path / "model", bpe_tokenizer)
    # the quantize stage's defaults, on the tests' small calibration set (32 texts of 32 tokens)
    recipe = write_recipe(tmp_path, [{"kind": "quantize"}])
    invoke("quantize", str(checkpoint), "-r", str(recipe), "-o", str(tmp_path / "out"))
