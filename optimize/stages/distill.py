"""The distill stage: train a smaller student to mimic the model so far (the teacher).

Students are built from the teacher: `layers: [0, 2, 4]` keeps those layers (weights copied),
`layers: 3` keeps three spread evenly (first and last included); `student:` overrides the
config (fewer attention heads or a narrower feed-forward), copying every teacher weight whose shape
still fits. Losses, weighted in the recipe: sentence embeddings learn the teacher's mean-pooled
embedding (MSE and 1 - cosine) and optionally its hidden states on the mapped layers; classifiers
and causal LMs learn its logits (KL at a temperature). Training texts come from `data:` (never the
eval suites), with `holdout` texts kept apart for the held-out loss curve. The loop is
`optimize/training.py` (also under torchrun). The output is a Hugging Face checkpoint folder, with
the teacher's tokenizer and sentence-transformers files, that quantize and compile take as is.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimize import training
from optimize.data import Format, column, read_format
from optimize.errors import UsageError
from optimize.model import ModelHandle, load_torch
from optimize.stages.base import StageBase, StageContext, StageResult

if TYPE_CHECKING:
    import torch


class DataSource(BaseModel):
    """Unlabeled training text: a file (found like calibration files, then in the data roots)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    format: Format = "auto"
    columns: list[str] = Field(default_factory=list, description="text columns to take (default: the text one)")
    limit: int | None = Field(None, gt=0, description="at most this many texts (seeded sample)")


class Losses(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_mse: float = Field(1.0, ge=0, description="embeddings: MSE of mean-pooled embeddings")
    embedding_cosine: float = Field(1.0, ge=0, description="embeddings: 1 - cosine of mean-pooled embeddings")
    hidden_mse: float = Field(0.0, ge=0, description="embeddings: MSE of hidden states on the mapped layers")
    logit_kl: float = Field(1.0, ge=0, description="classifiers and LMs: KL of logits at the temperature")
    temperature: float = Field(2.0, gt=0)


class StudentConfig(BaseModel):
    """Config fields to change besides the layer count; the hidden width must stay the teacher's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)


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
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0, description="texts per optimizer step, over processes and accumulation")
    accumulation: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps")
    schedule: Literal["cosine", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    seq_len: int = Field(128, gt=0, le=8192)
    bf16: bool = Field(False, description="bf16 autocast (measure first: it was not faster on our CPU)")
    eval_every: int = Field(25, gt=0, description="steps between held-out loss measurements")
    checkpoint_every: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _layers_given(self) -> DistillStage:
        if isinstance(self.layers, list) and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers: give distinct teacher layer indices, e.g. [0, 2, 4], or a count")
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("layers: a student needs at least 1 layer")
        return self

    def check_input(self, model: ModelHandle, base_dir: Path) -> None:
        if not any(model.checkpoint.glob("*.safetensors")) and not model.allow_pickle:
            raise UsageError(
                f"distill: the teacher must be a checkpoint with weights (safetensors); {model.checkpoint} has "
                "none (an ONNX model cannot be trained)"
            )
        config = json.loads((model.checkpoint / "config.json").read_text())
        count = config.get("num_hidden_layers", config.get("n_layers", config.get("n_layer")))
        if isinstance(count, int):
            chosen_layers(self.layers, count)
        width = config.get("hidden_size", config.get("dim"))
        if self.student.hidden_size is not None and width is not None:
            check_width(self.student.hidden_size, width)
        for source in self.data:
            find_data(source, base_dir)

    def run(self, model: ModelHandle, ctx: StageContext) -> StageResult:
        return run(self, model, ctx)


def check_width(student: int, teacher: int) -> None:
    if student != teacher:
        raise UsageError(
            f"distill: student.hidden_size {student} differs from the teacher's {teacher}: that needs a learned "
            "projection, which this version does not build; keep the hidden size and shrink layers, "
            "intermediate_size or num_attention_heads"
        )


def find_data(source: DataSource, base_dir: Path) -> Path:
    from optimize.paths import find_training_data

    path = find_training_data(source.path, base_dir)
    if not path.exists():
        raise UsageError(
            f"distill: data: {source.path} not found (beside the recipe, in the working folder, "
            "under $OPTIMIZE_DATA_ROOT or ../shared/data)"
        )
    return path


def layer_list(model: torch.nn.Module, count: int) -> str:
    """The dotted name of the module list holding the transformer layers (`encoder.layer`, `model.layers`)."""
    import torch

    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not found:
        raise UsageError(f"distill: cannot find the {count} transformer layers of {type(model).__name__}")
    return str(min(found, key=len))


def chosen_layers(layers: list[int] | int, count: int) -> list[int]:
    """Explicit indices (checked), or `n` spread evenly over `count` with the first and last kept."""
    if isinstance(layers, int):
        if layers > count:
            raise UsageError(f"distill: layers: {layers} is more than the teacher's {count} layers")
        if layers == 1:
            return [count - 1]
        return sorted({round(i * (count - 1) / (layers - 1)) for i in range(layers)})
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise UsageError(f"distill: layers: {bad} out of range; the teacher has layers 0..{count - 1}")
    return sorted(layers)


def build_student(teacher: torch.nn.Module, layers: list[int], overrides: StudentConfig) -> torch.nn.Module:
    """A model of the teacher's class with `layers` (renumbered) and teacher weights wherever shapes fit."""
    import copy

    config: Any = copy.deepcopy(teacher.config)
    count = int(config.num_hidden_layers)
    if overrides.hidden_size is not None:
        check_width(overrides.hidden_size, config.hidden_size)
    prefix = layer_list(teacher, count) + "."
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    for key, value in overrides.model_dump(exclude_none=True).items():
        setattr(config, key, value)
    student = type(teacher)(config)
    target = student.state_dict()
    copied = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            if int(index) not in layers:
                continue
            name = f"{prefix}{layers.index(int(index))}.{rest}"
        if name in target and target[name].shape == tensor.shape:
            copied[name] = tensor
    student.load_state_dict(copied, strict=False)
    return student


def load_texts(config: DistillStage, ctx: StageContext) -> tuple[list[str], list[str], list[str]]:
    """Training texts, held-out texts, and where they came from; bad or empty data is exit 2."""
    texts: list[str] = []
    sources: list[str] = []
    if not config.data:
        texts = list(ctx.calibration_texts)
        sources.append("calibration texts")
    for source in config.data:
        path = find_data(source, ctx.base_dir)
        rows = read_format(path, source.format, "distill data")
        names: list[str | None] = list(source.columns) or [None]
        found = [text for name in names for text in column(rows, name, path)]
        if source.limit is not None and len(found) > source.limit:
            found = random.Random(ctx.seed).sample(found, source.limit)
        texts += found
        sources.append(f"{source.path} ({len(found)} texts)")
    texts = list(dict.fromkeys(texts))  # a sentence seen twice is trained on once
    random.Random(ctx.seed).shuffle(texts)
    if len(texts) <= config.holdout:
        raise UsageError(f"distill: data: {len(texts)} texts, no more than holdout={config.holdout}; give more data")
    return texts[config.holdout :], texts[: config.holdout], sources


def loss_function(config: DistillStage, task: str, layers: list[int]) -> training.LossFn:
    import torch
    import torch.nn.functional as F  # noqa: N812

    weights = config.losses

    def embeddings(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = weights.hidden_mse > 0
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=hidden)
        s = student(**batch, output_hidden_states=hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(s[0].dtype)

        def pool(states: torch.Tensor) -> torch.Tensor:
            return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        a, b = pool(s[0]), pool(t[0].to(s[0].dtype))
        loss = weights.embedding_mse * F.mse_loss(a, b)
        loss = loss + weights.embedding_cosine * (1 - F.cosine_similarity(a, b, dim=-1)).mean()
        if hidden:
            pairs = [(s.hidden_states[i + 1], t.hidden_states[j + 1]) for i, j in enumerate(layers)]
            loss = loss + weights.hidden_mse * sum(F.mse_loss(x * mask, y * mask) for x, y in pairs) / len(pairs)
        return loss

    def logits(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        temperature = weights.temperature
        with torch.no_grad():
            t = teacher(**batch).logits
        s = student(**batch).logits
        if s.ndim == 3:  # causal LM: every real token is a row
            real = batch["attention_mask"].bool()
            s, t = s[real], t[real]
        kl = F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        return weights.logit_kl * kl * temperature**2

    return embeddings if task == "feature-extraction" else logits


def run(config: DistillStage, model: ModelHandle, ctx: StageContext) -> StageResult:
    import torch

    from optimize.runtime import Tokenizer

    teacher = load_torch(model)  # check_input ran when the pipeline prepared the recipe
    teacher_config: Any = teacher.config
    count = int(teacher_config.num_hidden_layers)
    layers = chosen_layers(config.layers, count)
    torch.manual_seed(ctx.seed)
    student = build_student(teacher, layers, config.student)
    train_texts, heldout, sources = load_texts(config, ctx)
    tokenizer = Tokenizer(model.checkpoint / "tokenizer.json", config.seq_len)
    accepted = set(inspect.signature(student.forward).parameters)

    def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in tokenizer(list(texts)).items() if k in accepted}

    settings = training.Settings(
        config.steps,
        config.batch_size,
        config.accumulation,
        config.lr,
        config.weight_decay,
        config.warmup,
        config.schedule,
        config.max_grad_norm,
        config.bf16,
        config.eval_every,
        config.checkpoint_every,
        ctx.seed,
    )
    key = hashlib.sha256(
        json.dumps(
            [config.model_dump(mode="json", exclude={"gate", "name"}), str(model.checkpoint), sources, ctx.seed],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    checkpoints = training.Checkpoints(ctx.checkpoints, key) if ctx.checkpoints else None
    began = time.perf_counter()
    history = training.train(
        student,
        teacher,
        tokenize,
        loss_function(config, model.task, layers),
        train_texts,
        heldout,
        settings,
        checkpoints,
        ctx.resume,
        ctx.console,
    )
    seconds = round(time.perf_counter() - began, 1)
    out = ctx.workdir / "student"
    if training.is_main():
        save_student(student, model.checkpoint, out)
    params = sum(p.numel() for p in student.parameters())
    decisions: dict[str, Any] = {
        "layers": layers,
        "teacher_layers": count,
        "student_parameters": params,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "data": {"sources": sources, "train_texts": len(train_texts), "heldout_texts": len(heldout)},
        "processes": training.world_size(),
        "seconds": seconds,
        "loss_curve": history,
    }
    return StageResult(model.with_checkpoint(out), decisions)


def save_student(student: Any, teacher_dir: Path, out: Path) -> None:
    """A checkpoint folder transformers and sentence-transformers load as they are."""
    from optimize.artifact import copy_checkpoint_files

    student.save_pretrained(out, safe_serialization=True)
    config = (out / "config.json").read_text()
    copy_checkpoint_files(teacher_dir, out)
    (out / "config.json").write_text(config)  # the student's own, not the teacher's
