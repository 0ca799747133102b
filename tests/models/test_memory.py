"""Models of real size: the peak memory of a run estimated from the checkpoint's headers before
anything loads (a model that cannot fit is refused with the figures), and a worker process that
dies reported as what it is (exit 4), never as a traceback."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.models import memory
from optimize.stages import genai, genai_build
from tests.conftest import write_recipe

# Llama-3-8B's shape: what the estimate reads is the header, so the weights are a sparse file
EIGHT_B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32}
EIGHT_B |= {"num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}


def _eight_b(folder: Path, tiny_llama: Path) -> tuple[Path, int]:
    """A checkpoint folder of Llama-3-8B's shape whose safetensors header is real and whose data is a hole."""
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text()) | EIGHT_B
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(tiny_llama / "tokenizer.json", folder / "tokenizer.json")
    hidden, ffn, kv, vocab = 4096, 14336, 1024, 128256
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(32):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": [hidden, hidden],
            prefix + "self_attn.o_proj.weight": [hidden, hidden],
        }
        shapes |= {prefix + "self_attn.k_proj.weight": [kv, hidden], prefix + "self_attn.v_proj.weight": [kv, hidden]}
        shapes |= {prefix + f"mlp.{n}.weight": [ffn, hidden] for n in ("gate_proj", "up_proj")}
        shapes |= {prefix + "mlp.down_proj.weight": [hidden, ffn]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with (folder / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # a hole: nothing is written, nothing can be read
    return folder, sum(s[0] * s[1] for s in shapes.values())


def test_an_8b_checkpoint_is_refused_from_its_header_with_the_estimate(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "available_mb", lambda: 12 * 1024.0)  # a 16 GB machine's, whatever runs the test
    checkpoint, count = _eight_b(tmp_path / "llama-8b", tiny_llama)
    assert memory.parameters(checkpoint) == count and 8.0e9 < count < 8.1e9
    need, kind = memory.estimate_mb(checkpoint, [genai.GenAIStage()])  # type: ignore[misc]
    base, per_byte = genai.GenAIStage().peak_memory()
    assert kind == "genai" and need == pytest.approx(base + per_byte * count * 2 / 2**20) and need > 12 * 1024
    recipe = write_recipe(tmp_path, [{"kind": "genai"}], model=str(checkpoint))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "(8.03B parameters) needs about" in said and "GiB available" in said and "--force" in said
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_model_that_fits_is_not_held_back(tiny_llama: Path) -> None:
    need, _ = memory.estimate_mb(tiny_llama, [genai.GenAIStage()])  # type: ignore[misc]
    assert need < memory.available_mb()
    memory.check(tiny_llama, [genai.GenAIStage()], force=False)  # no error
    assert memory.estimate_mb(tiny_llama, []) is None  # no measured stage: no estimate


def test_a_killed_builder_is_reported_as_killed_with_exit_4(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real builder process, killed with SIGKILL once it runs (as the out-of-memory killer does)."""
    real = subprocess.Popen

    def killed(command: list[str], **options: Any) -> subprocess.Popen[str]:
        proc = real(command, **options)
        if "onnxruntime_genai.models.builder" in command:
            threading.Timer(1.0, proc.kill).start()
        return proc

    monkeypatch.setattr(genai_build.subprocess, "Popen", killed)
    recipe = write_recipe(tmp_path, [{"kind": "genai", "candidates": [{"precision": "fp32"}]}], model=str(tiny_llama))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 4, result.output
    said = " ".join(result.output.split())
    assert "model builder was killed by SIGKILL" in said and "out-of-memory killer" in said
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_lean_loader_fills_the_model_transformers_loads_and_steps_aside_when_names_differ(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from optimize.models import lean as model
    from optimize.models.lean import lean_torch

    ids = torch.tensor([list(range(3, 40))])
    lean = lean_torch(AutoModelForCausalLM, tiny_llama)
    assert lean is not None
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()(ids).logits
        assert torch.equal(lean.eval()(ids).logits, expected)
    weights = load_file(tiny_llama / "model.safetensors")
    half = tmp_path / "bf16"  # kept in bf16, computed in fp32: transformers' fp32 load of it, exactly
    shutil.copytree(tiny_llama, half)
    save_file({k: v.bfloat16() for k, v in weights.items()}, half / "model.safetensors")
    lean = lean_torch(AutoModelForCausalLM, half)
    assert lean is not None
    stored = {p.dtype for p in lean.parameters() if p.dim() == 2}
    with torch.inference_mode():
        wide = AutoModelForCausalLM.from_pretrained(half, attn_implementation="eager", dtype=torch.float32).eval()
        assert stored == {torch.bfloat16} and {p.dtype for p in wide.parameters()} == {torch.float32}
        assert torch.equal(lean.eval()(ids).logits, wide(ids).logits)
        monkeypatch.setattr(model, "WIDENED_ROWS", 7)  # a head wider than that: widened 7 rows at a time
        sliced = lean_torch(AutoModelForCausalLM, half)
        assert sliced is not None and isinstance(sliced.lm_head.forward, functools.partial)
        torch.testing.assert_close(sliced.eval()(ids).logits, wide(ids).logits, rtol=1e-6, atol=1e-6)
    renamed = tmp_path / "renamed"  # names transformers maps (a prefix) but the lean loader does not know
    shutil.copytree(tiny_llama, renamed)
    save_file({"base." + k: v for k, v in weights.items()}, renamed / "model.safetensors")
    assert lean_torch(AutoModelForCausalLM, renamed) is None


@pytest.mark.parametrize(
    ("cgroup", "files", "expected"),
    [
        ("0::/job\n", {"job/memory.max": "4294967296", "job/memory.current": "1073741824"}, 3072.0),
        ("0::/job\n", {"job/memory.max": "max", "job/memory.current": "1073741824"}, 20480.0),
        ("4:memory:/box\n0::/\n", {"memory/box/memory.limit_in_bytes": "8589934592",
                                   "memory/box/memory.usage_in_bytes": "1073741824"}, 7168.0),
        ("4:memory:/box\n", {"memory/box/memory.limit_in_bytes": "9223372036854771712",
                             "memory/box/memory.usage_in_bytes": "1073741824"}, 20480.0),
        ("4:memory:/docker/x\n", {"memory/memory.limit_in_bytes": "2147483648",  # a container's own, at the root
                                  "memory/memory.usage_in_bytes": "0"}, 2048.0),
    ],
)  # fmt: skip
def test_what_is_available_is_the_containers_limit_where_its_cgroup_has_one(
    tmp_path: Path, cgroup: str, files: dict[str, str], expected: float
) -> None:
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (cgroups / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / name).write_text(text + "\n")
    assert memory.available_mb(proc, cgroups) == expected


def test_a_refusal_says_what_in_the_recipe_needs_less(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimize.errors import UsageError

    monkeypatch.setattr(memory, "available_mb", lambda: 12 * 1024.0)
    checkpoint, count = _eight_b(tmp_path / "llama-8b", tiny_llama)
    builders = genai.GenAIStage.model_validate({"candidates": [{"precision": "int4", "algorithm": "rtn"}]})
    with pytest.raises(UsageError) as refused:
        memory.check(checkpoint, [builders], force=False)
    base, per_mb = genai.BUILDER_PEAK
    said = str(refused.value)
    assert f"needs about {(base + per_mb * count * 2 / 2**20) / 1024:.1f} GiB" in said
    assert "with candidates: [{precision: int4}] alone" in said and "--force" in said
    with pytest.raises(UsageError) as refused:  # the default candidate: nothing in the recipe needs less
        memory.check(checkpoint, [genai.GenAIStage()], force=False)
    assert "candidates" not in str(refused.value)
    memory.check(checkpoint, [builders], force=True)  # --force: tried anyway


def test_a_scratch_folder_too_small_for_the_build_is_refused_before_anything_loads(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def free(folder: Path) -> float:
        seen.append(folder)
        return 0.0

    monkeypatch.setattr(memory, "free_mb", free)
    recipe = write_recipe(tmp_path, [{"kind": "genai"}], model=str(tiny_llama))
    cache = tmp_path / "cache"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "the genai stage writes about" in said and "scratch folder" in said and "TMPDIR" in said
    assert seen and seen[0].parent == cache  # the run's own scratch folder, under --cache-dir
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith("optimize-")] == []  # removed again
    memory.check_disk(tiny_llama, [genai.GenAIStage()], tmp_path, force=True)  # --force: tried anyway
