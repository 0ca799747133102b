"""Load on OpenAI-compatible servers, in one run on this machine: our runtime's server and the peers
users would pick, each started here and driven alike.

    python bench/serve.py embeddings ARTIFACT [--concurrency 1 4 16] [--slo-ms 50] [--seconds 10]
    python bench/serve.py generation ARTIFACT [--concurrency 1 4] [--max-tokens 64] [--requests 8]
    python bench/serve.py embeddings --url http://host:port/v1 ...   (any server, not started here)

Closed loop: `concurrency` clients each send their next request when the last is answered, for
`seconds` (embeddings) or `requests` each (generation). Open loop (`--rate R`): Poisson arrivals at
R requests/s whatever the answers. Reported per system and level: requests, throughput, latency
p50/p90/p99, goodput (answered requests per second within the SLO), and for generation TTFT and
TPOT (time per output token after the first) p50/p90, from streamed responses. Peers: infinity-emb
(`infinity_emb v2` on the checkpoint, `--infinity-engine`) for embeddings and
llama-cpp-python's server (`python -m llama_cpp.server`) on the artifact's GGUF for generation,
where installed. The CPU model and flags are printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The weather in the mountains changes quickly in spring.",
    "Two dogs run across a snowy field.",
    "She ordered a coffee and opened her laptop.",
    "Stock markets fell sharply after the announcement.",
    "A child is reading a book under a tree.",
]
OURS = "optimize runtime serve"
PROMPTS = [
    "Write one sentence about the sea.",
    "Give me three tips for staying focused while working from home.",
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def started(command: list[str], port: int, ready: str = "/health", env: dict[str, str] | None = None) -> Iterator[str]:
    """A server process on `port` (its base URL once `ready` answers), stopped at the end."""
    import httpx

    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}: see {log.name}")
            try:
                if httpx.get(url + ready, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready_kb = _rss_kb(proc.pid)
        yield url
        print(
            f"{' '.join(command[:3])}: RSS {ready_kb} kB when ready, {_rss_kb(proc.pid)} kB at the end", file=sys.stderr
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _rss_kb(pid: int) -> int:
    from optimize.costs import status_mb

    return round(status_mb("VmRSS", pid) * 1024)


async def closed_loop(send: Any, concurrency: int, seconds: float, requests: int | None) -> list[dict[str, float]]:
    """`concurrency` clients, each sending as soon as its last answer is in."""
    end = time.perf_counter() + seconds
    results: list[dict[str, float]] = []

    async def client(index: int) -> None:
        sent = 0
        while (requests is None and time.perf_counter() < end) or (requests is not None and sent < requests):
            results.append(await send(index * 1000 + sent))
            sent += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return results


async def open_loop(send: Any, rate: float, seconds: float) -> list[dict[str, float]]:
    """Poisson arrivals at `rate` per second for `seconds`, whatever the answers: each sent at its
    time on one schedule drawn ahead, so a busy event loop sends late ones at once instead of
    stretching every later gap (which lowered the rate it reached). Sending stops at `seconds`: a
    client that cannot keep up sends fewer (the level's label says how many a second it sent)."""
    rng = random.Random(0)
    tasks, start, n, due = [], time.perf_counter(), 0, 0.0
    while due < seconds and time.perf_counter() - start < seconds:
        await asyncio.sleep(max(start + due - time.perf_counter(), 0))  # 0: late, but the others run first
        tasks.append(asyncio.create_task(send(n)))
        n, due = n + 1, due + rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


def summary(results: list[dict[str, float]], wall: float, slo_ms: float) -> dict[str, float]:
    ok = [r for r in results if r["ok"]]
    latency = np.array([r["latency_ms"] for r in ok]) if ok else np.array([np.nan])
    row = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "refused_429": sum(bool(r.get("refused")) for r in results),
        "wrong": sum(r.get("status") == 200 and not r["ok"] for r in results),
        "transport_errors": sum(r.get("status") == 0 for r in results),
        "min_cosine": round(min((r["cosine"] for r in ok if "cosine" in r), default=float("nan")), 5),
        "throughput_rps": round(len(ok) / wall, 2),
        "p50_ms": round(float(np.percentile(latency, 50)), 2),
        "p90_ms": round(float(np.percentile(latency, 90)), 2),
        "p99_ms": round(float(np.percentile(latency, 99)), 2),
        "goodput_rps": round(sum(r["latency_ms"] <= slo_ms for r in ok) / wall, 2),
    }
    if ok and "ttft_ms" in ok[0]:
        ttft = np.array([r["ttft_ms"] for r in ok])
        tpot = np.array([r["tpot_ms"] for r in ok if r["tokens"] > 1] or [np.nan])
        row |= {
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 2),
            "ttft_p90_ms": round(float(np.percentile(ttft, 90)), 2),
            "tpot_p50_ms": round(float(np.percentile(tpot, 50)), 2),
            "tpot_p90_ms": round(float(np.percentile(tpot, 90)), 2),
            "output_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        }
    return row


async def embeddings_of(client: Any, model: str) -> np.ndarray:
    """SENTENCES embedded in one request: what each single-sentence answer is checked against."""
    return _vectors((await client.post("/embeddings", json={"model": model, "input": SENTENCES})).json())


def _vectors(answer: dict[str, Any]) -> np.ndarray:
    """An embeddings answer's vectors, in the order of its inputs."""
    return np.array([d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])])


def embedding_sender(client: Any, model: str, expected: np.ndarray) -> Any:
    """Each answer must be closest to its own sentence's row of `expected` (cosine): a lost or
    mixed-up answer counts as `wrong`, a 429 as `refused`. (Batches of other sentences change an
    int8 model's answer a little: its activation scales are the batch's.)"""
    import aiohttp

    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)

    async def send(n: int) -> dict[str, float]:
        index = n % len(SENTENCES)
        start = time.perf_counter()
        try:
            answer = await client.post("/embeddings", json={"model": model, "input": [SENTENCES[index]]})
        except (aiohttp.ClientError, OSError):  # a connection reset or closed under the client: counted, not fatal
            return {"ok": False, "latency_ms": (time.perf_counter() - start) * 1000, "status": 0}
        latency = (time.perf_counter() - start) * 1000
        status = answer.status_code
        result = {"ok": False, "latency_ms": latency, "refused": status == 429, "status": status}
        if status == 200:
            cosine = unit @ np.array(answer.json()["data"][0]["embedding"])
            result |= {"ok": int(cosine.argmax()) == index, "cosine": float(cosine[index])}
        return result

    return send


def generation_sender(client: Any, model: str, max_tokens: int) -> Any:
    async def send(n: int) -> dict[str, float]:
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0}
        # llama-cpp-python's server penalizes repeats (1.1) unless told: greedy would give another,
        # shorter text than ours on the same GGUF (measured), and less work is not a faster server
        body["repeat_penalty"] = 1.0
        body["messages"] = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
        start, first, tokens, ok = time.perf_counter(), None, 0, False
        async with client.stream("POST", "/chat/completions", json=body) as answer:
            ok = answer.status_code == 200
            async for line in answer.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    first = first or time.perf_counter()
                    tokens += 1  # a chunk per token in both servers
        end = time.perf_counter()
        first = first or end
        return {
            "ok": ok and tokens > 0,
            "latency_ms": (end - start) * 1000,
            "ttft_ms": (first - start) * 1000,
            "tpot_ms": (end - first) * 1000 / max(tokens - 1, 1),
            "tokens": tokens,
        }

    return send


class Posts:
    """JSON posts to `url`/v1 through aiohttp, answered as httpx answers (`status_code`, `json()`):
    what the embeddings load is sent with. A client on the same 2 cores as the server spends less
    of them per request than httpx: asked for 400 arrivals a second, httpx sent 93.5, aiohttp 392.8."""

    def __init__(self, url: str):
        self.base = url + "/v1"

    async def __aenter__(self) -> Posts:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=300)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def post(self, path: str, json: dict[str, Any]) -> Any:
        from types import SimpleNamespace

        async with self.session.post(self.base + path, json=json) as answer:
            data = await answer.json(content_type=None)
        return SimpleNamespace(status_code=answer.status, json=lambda: data)


def run_levels(url: str, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    def connect() -> Any:  # embeddings through aiohttp (light on the shared cores); streams through httpx
        if args.mode == "embeddings":
            return Posts(url)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        return httpx.AsyncClient(base_url=url + "/v1", timeout=300, limits=limits)

    async def level(concurrency: int | None) -> dict[str, Any]:
        async with connect() as client:
            if args.mode == "embeddings":
                send = embedding_sender(client, model, await embeddings_of(client, model))
            else:
                send = generation_sender(client, model, args.max_tokens)
            await send(0)  # warm-up
            start = time.perf_counter()
            if concurrency is None:
                results = await open_loop(send, args.rate, args.seconds)
            else:
                requests = args.requests if args.mode == "generation" else None
                results = await closed_loop(send, concurrency, args.seconds, requests)
            wall = time.perf_counter() - start
        sent = f" (sent {len(results) / args.seconds:.1f}/s)" if concurrency is None else ""
        label = f"rate {args.rate}/s{sent}" if concurrency is None else f"concurrency {concurrency}"
        return {"level": label, **summary(results, wall, args.slo_ms)}

    levels: list[int | None] = [None] if args.rate else list(args.concurrency)
    return [asyncio.run(level(c)) for c in levels]


def systems(args: argparse.Namespace) -> Iterator[tuple[str, Any, str]]:
    """(label, a context manager giving the base URL, the model name to send) for each system."""
    if args.url:
        yield "given server", _given(args.url), args.model or "model"
        return
    artifact = args.artifact.resolve()
    for engine in args.engine:
        port = free_port()
        ours = [sys.executable, "-m", "runtime", str(artifact), "serve", "--port", str(port), "--engine", engine]
        env = {"PYTHONPATH": str(args.runtime or artifact)}
        yield OURS + ("" if engine == "auto" else f" --engine {engine}"), started(ours, port, env=env), artifact.name
    if args.no_peers:
        return
    infinity = args.infinity or shutil.which("infinity_emb")
    if args.mode == "embeddings" and infinity:
        checkpoint = Path(args.checkpoint or _checkpoint_of(artifact))
        for engine in args.infinity_engine:
            folder = _onnx_folder(checkpoint) if engine == "optimum" else checkpoint
            port = free_port()
            command = [str(infinity), "v2", "--model-id", str(folder), "--port", str(port), "--engine", engine]
            # mean pooling: what the checkpoint's 1_Pooling says (infinity's optimum engine takes CLS otherwise)
            command += ["--device", "cpu", "--no-bettertransformer", "--url-prefix", "/v1", "--pooling-method", "mean"]
            yield f"infinity-emb ({engine}) (peer)", started(command, port, ready="/v1/models"), str(folder)
    gguf = artifact / "gguf" / "model.gguf"
    if args.mode == "generation" and gguf.is_file() and (args.llama_server or _has("llama_cpp.server")):
        port = free_port()
        python = args.llama_server or sys.executable
        command = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
        # no --chat_format: it renders the GGUF's own chat template, as ours renders the artifact's
        command += ["--n_threads", str(os.cpu_count()), "--n_ctx", "4096"]
        command += ["--interrupt_requests", "False"]  # its default drops a running stream when another request comes
        yield "llama-cpp-python server on the gguf (peer)", started(command, port, ready="/v1/models"), "model"


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url.removesuffix("/v1")


def _onnx_folder(checkpoint: Path) -> Path:
    """The checkpoint as infinity-emb's optimum engine loads it: its files beside an fp32 ONNX export
    (optimum's exporter, the one users run; the export of infinity's own environment fails with
    torch 2.13), that file linked a second time under another name: infinity-emb 0.0.78 hands
    optimum an absolute file name, which optimum (1.26 and 2.1) compares with bare names when the
    folder holds exactly one ONNX file, and fails."""
    import tempfile

    from optimum.exporters.onnx import main_export

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-infinity-"))
    for item in checkpoint.iterdir():
        if item.suffix not in (".onnx", ".safetensors", ".bin"):
            (folder / item.name).symlink_to(item.resolve())
    main_export(str(checkpoint), folder / "export", task="feature-extraction", do_validation=False)
    (folder / "export" / "model.onnx").rename(folder / "model.onnx")
    os.link(folder / "model.onnx", folder / "model_fp32.onnx")
    shutil.rmtree(folder / "export")
    return folder


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _checkpoint_of(artifact: Path) -> str:
    """The checkpoint the artifact was made from: the recipe's `model`, resolved as optimize does."""
    import yaml

    from optimize.models.loading import resolve

    manifest = json.loads((artifact / "manifest.json").read_text())
    spec = yaml.safe_load(manifest["provenance"]["recipe"]).get("model")
    return str(resolve(spec)) if spec else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["embeddings", "generation"])
    parser.add_argument("artifact", nargs="?", type=Path, help="an optimize artifact (its server is started)")
    parser.add_argument("--url", help="drive this OpenAI-compatible server instead (not started here)")
    parser.add_argument("--model", help="with --url: the model name to send")
    parser.add_argument(
        "--checkpoint", help="embeddings: the checkpoint infinity-emb serves (default: the artifact's source)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second instead")
    parser.add_argument("--seconds", type=float, default=10.0, help="embeddings: time per level")
    parser.add_argument("--requests", type=int, default=4, help="generation: requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slo-ms", type=float, default=None, help="goodput counts answers within this (50 / 5000)")
    parser.add_argument(
        "--infinity",
        help="the infinity_emb command, e.g. in its own venv (pip install torch==2.13.0, then pip install "
        "'infinity-emb[server,optimum,torch]==0.0.78' 'transformers<4.49' 'datasets<3.3' 'pyarrow<20' "
        "'optimum==1.26.1', pip uninstall optimum-onnx); default: the one on PATH",
    )
    parser.add_argument(
        "--llama-server",
        help="the python of a venv with llama-cpp-python's server (pip install 'llama-cpp-python[server]==0.3.36' "
        "'sse-starlette<2.2' 'starlette<0.47' 'fastapi<0.116': with sse-starlette 3 its streams break under "
        "concurrency); default: this python",
    )
    parser.add_argument(
        "--infinity-engine",
        nargs="+",
        default=["optimum", "torch"],
        help="infinity-emb's backends to run: optimum (onnxruntime on an fp32 export), torch (sentence-transformers)",
    )
    parser.add_argument(
        "--engine",
        nargs="+",
        default=["auto"],
        help="generation: the engines our server runs, one server each (auto: its default; onnxruntime-genai, "
        "openvino-genai, llama.cpp)",
    )
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--runtime",
        type=Path,
        help="the folder holding the runtime/ package to serve with (default: the artifact's own)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.url and args.artifact is None:
        parser.error("give an ARTIFACT or --url")
    args.concurrency = args.concurrency or ([1, 4, 16] if args.mode == "embeddings" else [1, 4])
    args.slo_ms = args.slo_ms or (50.0 if args.mode == "embeddings" else 5000.0)

    from rich.console import Console

    from optimize import cpu

    here = cpu.current().summary()
    rows: list[dict[str, Any]] = []
    differences: list[float] = []
    for label, context, model in systems(args):
        try:
            with Console(stderr=True).status(f"{label}: starting and loading"), context as url:
                if args.mode == "embeddings" and args.artifact and label == OURS:
                    differences.append(embeddings_differ(url, model, args.artifact))
                for row in run_levels(url, model, args):
                    rows.append({"system": label, **row})
        except Exception as exc:  # a peer that fails is reported, the others still measured
            print(f"{label}: failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            rows.append({"system": f"{label}: failed ({type(exc).__name__})"})
    report(rows, differences, args, here)


def report(
    rows: list[dict[str, Any]], differences: list[float], args: argparse.Namespace, here: dict[str, Any]
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{args.mode}, SLO {args.slo_ms:g} ms; {os.cpu_count()} threads; CPU {here['model']}, "
        f"flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    columns = [c for c in max(rows, key=len) if c != "system"] if rows else []
    table.add_column("system")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["system"], *(str(row.get(c, "")) for c in columns))
    Console(width=240).print(table)
    best = within_slo(rows, args.slo_ms)
    for system, row in best.items():
        print(f"best with p99 <= {args.slo_ms:g} ms: {system}: {row['throughput_rps']} req/s ({row['level']})")
    if OURS in best:
        for system, row in best.items():
            if system != OURS:
                print(f"  ours / {system}: {best[OURS]['throughput_rps'] / row['throughput_rps']:.2f}x")
    if differences:
        print(f"our server's embeddings vs the runtime's embed: max abs difference {differences[0]:.3g}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": here, "rows": rows, "embedding_max_abs_diff": differences}, indent=2))


def within_slo(rows: list[dict[str, Any]], slo_ms: float) -> dict[str, dict[str, Any]]:
    """Per system, its level of highest throughput whose p99 is within the SLO, with no errors."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        within = row.get("errors") == 0 and row.get("p99_ms", float("inf")) <= slo_ms
        if within and row["throughput_rps"] > best.get(row["system"], {}).get("throughput_rps", -1):
            best[row["system"]] = row
    return best


def embeddings_differ(url: str, model: str, artifact: Path) -> float:
    """Largest difference between the server's embeddings of SENTENCES and the runtime's `embed`."""
    import httpx

    from optimize import runtime

    served = _vectors(httpx.post(url + "/v1/embeddings", json={"model": model, "input": SENTENCES}, timeout=60).json())
    return float(np.abs(served - runtime.load(artifact).embed(SENTENCES)).max())


if __name__ == "__main__":
    main()
