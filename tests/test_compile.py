"""The compile stage: measured graph variants, agreement with the input, targets, ONNX inputs."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from optimize import runtime
from optimize.cli import app


def compile_json(*args: str):
    result = CliRunner().invoke(app, ["compile", *args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def test_cpu_compile_measures_each_variant_and_keeps_the_fastest_that_agrees(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _report = compile_json(str(tiny_bert), "-o", str(out))
    assert result.exit_code == 0, result.output
    details = runtime.verify(out)["stages"][1]["details"]  # with its measurements merged back
    tried = {c["variant"]: c for c in details["candidates"]}
    assert set(tried) == {"as-is", "basic", "extended", "fused"}
    agreeing = [c for c in tried.values() if c.get("agrees")]
    assert agreeing and all(c["agreement_cosine_min"] >= 0.999 for c in agreeing)
    chosen = tried[details["variant"]]
    assert chosen.get("agrees")
    # nothing that agrees is more than min_speedup (5%) faster than what was kept
    assert all(c["latency_p50_ms"] >= chosen["latency_p50_ms"] * 0.95 for c in agreeing)
    assert "error" not in tried["fused"], tried["fused"]  # onnxruntime's BERT fusions apply to this graph
    assert tried["fused"]["fused"]["SkipLayerNormalization"] > 0


def test_gpu_targets_keep_a_portable_graph_and_ship_their_provider_settings(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _ = compile_json(str(tiny_bert), "--target", "tensorrt", "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["target"] == "tensorrt" and manifest["runtime"]["fp16"] is True
    assert manifest["stages"][1]["details"]["variant"] == "basic"


def test_compile_takes_an_artifact_and_needs_no_export(tiny_bert, tmp_path):
    first = tmp_path / "first"
    assert compile_json(str(tiny_bert), "-o", str(first))[0].exit_code == 0
    result, report = compile_json(str(first), "-o", str(tmp_path / "second"))
    assert result.exit_code == 0, result.output
    assert [s["kind"] for s in report["stages"]] == ["compile"]
    assert report["stages"][0]["metrics"]["cosine_min"] >= 0.999


def test_a_pinned_variant_is_the_only_one_built(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result, _ = compile_json(str(tiny_bert), "--variant", "as-is", "-o", str(out))
    assert result.exit_code == 0, result.output
    details = runtime.verify(out)["stages"][1]["details"]  # with its measurements merged back
    assert [c["variant"] for c in details["candidates"]] == ["as-is"] and details["variant"] == "as-is"
    bad, report = compile_json(str(tiny_bert), "--variant", "turbo", "-o", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "variants" in report["error"] and not (tmp_path / "bad").exists()
