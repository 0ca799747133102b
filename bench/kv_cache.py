"""The KV cache of an artifact's OpenVINO GenAI folder at each precision OpenVINO's CPU plugin keeps
it in: perplexity (WikiText-2 test, the recipe's suite, the sequence fed in chunks so that later
positions read the cache), memory per 1,000 tokens of context (from the model's shape, and the
resident memory the pipeline grew by between contexts), and greedy decode speed after a prompt of
each context length, in one run on this machine. No time to first token: OpenVINO GenAI caches
prompt prefixes, so a prompt measured after its warm-up is not prefilled again.

    python bench/kv_cache.py ARTIFACT [--contexts 1000 4000] [--new-tokens 32] [--json results.json]

u8 is what OpenVINO GenAI keeps on the CPU by default and what the genai stage gates; onnxruntime-genai
keeps its cache in fp32 on the CPU (the f32 row's memory). Each precision runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRECISIONS = ("u8", "f16", "f32")
BYTES = {"u8": 1, "f16": 2, "f32": 4}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def context_ids(folder: Path, count: int) -> list[int]:
    """`count` tokens of WikiText-2 validation text (never the test split perplexity is scored on)."""
    from tokenizers import Tokenizer

    from optimize.paths import data_roots

    path = next(root / "wikitext2" / "valid.tokens.txt" for root in data_roots())
    ids: list[int] = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(path.read_text()[: count * 8]).ids
    return ids[:count]


def measure(folder: Path, precision: str, contexts: list[int], new_tokens: int) -> dict[str, Any]:
    import numpy as np
    import openvino
    import openvino_genai as genai

    from optimize.evaluate.measure import threads
    from optimize.evaluate.suites import load_suite, run_suite
    from optimize.formats import openvino_genai
    from optimize.paths import find

    decoder = openvino_genai.OpenVinoDecoder(folder, 512, threads(), kv_cache=precision)
    suite = load_suite(find("wikitext2-test.yaml", "evals"))
    ppl = run_suite(decoder, "text-generation", suite)["perplexity"]
    del decoder
    pipeline = genai.LLMPipeline(str(folder), "CPU", KV_CACHE_PRECISION=precision, INFERENCE_NUM_THREADS=threads())
    config = genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.do_sample = False
    rows = []
    for count in contexts:
        ids = np.array([context_ids(folder, count)], dtype=np.int64)
        inputs = genai.TokenizedInputs(openvino.Tensor(ids), openvino.Tensor(np.ones_like(ids)))
        pipeline.generate(inputs, config)  # warm-up at this length
        before = rss_mb()
        start = time.perf_counter()
        result = pipeline.generate(inputs, config)
        seconds = time.perf_counter() - start
        metrics = result.perf_metrics
        rows.append(
            {
                "context": int(ids.shape[1]),
                "decode_tok_s": round(1000 / metrics.get_tpot().mean, 1),
                "seconds": round(seconds, 2),
                "rss_mb": round(rss_mb(), 1),
                "rss_before_mb": round(before, 1),
            }
        )
    return {"perplexity": round(ppl, 4), "contexts": rows}


def shape_mb_per_1k(folder: Path, precision: str) -> float:
    """Keys and values of 1,000 tokens from the model's shape (u8 adds a scale and zero point per
    token and head in fp32)."""
    config = json.loads((folder / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_head = head_dim * BYTES[precision] + (8 if precision == "u8" else 0)
    return round(int(config["num_hidden_layers"]) * 2 * int(heads) * int(per_head) * 1000 / 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.artifact / "openvino-genai"
    if args.one:
        print(json.dumps(measure(folder, args.one, args.contexts, args.new_tokens)))
        return

    from rich.console import Console
    from rich.table import Table

    from optimize import cpu

    console = Console(stderr=True)
    results = {}
    for precision in PRECISIONS:
        command = [
            sys.executable,
            __file__,
            str(args.artifact),
            "--one",
            precision,
            "--new-tokens",
            str(args.new_tokens),
        ]
        command += ["--contexts", *map(str, args.contexts)]
        with console.status(f"KV cache {precision}"):
            out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
        results[precision] = json.loads(out.strip().splitlines()[-1])
        results[precision]["shape_mb_per_1k"] = shape_mb_per_1k(folder, precision)
    here = cpu.current().summary()
    table = Table(
        title=f"{args.artifact.name}/openvino-genai, greedy, {args.new_tokens} new tokens, {os.cpu_count()} threads; "
        f"CPU {here['model']}, flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    columns = ["KV cache", "WikiText-2 perplexity", "MB per 1k tokens (shape)", "RSS grew MB per 1k tokens"]
    for count in args.contexts:
        columns += [f"decode tok/s @{count}"]
    for column in columns:
        table.add_column(column, justify="right")
    for precision, row in results.items():
        first, last = row["contexts"][0], row["contexts"][-1]
        grown = (last["rss_mb"] - first["rss_mb"]) / max(1, last["context"] - first["context"]) * 1000
        cells = [precision, f"{row['perplexity']:.4f}", f"{row['shape_mb_per_1k']:.2f}", f"{grown:.2f}"]
        for context in row["contexts"]:
            cells += [f"{context['decode_tok_s']:.1f}"]
        table.add_row(*cells)
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": here, "results": results}, indent=2))


if __name__ == "__main__":
    main()
