"""Eval suites: labeled data and the task metric it yields (`evals/*.yaml`).

    name: stsb-test
    task: sts                    # a name in SUITE_TASKS: sts | classification | perplexity
    data: sentence-transformers/stsb::test   # SPEC: a hub dataset name[:config][:split], or a file
    columns: {text: sentence1, text_pair: sentence2, label: score}
    local:                       # the same rows in a local copy, used when it is found (offline, CI)
      data: stsb/sts-test.csv    # beside the suite, under $OPTIMIZE_DATA_ROOT, or ../shared/data
      format: tsv-noheader       # auto | tsv-noheader | label-text
      columns: {text: "5", text_pair: "6", label: "4"}
    limit: null                  # at most this many rows (seeded sample)

Tasks (`SUITE_TASKS`, one line each, a function each): `sts` gives `spearman` between the cosine of
the pair's pooled embeddings and the gold score; `classification` gives `accuracy` (argmax of a
classifier's logits, or for an embedding model a logistic-regression probe fitted on `train_data`);
`perplexity` gives `perplexity` of a causal LM, sliding windows of `window` tokens moved by `stride`.
A new task is a scoring function and one `SuiteTask` line (and its metric in `metrics.METRICS`
if it yields a new one).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optimize import tasks
from optimize.data import Format, Row, load_rows
from optimize.errors import UsageError
from optimize.paths import suite_data
from optimize.runtime.manifest import JsonObject

if TYPE_CHECKING:
    from optimize.runtime import Tokenizer


class Model(Protocol):
    """What a suite scores: a checkpoint in torch (`evaluate.TorchModel`) or an ONNX model
    (`runtime.OnnxModel`), both with the runtime's tokenizer."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray: ...


Column = Literal["text", "text_pair", "label"]


class LocalCopy(BaseModel):
    """A suite's data set as a local file, with its own layout: read instead of the hub when found."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str
    train_data: str | None = None
    format: Format = "auto"
    columns: dict[Column, str] = {"text": "text"}


class Suite(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    task: str = Field(description="a task of SUITE_TASKS")
    data: str
    format: Format = "auto"
    columns: dict[Column, str] = {"text": "text"}
    train_data: str | None = None  # classification probe for embedding models
    train_limit: int | None = Field(2000, gt=0)
    limit: int | None = Field(None, gt=0)
    seed: int = 0
    window: int = Field(512, gt=1)  # perplexity
    stride: int = Field(256, gt=0)
    max_tokens: int | None = Field(None, gt=1)
    local: LocalCopy | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in SUITE_TASKS:
            raise ValueError(f"unknown task {task!r}; one of {', '.join(SUITE_TASKS)}")
        return task


@dataclass(frozen=True)
class LoadedSuite:
    suite: Suite
    path: Path
    rows: list[Row]
    train_rows: list[Row]
    source: str = ""  # what was read: a file, or a hub id and where datasets found it

    def provenance(self) -> JsonObject:
        """What the manifest records of the data this suite read."""
        digest = hashlib.sha256(json.dumps(self.rows, sort_keys=True, default=str).encode()).hexdigest()
        return {
            "suite": self.suite.name,
            "data": self.suite.data,
            "source": self.source,
            "rows": len(self.rows),
            "sha256": digest,
        }

    @property
    def task(self) -> SuiteTask:
        return SUITE_TASKS[self.suite.task]

    @property
    def metric(self) -> str:
        return self.task.metric

    def texts(self, key: Column = "text", rows: Sequence[Row] | None = None) -> list[str]:
        return [str(r[self.suite.columns[key]]) for r in (self.rows if rows is None else rows)]

    def labels(self, rows: Sequence[Row] | None = None) -> np.ndarray:
        return np.array([float(r[self.suite.columns["label"]]) for r in (self.rows if rows is None else rows)])


def read_suite(path: Path) -> Suite:
    """The suite's settings only, no data read: what recipe validation needs."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such eval suite") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read eval suite ({exc})") from None
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(map(str, first["loc"])) or "(suite)"
        raise UsageError(f"{path}: {key}: {first['msg']}") from None
    return suite


def load_suite(path: Path) -> LoadedSuite:
    """The suite with its rows, checked: the columns it names exist and labels are numbers."""
    suite = read_suite(path)
    local = suite.local
    if local is not None and any(p.exists() for p in suite_data(local.data, path)):
        suite = suite.model_copy(update=local.model_dump())  # the local copy, in its own layout
    found = load_rows(suite.data, suite_data(suite.data, path), suite.format, f"{path}: data")
    rows = found.rows
    train = (
        load_rows(suite.train_data, suite_data(suite.train_data, path), suite.format, f"{path}: train_data").rows
        if suite.train_data
        else []
    )
    if suite.train_limit is not None and len(train) > suite.train_limit:
        train = random.Random(suite.seed).sample(train, suite.train_limit)
    if not rows:
        raise UsageError(f"{path}: data {suite.data} has no rows")
    task = SUITE_TASKS[suite.task]
    for key in task.columns:
        if key not in suite.columns:
            raise UsageError(f"{path}: columns: task {suite.task} needs a `{key}` column")
        if suite.columns[key] not in rows[0]:
            raise UsageError(
                f"{path}: columns.{key}: no column {suite.columns[key]!r} in {suite.data} "
                f"(columns: {', '.join(map(str, rows[0]))})"
            )
    if not task.stream and suite.limit is not None and len(rows) > suite.limit:  # a stream keeps its order
        rows = random.Random(suite.seed).sample(rows, suite.limit)
    loaded = LoadedSuite(suite, path, rows, train, found.source)
    if "label" in task.columns:
        try:
            loaded.labels()
        except ValueError as exc:
            raise UsageError(f"{path}: columns.label: not a number in {suite.data} ({exc})") from None
    return loaded


def spearman(model: Model, suite: LoadedSuite) -> float:
    from scipy.stats import spearmanr

    a, b = model.embed(suite.texts("text")), model.embed(suite.texts("text_pair"))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cos, suite.labels()).statistic)


def accuracy(model: Model, task: str, suite: LoadedSuite) -> float:
    labels = suite.labels().astype(int)
    if task == tasks.CLASSIFICATION:
        predicted = np.concatenate(
            [model.run(model.tokenizer(batch)).argmax(-1) for batch in _batches(suite.texts(), 32)]
        )
        return float((predicted == labels).mean())
    if not suite.train_rows:
        raise UsageError(f"{suite.path}: an embedding model needs `train_data` to fit a classification probe")
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, random_state=suite.suite.seed)
    probe.fit(model.embed(suite.texts(rows=suite.train_rows)), suite.labels(suite.train_rows).astype(int))
    return float((probe.predict(model.embed(suite.texts())) == labels).mean())


def perplexity(model: Model, suite: LoadedSuite) -> float:
    return perplexity_of(token_nll(model, suite))


def perplexity_of(losses: np.ndarray) -> float:
    """exp of the mean of the tokens' negative log-likelihoods."""
    return float(np.exp(losses.mean()))


def token_nll(model: Model, suite: LoadedSuite) -> np.ndarray:
    """The negative log-likelihood of each token of the text as one stream (its perplexity is
    exp of their mean), in windows of `window` moved by `stride`; each window scores only the tokens
    the previous one did not (HF's sliding-window recipe)."""
    ids = _first_ids(model.tokenizer, "\n".join(suite.texts()), suite.suite.max_tokens)
    window, stride = suite.suite.window, suite.suite.stride
    scored, previous_end = [], 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + window, len(ids))
        chunk = np.array([ids[begin:end]], dtype=np.int64)
        logits = model.run({"input_ids": chunk, "attention_mask": np.ones_like(chunk)})[0]
        new = end - max(previous_end, begin + 1)  # tokens not scored before (the first has no context)
        targets = chunk[0, end - begin - new :]
        scores = logits[end - begin - new - 1 : end - begin - 1]
        for row in range(0, len(targets), 64):  # in float64, 64 vocabulary-wide rows at a time
            part = scores[row : row + 64].astype(np.float64)
            peak = part.max(axis=-1)  # log-sum-exp shifted by its largest term (logaddexp.reduce: 3 times slower)
            total = np.log(np.exp(part - peak[:, None]).sum(axis=-1)) + peak
            scored.append(total - part[np.arange(len(part)), targets[row : row + 64]])
        previous_end = end
        if end == len(ids):
            break
    return np.concatenate(scored)


def _first_ids(tokenizer: Tokenizer, text: str, limit: int | None) -> list[int]:
    """The first `limit` token ids of `text` (all without a limit), from a prefix of it long enough
    that its cut is well past them: the same ids as of the whole text, in a fraction of the time
    (WikiText-2's test set is 1.3 MB; 1,024 tokens are a few kB)."""
    if not limit:
        return list(tokenizer.ids(text))
    size = limit * 8
    while True:
        ids = tokenizer.ids(text[:size])
        if size >= len(text) or len(ids) > limit + 64:  # the cut's own tokens are far past `limit`
            return list(ids[:limit])
        size *= 2


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


Score = Callable[[Model, str, LoadedSuite], float]  # (model, the model's task, suite) -> the metric


@dataclass(frozen=True)
class SuiteTask:
    name: str
    metric: str  # what it yields: a name in metrics.METRICS
    columns: tuple[Column, ...]  # the columns its rows need
    score: Score
    digits: int = 6  # the metric is rounded to this many decimals
    stream: bool = False  # the rows are one text in order (never sampled, no pairs to compare)
    model_task: str | None = None  # the model task it needs (None: any)


SUITE_TASKS: dict[str, SuiteTask] = {
    t.name: t
    for t in (
        SuiteTask("sts", "spearman", ("text", "text_pair", "label"), lambda m, _, s: spearman(m, s)),
        SuiteTask("classification", "accuracy", ("text", "label"), accuracy),
        SuiteTask("perplexity", "perplexity", ("text",), lambda m, _, s: perplexity(m, s), 4, True, tasks.GENERATION),
    )
}


def run_suite(
    model: Model, task: str, suite: LoadedSuite, losses: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """The suite's metric for `model` (a model of `task`); a perplexity's per-token losses go into
    `losses` under the metric's name (for its standard error, `standard_error`)."""
    kind = suite.task
    if kind.model_task is not None and task != kind.model_task:
        raise UsageError(f"{suite.path}: {kind.name} needs a {kind.model_task} model, not {task}")
    if kind.name == "perplexity" and losses is not None:
        losses[kind.metric] = token_nll(model, suite)
        return {kind.metric: round(perplexity_of(losses[kind.metric]), kind.digits)}
    return {kind.metric: round(kind.score(model, task, suite), kind.digits)}


def standard_error(losses: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
    """How finely a perplexity measured on these tokens resolves (the tokens taken as independent):
    the standard error of the perplexity, and with the reference's losses on the same tokens, of
    its ratio to the reference's (paired: the two models' losses move together, so the ratio is
    known far better than either perplexity), over `tokens`."""
    n = len(losses)
    found = {
        "tokens": float(n),
        "standard_error": perplexity_of(losses) * float(losses.std(ddof=1)) / float(np.sqrt(n)),
    }
    if reference is not None and len(reference) == n:
        diff = losses.astype(np.float64) - reference
        found["ratio_standard_error"] = perplexity_of(diff) * float(diff.std(ddof=1)) / float(np.sqrt(n))
    return {k: round(v, 6) for k, v in found.items()}
