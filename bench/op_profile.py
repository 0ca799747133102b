"""Where an ONNX model spends its time, by op type: onnxruntime's profiler over a few calls at the
batch sizes given, on this machine's threads, with the CPU model and flags printed.

    python bench/op_profile.py MODEL [MODEL ...] [--batch 1 32] [--seq-len 128] [--runs 10] [--json out.json]

MODEL is an artifact folder, an .onnx file or a checkpoint (exported first). The profile is the
starting point for speed work: the before and after of a change are two columns of this table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from optimize import cpu
from optimize.evaluate.measure import SpeedSettings, speed_inputs, threads
from optimize.models.loading import open_any


def profile(onnx_path: Path, feed: dict[str, Any], runs: int) -> dict[str, float]:
    """Milliseconds per call spent in each op type (kernel time, summed over nodes of that type)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        session.run(None, feed)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="optimize-profile-")) / "profile")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 2):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: Counter[str] = Counter()
    calls = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            calls += 1
        elif event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / 1000 / max(calls, 1), 3) for op, us in by_op.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="artifact folders, .onnx files or checkpoints")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the profiles here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads()))
    from optimize import runtime

    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.models:
        handle = open_any(spec)
        if handle.onnx_path is None:
            raise SystemExit(f"{spec}: not an ONNX model (compile or export it first)")
        tokenizer = runtime.Tokenizer(handle.checkpoint / "tokenizer.json", args.seq_len)
        for batch in args.batch:
            settings = SpeedSettings(batch_size=batch, seq_len=args.seq_len)
            feed = speed_inputs(tokenizer, ["The quick brown fox jumps over the lazy dog."], settings)
            results.setdefault(f"{Path(spec).name} b{batch}", profile(handle.onnx_path, feed, args.runs))
    here = cpu.current().summary()
    profiles = list(results.values())
    ops = sorted({op for p in profiles for op in p}, key=lambda op: -max(p.get(op, 0) for p in profiles))
    table = Table(
        title=f"ms per call by op type (onnxruntime profiler, {threads()} threads, seq_len {args.seq_len}); "
        f"CPU {here['model']}, flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    table.add_column("op type")
    for column in results:
        table.add_column(column, justify="right")
    for op in ops:
        table.add_row(op, *(f"{p[op]:.3f}" if op in p else "" for p in results.values()))
    table.add_row("total", *(f"{sum(p.values()):.3f}" for p in results.values()))
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": here, "threads": threads(), "profiles": results}, indent=2))


if __name__ == "__main__":
    main()
