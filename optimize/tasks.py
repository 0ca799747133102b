"""The model tasks, in one table: what each outputs (sentence embeddings or logits), the class that
loads it. Every module asks this table instead of comparing task
names; a new task is one line here (and whatever its outputs need where `embeds` is asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["feature-extraction", "text-classification", "text-generation"]

EMBEDDING: Task = "feature-extraction"
CLASSIFICATION: Task = "text-classification"
GENERATION: Task = "text-generation"


@dataclass(frozen=True)
class TaskInfo:
    name: Task
    embeds: bool  # outputs are sentence embeddings (fidelity by cosine); else logits (also top-1 and KL)
    auto_class: str  # the transformers class that loads a checkpoint of it


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo(EMBEDDING, True, "AutoModel"),
        TaskInfo(CLASSIFICATION, False, "AutoModelForSequenceClassification"),
        TaskInfo(GENERATION, False, "AutoModelForCausalLM"),
    )
}


def embeds(task: str | None) -> bool:
    """Whether a model of `task` outputs sentence embeddings (an unknown task may be any: no)."""
    return task is not None and TASKS[task].embeds
