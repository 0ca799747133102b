"""The peers' environment: sentence-transformers' ONNX and OpenVINO backends and the Optimum peer run
on optimum-onnx and optimum-intel, which hold transformers below 4.58 and 5.6. They never share the
project's environment (installing them would downgrade it): `make peers` builds `.venv-peers` with
their last working stack, and the tests that load an artifact as their users do run there, in a
subprocess. Without it (plain `pytest` before `make peers`) those tests skip."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

ENCODE = """
import json, sys
from sentence_transformers import SentenceTransformer
asked = json.loads(sys.argv[1])
model = SentenceTransformer(asked["folder"], backend=asked["backend"], device="cpu", model_kwargs=asked["kwargs"])
print(json.dumps(model.encode(asked["texts"]).tolist()))
"""


def python() -> Path:
    """The peers' interpreter ($OPTIMIZE_PEERS_PYTHON, else .venv-peers), or a skip."""
    path = Path(os.environ.get("OPTIMIZE_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
    if not path.is_file():
        pytest.skip(f"the peers' environment is not built ({path}): `make peers`")
    return path


def st_encode(folder: Path, texts: list[str], backend: str, kwargs: dict[str, object]) -> np.ndarray:
    """`SentenceTransformer(folder, backend=backend, model_kwargs=kwargs).encode(texts)` as a user of
    sentence-transformers' `backend` runs it, in the peers' environment."""
    asked = {"folder": str(folder), "texts": texts, "backend": backend, "kwargs": kwargs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(python()), "-c", ENCODE, json.dumps(asked)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.array(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
