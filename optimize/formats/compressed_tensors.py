"""The compressed-tensors format of a decoder (vLLM, SGLang; transformers on CPU with the
`compressed-tensors` package): `pack-quantized` weights, 8 int4 codes per int32 (or int8 ones) along
the input dimension, a scale per group of `GROUP` inputs (int4) or per output channel (int8),
symmetric (asymmetric W4A16 does not reload in transformers 4.57 with compressed-tensors 0.20), and
`quantization_config` in config.json. Written with compressed-tensors' own `ModelCompressor` from
scales this module sets (absmax per group), so the codes are what the library reads back.

Every Linear but `lm_head` is quantized at one precision, so fused shards (q/k/v, gate/up), which
vLLM requires at one precision, agree; `merge_fused` widens a partial list of kept layers to their
whole groups. The gate is measured on the folder as transformers loads it (decompressed on CPU).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from optimize.errors import UsageError
from optimize.formats import int4
from optimize.models.checkpoint import TOKENIZER, copy_present
from optimize.models.safetensors import header

# int4 inputs per scale: the largest of vLLM's that divides every quantized layer's input (576 = 9 x 64)
GROUPS = (128, 64, 32)
ENGINE = "compressed-tensors"  # what runs the folder (runtime.ENGINES)
KEPT_FILES = (*TOKENIZER, "generation_config.json")
# vLLM loads a layer's q/k/v (and gate/up) as one fused shard: they must share a precision.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# vLLM's int4 GPU kernels (Marlin, Machete) take groups of 32, 64 or 128 and, per shard, an input
# dimension divisible by this.
VLLM_INT4_INPUT_MULTIPLE = 128


def merge_fused(kept: Iterable[str]) -> tuple[list[str], list[str]]:
    """`kept` (module names left unquantized) widened to whole fused groups; and a line per widening."""
    names = sorted(set(kept))
    notes = []
    for name in list(names):
        for group in FUSED:
            match = re.fullmatch(rf"(.*\.)({'|'.join(group)})", name)
            if match is None:
                continue
            siblings = [match.group(1) + part for part in group]
            missing = [s for s in siblings if s not in names]
            if missing:
                names += missing
                notes.append(f"{name} is kept in float: so are {', '.join(missing)} (one fused shard in vLLM)")
    return sorted(set(names)), notes


def group_size(in_features: Iterable[int]) -> int:
    """The largest of `GROUPS` dividing every input dimension (32 when none does: a ragged last group
    is refused by compressed-tensors, so such a model fails at int4 and ships int8)."""
    sizes = list(in_features)
    return next((g for g in GROUPS if all(size % g == 0 for size in sizes)), GROUPS[-1])


def _widths(checkpoint: Path) -> set[int]:
    """The input widths of the checkpoint's projection weights, read from its safetensors headers."""
    return {
        int(entry["shape"][1])  # type: ignore[index]
        for path in sorted(checkpoint.glob("*.safetensors"))
        for name, entry in header(path)[0].items()
        if name.endswith("proj.weight") and len(entry["shape"]) == 2  # type: ignore[arg-type]
    }


def limits(bits: int, in_features: dict[str, int]) -> list[str]:
    """What the format's target engines refuse, for these layers (name -> input dimension)."""
    if bits != 4:
        return []
    odd = sorted({n for n, size in in_features.items() if size % VLLM_INT4_INPUT_MULTIPLE})
    if not odd:
        return []
    return [
        f"vLLM's int4 GPU kernels want each shard's input dimension divisible by {VLLM_INT4_INPUT_MULTIPLE}; "
        f"{len(odd)} layers are not (e.g. {odd[0]}: {in_features[odd[0]]}): they load on its slower fallback kernels"
    ]


def problem(checkpoint: Path, texts: Sequence[str] = ()) -> str | None:
    """Why this folder cannot be written here, or None."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return "format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
    return None


def loader() -> str:
    """What measures the folder's gate: transformers, decompressing it on the CPU."""
    from importlib.metadata import version

    return f"transformers {version('transformers')} + compressed-tensors {version('compressed-tensors')}"


def levels(checkpoint: Path, requested: Sequence[str]) -> tuple[int | str, ...]:
    """int4 by each of the recipe's methods in its order, at the largest group dividing the widths
    and then at 32 if that is larger (`int4-gptq-g64`, `int4-gptq-g32`, ...), then int8."""
    largest = group_size(_widths(checkpoint))
    groups = (largest, GROUPS[-1]) if largest != GROUPS[-1] else (largest,)
    return (*(f"int4-{method}-g{group}" for method in requested for group in groups), 8)


def route(checkpoint: Path, requested: Sequence[str]) -> str:
    """How the folder will be written, for the pre-flight."""
    tried = ", then ".join(str(level) for level in levels(checkpoint, requested)[:-1])
    return f"symmetric {tried}, then int8 (transformers with compressed-tensors measures it)"


def write_level(checkpoint: Path, out: Path, level: int | str, texts: Sequence[str]) -> dict[str, object]:
    """`write` at one of `levels`: `int4-<method>-g<group>`, or 8."""
    if isinstance(level, str):
        _, method, group = level.split("-")
        return write(checkpoint, out, 4, texts=texts, method=method, group=int(group.removeprefix("g")))
    return write(checkpoint, out, level)


def write(
    checkpoint: Path,
    out: Path,
    bits: int,
    kept: Iterable[str] = (),
    texts: Sequence[str] = (),
    method: str = "rtn",
    group: int | None = None,
) -> dict[str, object]:
    """The compressed-tensors folder of `checkpoint` at `out`, every Linear but lm_head and `kept`
    in int`bits` (int4 rounded by `method` of `int4.METHODS` over the calibration `texts`, in groups
    of `group` inputs, by default `group_size`'s; int8 to the nearest step); returns what the
    manifest records of it (bits, method, group, limits)."""
    try:
        import torch
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise UsageError(
            "format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
        ) from None
    import transformers

    model: transformers.PreTrainedModel = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32
    )
    model.train(False)
    ignore, _ = merge_fused(kept)
    names = int4.linears(model, ignore)
    modules = dict(model.named_modules())
    in_features = {name: int(modules[name].get_parameter("weight").shape[1]) for name in names}
    group = group or group_size(in_features.values())
    if bits == 4:
        scales = int4.round_model(model, names, checkpoint, texts, method, group)
    else:
        with torch.no_grad():
            scales = {n: (modules[n].get_parameter("weight").abs().amax(-1) / 127).clamp(min=1e-12) for n in names}
    strategy = {"strategy": "group", "group_size": group} if bits == 4 else {"strategy": "channel"}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", *ignore], format="pack-quantized")
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name in names:
            stored = modules[name].get_parameter("weight_scale")  # made by apply_quantization_config
            stored.data = scales[name].reshape(stored.shape).to(stored.dtype)
            if hasattr(modules[name], "weight_zero_point"):
                modules[name].get_parameter("weight_zero_point").data.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    assert compressor is not None
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    copy_present(checkpoint, out, KEPT_FILES)
    return {
        "bits": bits,
        "method": method if bits == 4 else "rtn",
        "group_size": group if bits == 4 else None,
        "limits": limits(bits, in_features),
    }
