"""The model handle a stage takes and returns: a checkpoint folder (Hugging Face `save_pretrained`
layout), its task and, once exported, an ONNX file and the engine that runs it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from optimize.runtime.engines import DEFAULT_ENGINE


@dataclass(frozen=True)
class ModelHandle:
    checkpoint: Path  # folder with config.json and tokenizer files
    task: str
    onnx_path: Path | None = None  # set once the model is exported
    allow_pickle: bool = False
    trust_remote_code: bool = False
    engine: str = DEFAULT_ENGINE  # what runs the ONNX file: one of runtime.ENGINES

    def with_onnx(self, path: Path, engine: str | None = None) -> ModelHandle:
        return dataclasses.replace(self, onnx_path=path, engine=engine or self.engine)

    def with_checkpoint(self, folder: Path) -> ModelHandle:
        """A new checkpoint (a distilled student): no ONNX file yet, weights from safetensors."""
        return dataclasses.replace(self, checkpoint=folder, onnx_path=None, allow_pickle=False, engine=DEFAULT_ENGINE)

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None


def cache_root() -> Path:
    return Path(os.environ.get("OPTIMIZE_CACHE_DIR", Path.home() / ".cache" / "optimize"))
