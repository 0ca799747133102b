"""The CPU a model is tuned and measured on: its name and the instruction-set flags int8 speed and
correctness depend on. Printed with every speed figure and recorded in the manifest.

Why the flags matter for correctness, not only speed: onnxruntime's int8 MatMul on x86 multiplies
uint8 activations by int8 weights. Without VNNI (AVX2 only) that product is summed in pairs into
16-bit lanes (`vpmaddubsw`), which saturates when both weights of a pair are near +-127 and the
activations near 255: a 12-layer encoder's embeddings became noise (cosine 0.01 to its float
model, issue 9). VNNI (and AMX, and ARM's dot product) accumulate in 32 bits and cannot saturate.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optimize.runtime.manifest import CpuSummary

# Flags that give int8 dot products with 32-bit accumulation (no 16-bit saturation).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def bf16_math(self) -> bool:
        """True when the CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16, Arm BF16)."""
        return any(flag in self.flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))

    @property
    def int8_dot(self) -> bool:
        """True when int8 x int8 products accumulate without 16-bit saturation."""
        return any(flag in self.flags for flag in INT8_DOT_FLAGS)

    def summary(self) -> CpuSummary:
        return {
            "model": self.model,
            "machine": platform.machine(),
            "flags": sorted(f for f in REPORTED_FLAGS if f in self.flags),
        }


@lru_cache(maxsize=1)
def current() -> CpuInfo:
    """This machine's CPU from /proc/cpuinfo (Linux; read by the shipped runtime's `cpu_info`, which
    warns with it); elsewhere the name only and no flags, which the callers treat as "no VNNI"."""
    from optimize.runtime import cpu_info

    return CpuInfo(*cpu_info())
