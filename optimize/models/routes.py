"""Which road a model takes through each stage and format, known from its config.json before any
weights load (the pre-flight; `--dry-run` prints it).

- An ONNX export (the stages that need one): our own, `torch.onnx` (optimize/pipeline/export.py). A decoder
  whose layers are all attention gets its KV cache as graph inputs and outputs; one with layers of
  another kind (linear attention, short convolutions, state-space mixers: their cache is a running
  state, not keys and values) is exported over the whole sequence, which the runtime's loop runs again
  for each token: the slower route.
- The genai stage: onnxruntime-genai's model builder, for the architectures it builds. Another
  architecture is refused here, naming the routes that exist for it.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from optimize import tasks
from optimize.runtime.engines import BUILDER, ENGINES
from optimize.runtime.untyped import Json

ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
ROUTE_CACHED, ROUTE_WHOLE = "kv-cache", "whole-sequence"
# The 16 tokens a decoder graph is checked on as generation feeds it (the second half one at a time,
# past a small sliding window); any vocabulary has them.
STEPPED_IDS = list(range(3, 19))


def export_route(config: Json) -> str:
    """ROUTE_CACHED where every layer is attention (as far as the config says), else ROUTE_WHOLE."""
    kinds = set(config.get("layer_types") or [])
    text = config.get("text_config")
    if isinstance(text, dict):
        kinds |= set(text.get("layer_types") or [])
    return ROUTE_CACHED if kinds <= ATTENTION_LAYERS else ROUTE_WHOLE


@cache
def builder_architectures() -> frozenset[str] | None:
    """The `architectures` onnxruntime-genai's model builder builds, read from its source without
    importing it (it imports transformers and torch); None where it is not installed or its source
    does not say (then the builder itself is asked)."""
    spec = find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    if not source.is_file():
        return None
    found = frozenset(re.findall(r'config\.architectures\[0\] == "(\w+)"', source.read_text()))
    return found or None


def builder_release() -> tuple[str, str] | None:
    """The installed onnxruntime-genai build that holds the model builder: (distribution, version)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ENGINES[BUILDER].dists:
        try:
            return name, version(name)
        except PackageNotFoundError:
            continue
    return None


def builder_version() -> str:
    release = builder_release()
    return release[1] if release else "not installed"


def builder_refusal(architecture: str) -> str | None:
    """Why the model builder cannot take `architecture`, naming the routes that exist; None if it can
    (or cannot be told without running it)."""
    known = builder_architectures()
    if known is None or architecture in known:
        return None
    return (
        f"genai: onnxruntime-genai {builder_version()}'s model builder does not build {architecture} "
        f"(it builds {len(known)} architectures). Routes that exist for this model: `kind: compile` "
        "(our ONNX export, run by the artifact's runtime loop), and `kind: quantize` before it for int8/int4"
    )


def describe(config: Json, task: str, stage_kinds: list[str]) -> list[str]:
    """One line per stage: the route it takes for this architecture."""
    architecture = str((config.get("architectures") or ["?"])[0])
    lines = []
    for kind in stage_kinds:
        if kind == "genai":
            refused = builder_refusal(architecture)
            route = f"refused: {refused}" if refused else f"onnxruntime-genai {builder_version()} model builder"
        elif kind == "distill":
            route = "torch (transformers)"
        elif task == tasks.GENERATION:
            route = f"torch.onnx export, {export_route(config)}"
            if export_route(config) == ROUTE_WHOLE:
                route += " (its cache is a running state: the whole sequence is run for each token, slower)"
        else:
            route = "torch.onnx export"
        lines.append(f"{kind}: {route}")
    return [f"{architecture} ({config.get('model_type', '?')}):", *(f"  {line}" for line in lines)]
