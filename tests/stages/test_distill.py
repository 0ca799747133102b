"""Distillation on tiny random models: students, losses, the loop, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.stages.distill_training import batch_texts
from tests.conftest import ROOT, write_recipe

# bf16 off: these tests compare runs to rounding (resume, DDP); bf16 "auto" is tested on its own.
FAST = {"kind": "distill", "batch_size": 8, "holdout": 16, "eval_every": 5, "seq_len": 32, "bf16": False}


def run_json(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def distill_recipe(folder: Path, model: Path, name: str = "distill", **stage: object) -> Path:
    return write_recipe(folder, [{**FAST, **stage}], name=name, model=str(model))


def test_a_one_layer_student_learns_its_teacher_and_ships_as_a_checkpoint(deep_bert, tmp_path):
    from transformers import AutoModel

    recipe = distill_recipe(
        tmp_path, deep_bert, layers=[2], steps=40, lr=3e-3, gate=[{"metric": "cosine_mean", "min": 0.5}]
    )
    out = tmp_path / "out"
    result, report = run_json("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert [s["kind"] for s in report["stages"]] == ["distill", "export"]
    manifest = json.loads((out / "manifest.json").read_text())
    details = manifest["stages"][0]["details"]
    curve = details["loss_curve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert curve[-1]["heldout_loss"] < 0.5 * curve[0]["heldout_loss"]  # it learned, on texts it never saw
    assert details["layers"] == [2] and details["teacher_layers"] == 3
    assert details["student_parameters"] < details["teacher_parameters"]
    student = AutoModel.from_pretrained(out)  # the artifact is a checkpoint transformers loads as it is
    assert student.config.num_hidden_layers == 1
    assert "model.safetensors" in manifest["files"] and "Distillation loss" in (out / "report.md").read_text()
    assert not (tmp_path / ".out.checkpoints").exists()  # the artifact supersedes the checkpoints


def test_the_default_gate_refuses_an_untrained_student(deep_bert, tmp_path):
    recipe = distill_recipe(tmp_path, deep_bert, layers=[0], steps=1, lr=1e-6)
    result, report = run_json("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 3, result.output
    assert report["stages"][0]["gate"]["source"] == "default"
    assert not (tmp_path / "out").exists()


def test_a_tiny_llama_is_distilled_by_logit_kl_and_generates_through_the_runtime(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    recipe = distill_recipe(
        tmp_path,
        tiny_llama,
        layers=1,
        steps=20,
        lr=3e-3,
        losses={"hard_label": 0.5},  # next-token cross-entropy beside the KL
        gate=[{"metric": "kl_div", "max": 1.0}],
    )
    out = tmp_path / "out"
    result, _report = run_json("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    curve = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]["loss_curve"]
    assert curve[-1]["heldout_loss"] < curve[0]["heldout_loss"]
    sys.path.insert(0, str(out))
    try:
        import runtime

        generated = runtime.load(out, available=["CPUExecutionProvider"]).generate("the model", max_new_tokens=6)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("runtime", None)
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("the model").ids])
    expected = student.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert generated == tokenizer.decode(expected.tolist())


def test_a_narrower_student_learns_a_projection_and_ships_it_so_embeddings_keep_the_teacher_width(deep_bert, tmp_path):
    import numpy as np
    import onnx

    recipe = distill_recipe(
        tmp_path,
        deep_bert,
        layers=[2],
        student={"hidden_size": 16, "intermediate_size": 32},
        losses={"hidden_mse": 0.5},
        steps=40,
        lr=3e-3,
        gate=[{"metric": "cosine_mean", "min": 0.5}],  # measured against the 32-wide teacher: widths agree
    )
    out = tmp_path / "out"
    result, _report = run_json("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    details = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]
    assert details["hidden_size"] == 16 and details["teacher_hidden_size"] == 32 and details["projection"]
    assert details["loss_curve"][-1]["heldout_loss"] < 0.5 * details["loss_curve"][0]["heldout_loss"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 32
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense"]
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = ["a first sentence", "and a second, longer one about something else"]
    loaded = sentence_transformers.SentenceTransformer(str(out), device="cpu").encode(texts)
    sys.path.insert(0, str(out))
    try:
        import runtime

        ours = runtime.load(out, available=["CPUExecutionProvider"]).embed(texts)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("runtime", None)
    assert loaded.shape == (2, 32) and np.abs(loaded - ours).max() < 1e-4


def test_a_narrower_feed_forward_keeps_the_strongest_neurons_of_a_reordering_that_changes_nothing(deep_bert):
    import torch
    from transformers import AutoModel

    from optimize.stages.distill_students import StudentConfig, build_student, ranked_by_strength

    teacher = AutoModel.from_pretrained(deep_bert).eval()
    state = teacher.state_dict()
    ranked = ranked_by_strength(state, "encoder.layer.", 64)
    first = "encoder.layer.0."
    strength = ranked[first + "intermediate.dense.weight"].norm(dim=1) * ranked[first + "output.dense.weight"].norm(
        dim=0
    )
    assert bool((strength[:-1] >= strength[1:]).all()) and not torch.equal(
        ranked[first + "output.dense.weight"], state[first + "output.dense.weight"]
    )
    reordered = AutoModel.from_pretrained(deep_bert).eval()
    reordered.load_state_dict(ranked)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.allclose(teacher(input_ids=ids)[0], reordered(input_ids=ids)[0], atol=1e-5)
    student = build_student(teacher, [0], StudentConfig(intermediate_size=16))
    kept = student.state_dict()[first + "intermediate.dense.weight"]
    assert torch.equal(kept, ranked[first + "intermediate.dense.weight"][:16])


def test_hard_labels_teach_a_classifier_what_its_data_says(tmp_path):
    from tests.conftest import small_bert

    teacher = tmp_path / "teacher"
    small_bert(teacher, "BertForSequenceClassification", num_labels=2)
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]
    lines = [f"{i % 2} {'good' if i % 2 else 'bad'} {words[i % 8]} {words[(i * 3) % 8]} {i}" for i in range(400)]
    (tmp_path / "labeled.txt").write_text("\n".join(lines))
    source = {"path": str(tmp_path / "labeled.txt"), "format": "label-text", "label": "label"}
    stage = {"layers": [1], "steps": 60, "lr": 3e-3, "holdout": 64, "data": [source], "gate": []}
    recipe = distill_recipe(tmp_path, teacher, losses={"logit_kl": 0.0, "hard_label": 1.0}, **stage)
    result, _ = run_json("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    import torch
    from transformers import AutoModelForSequenceClassification

    from optimize.runtime import Tokenizer

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    held = lines[-64:]
    batch = Tokenizer(tmp_path / "out" / "tokenizer.json", 32)([line[2:] for line in held])
    with torch.no_grad():
        predicted = student(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.argmax(-1)
    accuracy = float((predicted == torch.tensor([int(line[0]) for line in held])).float().mean())
    assert accuracy > 0.95  # the random teacher knows nothing of good/bad: the labels taught it
    wrong = [{**source, "path": str(tmp_path / "named.txt")}]
    (tmp_path / "named.txt").write_text("\n".join(f"{i} text {i}" for i in range(5, 200)))
    bad = distill_recipe(tmp_path, teacher, name="bad", losses={"hard_label": 1.0}, **{**stage, "data": wrong})
    result, report = run_json("run", str(bad), "-o", str(tmp_path / "bad"), "--json")
    assert result.exit_code == 2 and "not a class of the model" in report["error"]


def test_bf16_auto_follows_the_cpu_and_the_run_records_it(deep_bert, tmp_path, monkeypatch):
    from optimize import cpu
    from optimize.stages import distill_training as training

    monkeypatch.setattr(cpu, "current", lambda: cpu.CpuInfo("x", frozenset({"avx2", "avx512_bf16"})))
    assert training.bf16_supported()
    monkeypatch.setattr(cpu, "current", lambda: cpu.CpuInfo("x", frozenset({"avx2"})))
    assert not training.bf16_supported()
    monkeypatch.undo()
    recipe = distill_recipe(tmp_path, deep_bert, layers=[2], steps=10, lr=3e-3, bf16="auto", gate=[])
    out = tmp_path / "out"
    assert run_json("run", str(recipe), "-o", str(out))[0].exit_code == 0
    details = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]
    assert details["bf16"] == training.bf16_supported()
    assert details["loss_curve"][-1]["heldout_loss"] < details["loss_curve"][0]["heldout_loss"]


def test_batches_are_a_function_of_seed_and_step_and_cover_the_epoch():
    texts = [f"text {i} " + "x" * (i % 13) for i in range(100)]
    assert batch_texts(texts, 3, 8, 0) == batch_texts(texts, 3, 8, 0)
    assert batch_texts(texts, 3, 8, 0) != batch_texts(texts, 3, 8, 1)
    epoch = [t for step in range(12) for t in batch_texts(texts, step, 8, 0)]
    assert len(set(epoch)) == 96  # 12 batches of 8, each text once


def test_an_interrupted_run_resumes_where_its_checkpoint_left_off(deep_bert, tmp_path):
    stage = {"layers": [2], "steps": 20, "lr": 3e-3, "checkpoint_every": 10}
    straight = distill_recipe(tmp_path, deep_bert, name="straight", gate=[], **stage)
    assert run_json("run", str(straight), "-o", str(tmp_path / "straight"))[0].exit_code == 0
    # the same recipe, but its gate fails: the run ends after training, leaving the step-10 checkpoint
    failing = distill_recipe(tmp_path, deep_bert, name="resumed", gate=[{"metric": "cosine_mean", "min": 1.5}], **stage)
    out = tmp_path / "resumed"
    assert run_json("run", str(failing), "-o", str(out))[0].exit_code == 3
    assert (tmp_path / ".resumed.checkpoints" / "stage-0" / "step-10").is_dir()
    other = distill_recipe(tmp_path, deep_bert, name="resumed", gate=[], **{**stage, "lr": 1e-3})
    result, _ = run_json("run", str(other), "-o", str(out), "--resume")
    assert result.exit_code == 2 and "another recipe" in result.stderr and not out.exists()
    resumed = distill_recipe(tmp_path, deep_bert, name="resumed", gate=[], **stage)
    result, _ = run_json("run", str(resumed), "-o", str(out), "--resume")
    assert result.exit_code == 0, result.output
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # the same student as one straight run
    curve = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]["loss_curve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20]  # the curve before the checkpoint was kept


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"layers": [0, 7]}, "out of range"),
        ({"layers": 5}, "more than the teacher's 3 layers"),
        ({"steps": 0}, "steps"),
        ({"data": [{"path": "missing.txt"}]}, "missing.txt not found"),
        ({"data": [{"path": "EMPTY"}]}, "no rows"),
        ({"student": {"hidden_size": 64, "projection": False}}, "wider than its teacher"),
        ({"student": {"hidden_size": 20, "num_attention_heads": 3}}, "not a multiple"),
        ({"losses": {"hard_label": 1.0}}, "no labels"),
    ],
)
def test_bad_distill_input_exits_2_with_one_message_and_writes_nothing(deep_bert, tmp_path, change, expected):
    if "data" in change and change["data"][0]["path"] == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n")
        change = {"data": [{"path": str(tmp_path / "empty.txt")}]}
    recipe = distill_recipe(tmp_path, deep_bert, **{"steps": 2, **change})
    result, report = run_json("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 2, result.output
    assert expected in report["error"] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gate-failed.md").exists()


def test_the_distill_command_builds_the_stage_from_its_options(deep_bert, tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(f"sentence number {i}" for i in range(50)))
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(deep_bert),
            "--layers",
            "0,2",
            "--steps",
            "7",
            "--data",
            str(tmp_path / "texts.txt"),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "kind: distill" in result.stdout and "steps: 7" in result.stdout and "- 0\n" in result.stdout
    assert invoke_layers("3") == 3 and invoke_layers("0,2,4") == [0, 2, 4]
    assert CliRunner().invoke(app, ["distill", str(deep_bert), "--layers", "a,b", "--dry-run"]).exit_code == 2


def invoke_layers(text: str):
    from optimize.cli.commands import _parse_layers

    return _parse_layers(text)


def test_two_processes_under_torchrun_match_one_at_the_same_global_batch(deep_bert, tmp_path):
    stage = {"layers": [2], "steps": 8, "lr": 3e-3, "eval_every": 2, "gate": []}
    recipe = distill_recipe(tmp_path, deep_bert, **stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    runs = {
        "one": [sys.executable, "-m", "optimize"],
        "two": [str(torchrun), "--nproc_per_node=2", "--master_port=29531", "-m", "optimize"],
    }
    for name, launch in runs.items():
        proc = subprocess.run(
            [*launch, "run", str(recipe), "-o", str(tmp_path / name), "--json"],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["status"] == "passed"  # only rank 0 printed the JSON
    curves = [json.loads((tmp_path / n / "manifest.json").read_text())["stages"][0]["details"] for n in runs]
    assert curves[1]["processes"] == 2 and curves[0]["processes"] == 1
    for a, b in zip(curves[0]["loss_curve"], curves[1]["loss_curve"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-4)
    # The same student: its weights agree to a few thousandths (Adam turns the last-bit differences of
    # an all-reduce into full-size steps where a gradient is near zero; 1.1e-3 seen here at lr 3e-3)
    # and its sentence embeddings to cosine 0.9999.
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in runs)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 5e-3
    from optimize.evaluate.measure import fidelity, open_model, outputs
    from optimize.models.handle import ModelHandle

    texts = [line for line in (ROOT / "calibration" / "default.jsonl").read_text().splitlines()][:32]
    embedded = [
        outputs(open_model(ModelHandle(tmp_path / n, "feature-extraction"), 32), "feature-extraction", texts)
        for n in runs
    ]
    assert fidelity(embedded[1], embedded[0])["cosine_min"] >= 0.9999
