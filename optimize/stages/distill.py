"""The distill stage: train a smaller student to mimic the model so far (the teacher).

Students are built from the teacher: `layers: [0, 2, 4]` keeps those layers (weights copied),
`layers: 3` keeps three spread evenly (first and last included); `student:` overrides the
config (fewer attention heads or a narrower feed-forward), copying every teacher weight whose shape
still fits. Losses, weighted in the recipe: sentence embeddings learn the teacher's mean-pooled
embedding (MSE and 1 - cosine) and optionally its hidden states on the mapped layers; classifiers
and causal LMs learn its logits (KL at a temperature). Training texts come from `data:` (never the
eval suites), with `holdout` texts kept apart for the held-out loss curve. The loop is
`optimize/stages/distill_training.py` (also under torchrun). The output is a Hugging Face checkpoint folder, with
the teacher's tokenizer and sentence-transformers files, that quantize and compile take as is.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from optimize import tasks
from optimize.errors import UsageError
from optimize.evaluate.gate import GateCheck, student_gate
from optimize.models import projection
from optimize.models.checkpoint import read_config
from optimize.models.handle import ModelHandle
from optimize.models.loading import load_torch
from optimize.runtime.untyped import HfObject, Json
from optimize.stages import distill_training as training
from optimize.stages.base import StageBase, StageContext, StageResult
from optimize.stages.distill_data import DataSource, label_ids, load_texts
from optimize.stages.distill_losses import Losses, loss_function
from optimize.stages.distill_students import StudentConfig, build_student, chosen_layers, with_projection

if TYPE_CHECKING:
    import torch


class DistillStage(StageBase):
    order: ClassVar[int] = 0
    repeatable: ClassVar[bool] = False
    needs_onnx: ClassVar[bool] = False

    kind: Literal["distill"] = "distill"
    layers: list[int] | int = Field(3, description="teacher layers to keep, or how many, spread evenly")
    student: StudentConfig = StudentConfig()
    data: list[DataSource] = Field(default_factory=list, description="training text; default: calibration data")
    holdout: int = Field(64, ge=0, description="texts kept out of training for the held-out loss")
    losses: Losses = Losses()
    steps: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="optimizer steps; auto: AUTO_EPOCHS passes over the training texts, within "
        "AUTO_STEPS (steps scale with the data)",
    )
    batch_size: int = Field(32, gt=0, description="texts per optimizer step, over processes and accumulation")
    accumulation: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0, description="peak learning rate (5e-4: see AUTO_EPOCHS for the measurement)")
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps")
    schedule: Literal["cosine", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    seq_len: int = Field(128, gt=0, le=8192)
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast; auto: where the GPU or CPU computes in bf16 natively (AVX512-BF16 here: "
        "60 MiniLM steps in 9.1-10.4 s against 15.3-15.7 s, held-out loss 0.24871 against 0.248685)",
    )
    eval_every: int = Field(25, gt=0, description="steps between held-out loss measurements")
    checkpoint_every: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _layers_given(self) -> DistillStage:
        if isinstance(self.layers, list) and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers: give distinct teacher layer indices, e.g. [0, 2, 4], or a count")
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("layers: a student needs at least 1 layer")
        return self

    def default_gate(self, task: str, suite_metrics: Sequence[str]) -> list[GateCheck]:
        return student_gate(task, suite_metrics)

    def check_input(self, model: ModelHandle, base_dir: Path, calibration: Sequence[str] = ()) -> None:
        if not any(model.checkpoint.glob("*.safetensors")) and not model.allow_pickle:
            raise UsageError(
                f"distill: the teacher must be a checkpoint with weights (safetensors); {model.checkpoint} has "
                "none (an ONNX model cannot be trained)"
            )
        config = read_config(model.checkpoint)
        count = config.get("num_hidden_layers", config.get("n_layers", config.get("n_layer")))
        if isinstance(count, int):
            chosen_layers(self.layers, count)
        check_student(self, model.task, config)
        width = config.get("hidden_size")
        if self.student.hidden_size not in (None, width) and tasks.embeds(model.task):
            from optimize.runtime import Pooling

            mode = Pooling.of(model.checkpoint).mode
            if mode not in ("mean", "cls", "lasttoken"):
                raise UsageError(
                    f"distill: the teacher pools by {mode}, which a projection after pooling cannot follow; "
                    "keep the teacher's hidden_size"
                )
        if self.losses.hard_label > 0:
            if tasks.embeds(model.task):
                raise UsageError("distill: losses.hard_label: sentence embeddings have no labels; set it to 0")
            if model.task == tasks.CLASSIFICATION and not any(s.label for s in self.data):
                raise UsageError("distill: losses.hard_label needs a data source with `label:` (its label column)")
        for source in self.data:
            check_data(source, base_dir)

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def check_student(config: DistillStage, task: str, teacher: Json) -> None:
    """A student config the teacher's class can build, and a projection wherever the losses need one."""
    width = teacher.get("hidden_size")
    student = config.student
    hidden = student.hidden_size or width
    heads = student.num_attention_heads or teacher.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads and "head_dim" not in teacher:
        raise UsageError(f"distill: student: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    needs = tasks.embeds(task) or config.losses.hidden_mse > 0
    if hidden != width and needs and not student.projection:
        side = "wider" if isinstance(width, int) and isinstance(hidden, int) and hidden > width else "narrower"
        raise UsageError(
            f"distill: the student ({hidden} wide) is {side} than its teacher ({width}) and student.projection "
            "is false: its embeddings or hidden states cannot be compared with the teacher's; set "
            "student.projection: true or keep the teacher's hidden_size"
        )


def check_data(source: DataSource, base_dir: Path) -> None:
    """A local file that exists, or a hub dataset id (read when the stage runs)."""
    from optimize.data import looks_like_hub_id
    from optimize.paths import recipe_data

    if not any(p.exists() for p in recipe_data(source.path, base_dir)) and not looks_like_hub_id(source.path):
        raise UsageError(
            f"distill: data: {source.path} not found (beside the recipe, in the working folder, "
            "under $OPTIMIZE_DATA_ROOT or ../shared/data), and not a hub dataset `name[:config][:split]`"
        )


def run(config: DistillStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    import torch

    from optimize.runtime import Pooling

    teacher = load_torch(model)  # check_input ran when the pipeline prepared the recipe
    teacher_config: HfObject = teacher.config
    count = int(teacher_config.num_hidden_layers)
    layers = chosen_layers(config.layers, count)
    torch.manual_seed(ctx.seed)
    student = build_student(teacher, layers, config.student)
    student_config: HfObject = student.config
    width, teacher_width = int(student_config.hidden_size), int(teacher_config.hidden_size)
    projected = width != teacher_width and config.student.projection
    trainee = with_projection(student, width, teacher_width, len(layers)) if projected else student
    data = load_texts(config.data, config.holdout, ctx)
    labels: dict[str, int] = {}
    if model.task == tasks.CLASSIFICATION and config.losses.hard_label > 0:
        labels = label_ids(data.labels, dict(teacher_config.label2id), int(teacher_config.num_labels))
    settings = training_settings(config, len(data.train), ctx.seed)
    key = _resume_key(config, model, data.sources, ctx.seed)
    checkpoints = training.Checkpoints(ctx.checkpoints, key) if ctx.checkpoints else None
    began = time.perf_counter()
    history = training.train(
        trainee,
        teacher,
        _tokenize(model.checkpoint, config.seq_len, student, labels),
        loss_function(config.losses, model.task, layers, Pooling.of(model.checkpoint).mode),
        data.train,
        data.heldout,
        settings,
        checkpoints,
        ctx.resume,
        ctx.console,
    )
    seconds = round(time.perf_counter() - began, 1)
    out = ctx.workdir / "student"
    if training.is_main():
        save_student(student, model.checkpoint, out)
        if projected and tasks.embeds(model.task):  # the embedding's projection ships, not the hidden states'
            last: HfObject = trainee.last
            projection.write(out, last.weight.detach().numpy(), last.bias.detach().numpy())
    params = sum(p.numel() for p in student.parameters())
    decisions: dict[str, object] = {
        "layers": layers,
        "teacher_layers": count,
        "hidden_size": width,
        "teacher_hidden_size": teacher_width,
        "projection": projected,
        "student_parameters": params,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "data": {"sources": data.sources, "train_texts": len(data.train), "heldout_texts": len(data.heldout)},
        "steps": settings.steps,
        "processes": training.world_size(),
        "bf16": settings.bf16,
        "seconds": seconds,
        "loss_curve": history,
    }
    return StageResult(model.with_checkpoint(out), decisions)


def _resume_key(config: DistillStage, model: ModelHandle, sources: object, seed: int) -> str:
    """What the training depends on, hashed: a resumed run continues only the training it would have done."""
    parts = [config.model_dump(mode="json", exclude={"gate", "name"}), str(model.checkpoint), sources, seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _tokenize(checkpoint: Path, seq_len: int, student: torch.nn.Module, labels: dict[str, int]) -> training.Tokenize:
    """Texts to the student's inputs (those its forward takes), with their label ids when it learns
    hard labels too."""
    import torch

    from optimize.runtime import Tokenizer

    tokenizer = Tokenizer(checkpoint / "tokenizer.json", seq_len)
    accepted = set(inspect.signature(student.forward).parameters)

    def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = {k: torch.from_numpy(v) for k, v in tokenizer(list(texts)).items() if k in accepted}
        if labels:
            batch["labels"] = torch.tensor([labels.get(t, -100) for t in texts])
        return batch

    return tokenize


def training_settings(config: DistillStage, texts: int, seed: int) -> training.Settings:
    """The loop's settings from the stage's fields: `steps: auto` and `bf16: auto` resolved here."""
    return training.Settings(
        steps=auto_steps(texts, config.batch_size) if config.steps == "auto" else config.steps,
        batch_size=config.batch_size,
        accumulation=config.accumulation,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup=config.warmup,
        schedule=config.schedule,
        max_grad_norm=config.max_grad_norm,
        bf16=training.bf16_supported() if config.bf16 == "auto" else config.bf16,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        seed=seed,
    )


# `steps: auto`, measured on MiniLM (layers [0, 2, 4], the 10,472 STS-B train sentences left after
# the holdout, batch 32, lr 5e-4): 1000 steps (3 passes) gave STS-B test Spearman 0.8084 in 609 s
# of training on 2 cores; the same 1000 steps at lr 2e-4 0.7973, 300 steps 0.7638 (the old default).
AUTO_EPOCHS = 3
AUTO_STEPS = (300, 3000)


def auto_steps(texts: int, batch_size: int) -> int:
    """Steps for AUTO_EPOCHS passes over `texts` at `batch_size`, within AUTO_STEPS."""
    low, high = AUTO_STEPS
    return max(low, min(high, math.ceil(AUTO_EPOCHS * texts / batch_size)))


def save_student(student: HfObject, teacher_dir: Path, out: Path) -> None:
    """A checkpoint folder transformers and sentence-transformers load as they are."""
    from optimize.models.checkpoint import copy_checkpoint_files

    student.save_pretrained(out, safe_serialization=True)
    config = (out / "config.json").read_text()
    copy_checkpoint_files(teacher_dir, out)
    (out / "config.json").write_text(config)  # the student's own, not the teacher's
