"""optimize.formats.openvino_genai: a decoder folder OpenVINO GenAI's LLMPipeline loads as it is, its
weights on the genai stage's grid (exact for a Q4_1 GGUF), gated through OpenVINO's CPU plugin with
the KV cache it keeps, and generated from by the runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from optimize import runtime
from optimize.formats import openvino_genai
from optimize.models.gguf_input import from_gguf
from optimize.runtime.decoding import Sampling
from optimize.runtime.engine_openvino_genai import OpenVinoGenAIEngine
from tests.conftest import run_recipe

pytest.importorskip("openvino_genai")
pytest.importorskip("onnxruntime_genai")

STAGE = {
    "kind": "genai",
    "candidates": [{"precision": "fp32"}],
    "formats": ["openvino-genai"],
    "gate": [{"metric": "cosine_mean", "min": 0.99}],
}
PROMPTS = ["The capital of France is", "def mean(values):\n    total = 0\n    for", "one two three one two three one"]


@pytest.fixture(scope="module")
def artifact(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ov-genai-run")
    return run_recipe(folder, [STAGE], tiny_gguf, "--json", "--cache-dir", str(folder / "cache"))


def test_int4_on_the_q4_1_grid_is_shipped_and_gated_through_openvino(artifact: Path) -> None:
    manifest = runtime.verify(artifact)
    tried = manifest["stages"][0]["details"]["formats"]
    assert [(t["format"], t["bits"], t["passed"]) for t in tried] == [("openvino-genai", 4, True)]
    assert tried[0]["loader"] == openvino_genai.loader()
    # 7 per layer; the tied table and the head (the ONNX export keeps the head as its own constant)
    assert tried[0]["written"]["tensors"] == {"Q4_1": 14, "Q8_0": 2}
    assert tried[0]["written"]["max_error_4bit"] == 0.0 and tried[0]["written"]["max_error_8bit"] == 0.0
    listed = {e["engine"]: e for e in manifest["engines"]}
    assert listed["openvino-genai"]["file"] == "openvino-genai" and listed["openvino-genai"]["gate"]["passed"]
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    assert {"openvino-genai/openvino_model.xml", "openvino-genai/openvino_tokenizer.xml"} <= set(files)
    assert "openvino-genai" in (artifact / "runtime" / "requirements.txt").read_text()
    # both engines timed in turns (timings in measurements.json only); `auto` takes the faster first
    timed = json.loads((artifact / "measurements.json").read_text())["stages"][0]["details"]["engine_speed"]
    order = manifest["runtime"]["generators"]
    assert sorted(order) == sorted(timed) == ["onnxruntime-genai", "openvino-genai"]
    assert timed[order[0]]["request_ms"] <= timed[order[1]]["request_ms"]
    written = json.loads((artifact / "manifest.json").read_text())  # verify() merges the timings back
    assert written["stages"][0]["details"]["engine_speed"] == {name: {} for name in timed}
    assert runtime.load(artifact).generators()[:2] == order


def test_the_runtime_generates_through_openvino_genai_with_and_without_prompt_lookup(artifact: Path) -> None:
    """Greedy: the same tokens with OpenVINO GenAI's prompt lookup as without, and the same first
    token as the artifact's onnxruntime-genai folder (its fp32 candidate: the same weights, the grid
    being exact)."""
    model = runtime.load(artifact)
    assert "openvino-genai" in model.generators()
    engine = OpenVinoGenAIEngine(artifact / "openvino-genai", threads=2)
    for prompt in PROMPTS:
        ids = model.prompt_ids(prompt)
        plain = list(engine.tokens(ids, Sampling(max_new_tokens=24), set()))
        assert len(plain) == 24
        assert list(engine.tokens(ids, Sampling(max_new_tokens=24), set(), speculate=True)) == plain, prompt
        assert list(model.tokens(ids, Sampling(max_new_tokens=1), engine="onnxruntime-genai")) == plain[:1], prompt
    seeded = Sampling(max_new_tokens=16, temperature=0.9, seed=7)
    ids = model.prompt_ids(PROMPTS[0])
    assert list(engine.tokens(ids, seeded, set())) == list(engine.tokens(ids, seeded, set()))
    stream = engine.tokens(ids, Sampling(max_new_tokens=200), set())
    assert len([next(stream), next(stream)]) == 2
    stream.close()  # the pipeline stops at its next token; the engine generates again at once
    assert list(engine.tokens(ids, Sampling(max_new_tokens=24), set())) == list(
        engine.tokens(model.prompt_ids(PROMPTS[0]), Sampling(max_new_tokens=24), set())
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            str(artifact),
            "generate",
            "--prompt",
            PROMPTS[0],
            "--engine",
            "openvino-genai",
        ],
        cwd=artifact,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "generating with openvino-genai" in out.stderr and out.stdout.strip()


def test_logits_are_the_checkpoints_with_a_full_precision_cache(
    artifact: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    """The grid is exact: OpenVINO's logits with an fp32 KV cache are the checkpoint's within float
    rounding; a u8 cache within a tenth of their range. The folder compiles with the cache precision it
    names (what the gate measured, what any LLMPipeline gets). Written again (after another write in
    this process, the run's), the folder has the artifact's bytes."""
    import openvino
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = from_gguf(tiny_gguf, tmp_path / "converted")
    first, shipped = tmp_path / "first", artifact / "openvino-genai"
    openvino_genai.write(checkpoint, first, 4)
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for name in sorted(p.name for p in first.iterdir()):
        assert (first / name).read_bytes() == (shipped / name).read_bytes(), name
    ids = np.random.default_rng(0).integers(0, 1024, (1, 300))
    with torch.inference_mode():
        reference = AutoModelForCausalLM.from_pretrained(checkpoint)(torch.tensor(ids)).logits[0].numpy()
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    u8 = openvino_genai.OpenVinoDecoder(first, 512, 2, kv_cache="u8").run(inputs)[0]
    f32 = openvino_genai.OpenVinoDecoder(first, 512, 2, kv_cache="f32").run(inputs)[0]
    assert np.abs(f32 - reference).max() < 1e-3
    compiled = openvino.Core().compile_model(str(first / openvino_genai.FILE), "CPU")  # as any loader does
    assert compiled.get_property("KV_CACHE_PRECISION") == getattr(openvino.Type, openvino_genai.KV_CACHE)
    assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0  # not the CPU's default
    gated = openvino_genai.OpenVinoDecoder(first, 512, 2)  # f32 on every CPU (bf16 is some CPUs' default)
    assert gated.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    as_named = gated.run(inputs)[0]  # what the gate runs
    assert np.array_equal(as_named, {"u8": u8, "f32": f32}[openvino_genai.KV_CACHE])
    assert np.abs(u8 - reference).max() < 0.1 * np.abs(reference).max()


def test_without_its_packages_the_format_is_refused_before_any_work(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from optimize.cli.commands import app
    from tests.conftest import write_recipe

    monkeypatch.setitem(openvino_genai.NEEDS, "openvino_genai_missing", "openvino-genai")
    recipe = write_recipe(tmp_path, [STAGE], model=str(tiny_gguf))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "format openvino-genai: needs openvino-genai" in said and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_openvino_folder_and_its_verdict_are_the_same_warm_and_cold(artifact: Path, tiny_gguf: Path) -> None:
    """Rerun with the stage cache the first run filled (every step reused) and with --no-cache: the
    same formats tried and passed, the same engines gated, the same OpenVINO weights and metrics
    (which engine generates first is a timing, and may differ between cold runs)."""

    def verdicts(out: Path) -> tuple[object, ...]:
        manifest = runtime.verify(out)
        tried = [(t["format"], t["bits"], t["passed"]) for t in manifest["stages"][0]["details"]["formats"]]
        timed = ("latency", "throughput")  # measured again by a cold run
        engines = sorted(
            (
                e["engine"],
                e["file"],
                e["gate"]["passed"],
                {k: v for k, v in e["metrics"].items() if not k.startswith(timed)},
            )
            for e in manifest["engines"]
        )
        weights = runtime.sha256_file(out / "openvino-genai" / "openvino_model.bin")
        return tried, engines, weights

    folder = artifact.parent
    warm = run_recipe(folder, [STAGE], tiny_gguf, "--cache-dir", str(folder / "cache"), out="warm")
    cold = run_recipe(folder, [STAGE], tiny_gguf, "--no-cache", out="cold")
    assert verdicts(warm) == verdicts(artifact) == verdicts(cold)


def test_the_server_batches_concurrent_streams_through_openvino_genai(artifact: Path) -> None:
    """`serve` decodes with OpenVINO GenAI's continuous batching: concurrent streams advance in the
    same steps (the metrics say so), each gets the tokens it gets alone from LLMPipeline, and a
    client that hangs up gives its place back; `--engine onnxruntime-genai` interleaves instead."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from optimize.runtime.serve import Limits, Server
    from tests.runtime.test_serve import serving, streamed

    model = runtime.load(artifact)
    expected = [model.generate(p, max_new_tokens=20, engine="openvino-genai") for p in PROMPTS]
    with serving(artifact, Limits(max_queue=8)) as url:
        assert streamed(url, PROMPTS + PROMPTS, 20) == expected + expected
        metrics = httpx.get(url + "/metrics").text
        steps = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("optimize_decode_streams_")
        }
        alone = steps['optimize_decode_streams_bucket{le="1.0"}']
        assert steps["optimize_decode_streams_count"] > alone  # some steps advanced several streams
        assert steps["optimize_decode_streams_sum"] >= 6 * 20  # every token came from a batched step
    with serving(artifact, Limits(max_queue=1)) as url:
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as answer:
            next(answer.iter_lines())  # one event, then hang up
        deadline = time.time() + 10
        while time.time() < deadline:
            again = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0})
            if again.status_code == 200:
                break
            time.sleep(0.1)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected[1]
    interleaved = Server(model, "tiny", Limits(), None, engine="onnxruntime-genai")
    assert interleaved.worker.batcher is None and interleaved.engine == "onnxruntime-genai"


def test_a_folder_openvino_cannot_read_is_refused_in_one_line(artifact: Path, tmp_path: Path) -> None:
    """What OpenVINO raises from C++ on a folder it cannot read (here a cut IR) is an ArtifactError
    naming the engine and folder, which `generate` and `serve` print with exit 2."""
    from optimize.runtime.engine_openvino_genai import ContinuousBatching

    folder = tmp_path / "openvino-genai"
    shutil.copytree(artifact / "openvino-genai", folder)
    xml = folder / "openvino_model.xml"
    xml.write_bytes(xml.read_bytes()[:2000])
    said = f"openvino-genai cannot load {folder}: .*Error parsing"
    with pytest.raises(runtime.ArtifactError, match=said):
        ContinuousBatching(folder, None)
    with pytest.raises(runtime.ArtifactError, match=said):
        OpenVinoGenAIEngine(folder, None).pipeline(lookup=False)
