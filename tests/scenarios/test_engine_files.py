"""One artifact, one file per engine, loaded as users load them: sentence-transformers with
`backend="onnx"` (model.onnx) and `backend="openvino"` (openvino/openvino_model.xml), in the peers'
environment (tests/peers.py), gives the runtime's embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize import cpu, runtime
from optimize.cli.commands import app
from tests import peers
from tests.conftest import write_recipe
from tests.stages.test_quantize_formulations import AVX2

TEXTS = ["a short sentence", "another, somewhat longer sentence than the first", "third one"]


@pytest.fixture(scope="module")
def tiny_sentence_model(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a sentence-transformers model: mean pooling, then normalized, in the layout
    every sentence-transformers release reads (5.x in the peers' environment, 6.x here)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-st")
    for path in tiny_bert.iterdir():
        shutil.copyfile(path, folder / path.name)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    listed = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)
    ]
    (folder / "modules.json").write_text(json.dumps(listed))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return folder


@pytest.fixture(scope="module")
def artifact(tiny_sentence_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("openvino")
    folder = tmp_path_factory.mktemp("engine-files")
    stage = {"kind": "quantize", "precision": "int8", "formulations": "auto", "min_speedup": 0.0}
    stage["gate"] = [{"metric": "cosine_min", "min": 0.5}]
    recipe = write_recipe(folder, [stage], model=str(tiny_sentence_model))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "current", lambda: AVX2)  # the AVX2 list: no NNCF build, a fast test
        result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(folder / "out"), "--json"])
    assert result.exit_code == 0, result.output
    return folder / "out"


def _runtime_embeddings(artifact: Path, openvino: bool) -> np.ndarray:
    saved = sys.modules.get("openvino")
    if not openvino:
        sys.modules["openvino"] = None  # type: ignore[assignment]  # `import openvino` raises ImportError
    try:
        model = runtime.load(artifact)
        assert (model.provider == "OpenVINO (CPU)") == (openvino and model.file.suffix == ".xml")
        return model.embed(TEXTS)
    finally:
        if saved is not None:
            sys.modules["openvino"] = saved
        else:
            sys.modules.pop("openvino", None)


def test_sentence_transformers_onnx_backend_loads_model_onnx_as_the_runtime_runs_it(artifact: Path) -> None:
    theirs = peers.st_encode(artifact, TEXTS, "onnx", {"file_name": "model.onnx"})
    ours = _runtime_embeddings(artifact, openvino=False)  # the runtime on onnxruntime runs model.onnx
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)  # the artifact's Normalize module
    assert np.abs(theirs - ours).max() < 1e-4


def test_sentence_transformers_openvino_backend_loads_the_openvino_file_as_the_runtime_runs_it(artifact: Path) -> None:
    kwargs = {"file_name": "openvino/openvino_model.xml", "ov_config": {"INFERENCE_PRECISION_HINT": "f32"}}
    theirs = peers.st_encode(artifact, TEXTS, "openvino", kwargs)
    import openvino

    from optimize.runtime.session import OpenVINOSession

    session = OpenVINOSession(artifact / "openvino" / "openvino_model.xml", 2)
    tokenizer = runtime.Tokenizer(artifact / "tokenizer.json", 32)
    ours = runtime.embed(
        lambda feed: np.asarray(session.run(None, feed)[0]), tokenizer, TEXTS, 32, runtime.Pooling.of(artifact)
    )
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert openvino is not None and np.abs(theirs - ours).max() < 1e-4


def test_each_engines_file_and_its_verdict_are_the_same_cold_and_warm(
    tiny_sentence_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alternates come back from the stage cache and their gates from the cached engine-file
    step: a warm rerun writes the same files with the same verdicts; --no-cache judges them anew."""
    pytest.importorskip("openvino")
    import json

    monkeypatch.setattr(cpu, "current", lambda: AVX2)
    stage = {"kind": "quantize", "precision": "int8", "formulations": "auto", "min_speedup": 0.0}
    stage["gate"] = [{"metric": "cosine_min", "min": 0.5}]
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_sentence_model))
    runs = {"cold": [], "warm": [], "no-cache": ["--no-cache"]}
    manifests = {}
    for name, extra in runs.items():
        out = tmp_path / name
        args = ["run", str(recipe), "-o", str(out), "--cache-dir", str(tmp_path / "cache"), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert ("openvino file: reused from the cache" in result.output) == (name == "warm")
        manifests[name] = json.loads((out / "manifest.json").read_text())
    cold, warm, fresh = (manifests[n] for n in runs)
    assert warm["files"] == cold["files"] and warm["engines"] == cold["engines"]
    verdicts = [[(e["engine"], e["file"], e["gate"]["passed"]) for e in m["engines"]] for m in (cold, fresh)]
    assert sorted(verdicts[0]) == sorted(verdicts[1]) and all(v[2] for v in verdicts[0])
