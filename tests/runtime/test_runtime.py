"""The runtime bundled in every artifact: provider choice and fallback, hash checks, its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import runtime
from optimize.cli.commands import app
from tests import peers
from tests.conftest import ROOT, minilm_path, small_bert, write_recipe

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("available", "target", "expected"),
    [
        (ALL, "tensorrt", ALL),
        (ALL, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (ALL, "cpu", ["CPUExecutionProvider"]),
        (
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (["CPUExecutionProvider"], "tensorrt", ["CPUExecutionProvider"]),
        ([], "cuda", ["CPUExecutionProvider"]),
    ],
)
def test_providers_are_tried_best_first_within_what_the_target_allows(available, target, expected):
    assert runtime.select_providers(available, target) == expected


@pytest.fixture
def artifact(tiny_bert_artifact) -> Path:
    return tiny_bert_artifact


def test_gpu_providers_that_cannot_start_here_fall_back_to_cpu_and_say_why(artifact):
    model = runtime.OnnxModel(
        artifact / "model.onnx", artifact / "tokenizer.json", target="tensorrt", available=ALL, settings={"fp16": True}
    )
    assert model.provider == "CPUExecutionProvider"
    assert [n.split(":")[0] for n in model.fallbacks] == ALL[:2]


def test_provider_options_carry_the_tensorrt_engine_cache_and_precision_flags(tmp_path):
    options = runtime.provider_options("TensorrtExecutionProvider", {"fp16": True, "int8": True}, tmp_path)
    assert options["trt_fp16_enable"] and options["trt_int8_enable"] and options["trt_engine_cache_enable"]
    assert options["trt_engine_cache_path"].startswith(str(tmp_path))
    assert runtime.provider_options("CPUExecutionProvider", {}, tmp_path) == {}


def run_runtime(artifact: Path, *args: str, env: dict | None = None, python: str = sys.executable):
    # From the artifact folder, as a user would: `runtime` is the bundled package, not optimize's.
    return subprocess.run([python, "-m", "runtime", ".", *args], cwd=artifact, capture_output=True, text=True, env=env)


def test_the_runtime_cli_writes_the_embeddings_the_pipeline_computes(artifact, tmp_path):
    texts = ["A man is playing a guitar.", "Three dogs run on the beach."]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    proc = run_runtime(artifact, "embed", "--input", str(tmp_path / "texts.jsonl"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    expected = runtime.load(artifact).embed(texts)
    assert np.allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-5)
    assert "provider: CPUExecutionProvider" in proc.stderr


def test_one_changed_byte_makes_the_runtime_refuse_the_model_naming_the_file(artifact, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    proc = run_runtime(copy, "embed", "--input", "-")
    assert proc.returncode == 2
    assert "model.onnx" in proc.stderr and "sha256" in proc.stderr and "Traceback" not in proc.stderr


def test_the_runtime_imports_neither_torch_nor_optimize(artifact):
    code = (
        "import sys, runtime; runtime.load('.').embed(['hi']); "
        "sys.exit(int(any(m in sys.modules for m in ('torch', 'transformers', 'optimize'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=artifact).returncode == 0


@pytest.mark.slow
def test_a_fresh_environment_with_only_the_requirements_runs_a_minilm_artifact(tmp_path):
    """No torch, no transformers: only runtime/requirements.txt, and the embeddings the gate measured."""
    recipe = ROOT / "recipes" / "minilm-cpu.yaml"
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(out / "runtime" / "requirements.txt")],
        check=True,
        capture_output=True,
    )
    listed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in listed and "transformers" not in listed
    texts = ["A man is playing a guitar.", "A woman is slicing an onion.", "The stock market fell sharply."]
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run_runtime(out, "embed", "--input", str(tmp_path / "texts.txt"), env=env, python=python)
    assert proc.returncode == 0, proc.stderr
    got = np.array([json.loads(line)["embedding"] for line in proc.stdout.splitlines()])
    from optimize.evaluate.measure import TorchModel, fidelity
    from optimize.models.loading import open_checkpoint

    reference = TorchModel(open_checkpoint(str(minilm_path()), None, None), 128).embed(texts)
    assert fidelity(got, reference)["cosine_min"] >= 0.9999


def test_a_classifier_artifact_classifies_as_torch_does(tmp_path):
    """A sequence classifier goes through the pipeline (logit fidelity) and the runtime's classify
    gives torch's argmax label with its softmax score."""
    import torch

    folder = tmp_path / "classifier"
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model: Any = small_bert(
        folder,
        "BertForSequenceClassification",
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    model.eval()
    recipe = write_recipe(
        tmp_path, [{"kind": "compile", "gate": [{"metric": "top1_agreement", "min": 1.0}]}], model=str(folder)
    )
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["stages"][-1]["metrics"]
    assert metrics["top1_agreement"] == 1.0 and metrics["kl_div"] < 1e-6

    texts = ["a fine film", "the plot drags on and on", "it rains"]
    got = runtime.load(tmp_path / "out").classify(texts)
    tokenizer = runtime.Tokenizer(folder / "tokenizer.json")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in tokenizer(texts).items()}).logits
    probs = logits.softmax(-1)
    assert [g["label"] for g in got] == [labels[int(i)] for i in probs.argmax(-1)]
    assert [g["score"] for g in got] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


PLATFORMS = {  # (platform_system, platform_machine) -> the onnxruntime build pip must pick
    ("Linux", "x86_64"): "onnxruntime-gpu",
    ("Windows", "AMD64"): "onnxruntime-gpu",
    ("Linux", "aarch64"): "onnxruntime",
    ("Darwin", "arm64"): "onnxruntime",
    ("Darwin", "x86_64"): "onnxruntime",
}


def runtime_requirements() -> list:
    from packaging.requirements import Requirement

    from optimize.runtime.engines import BASE_REQUIREMENTS as RUNTIME_REQUIREMENTS

    return [Requirement(line) for line in RUNTIME_REQUIREMENTS if not line.startswith("#")]


@pytest.mark.parametrize(("system", "machine"), list(PLATFORMS))
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
def test_the_runtime_requirements_pick_one_onnxruntime_per_platform_as_pyproject_does(system, machine, python):
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    env = {"platform_system": system, "platform_machine": machine, "python_version": python}
    chosen = [r.name for r in runtime_requirements() if r.marker is None or r.marker.evaluate(env)]
    assert sorted(chosen) == sorted([PLATFORMS[system, machine], "numpy", "tokenizers"])
    assert all(not any(s.operator == "==" for s in r.specifier) for r in runtime_requirements())  # ranges
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ours = [Requirement(d) for d in project if Requirement(d).name.startswith("onnxruntime")]
    picked = [r.name for r in ours if r.marker is None or r.marker.evaluate(env)]
    build = PLATFORMS[system, machine]  # and the decoder engine paired with it
    assert sorted(picked) == sorted([build, "onnxruntime-genai-cuda" if build.endswith("gpu") else "onnxruntime-genai"])
    from optimize.runtime.engines import ENGINES

    engines = [Requirement(line) for line in ENGINES["onnxruntime-genai"].requirements]
    assert [r.name for r in engines if r.marker.evaluate(env)] == [n for n in picked if "genai" in n]


@pytest.mark.slow
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
def test_the_runtime_requirements_resolve_for_each_python_on_linux_x86_64(python, tmp_path):
    """pip resolves the file against the registry for that Python (wheels only, nothing installed)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(str(r) for r in runtime_requirements()) + "\n")
    version = python.replace(".", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--only-binary=:all:", "--ignore-installed"]
        + ["--python-version", version, "--target", str(tmp_path / "t")]
        + [f"--platform=manylinux_2_{glibc}_x86_64" for glibc in (17, 27, 28)]
        + ["-r", str(requirements)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_cls_pooled_model_embeds_as_its_authors_shipped_it_from_runtime_and_sentence_transformers(tmp_path):
    """The model's own pooling (CLS) and normalization, read from its sentence-transformers files,
    in the gate's reference, the runtime, and sentence-transformers loading the artifact."""
    st = pytest.importorskip("sentence_transformers")
    from optimize.evaluate.measure import fidelity

    checkpoint = tmp_path / "cls-model"  # laid out as sentence-transformers saves a model
    small_bert(checkpoint, initializer_range=0.3)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (checkpoint / "modules.json").write_text(
        json.dumps(
            [
                {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
                for i, (path, kind) in enumerate(modules)
            ]
        )
    )
    (checkpoint / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (checkpoint / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (checkpoint / "2_Normalize").mkdir()
    (checkpoint / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["compile", str(checkpoint), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    texts = ["A man is playing a guitar.", "A woman is slicing an onion.", "The stock market fell sharply today."]
    texts.append(" ".join(["a long text, cut at the model's max_seq_length of 64 tokens"] * 12))
    ours = runtime.load(out, available=["CPUExecutionProvider"]).embed(texts)
    original = st.SentenceTransformer(str(checkpoint), device="cpu").encode(texts)
    onnx = peers.st_encode(out, texts, "onnx", {"file_name": "model.onnx"})  # optimum's loader, in its own venv
    for other in (original, onnx):
        assert fidelity(ours, other)["cosine_min"] >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the Normalize module was applied
    mean = runtime.Pooling("mean", True)
    model = runtime.load(out, available=["CPUExecutionProvider"])
    inputs = model.tokenizer(texts)
    assert fidelity(mean(model.run(inputs), inputs["attention_mask"]), ours)["cosine_min"] < 0.99  # CLS mattered
