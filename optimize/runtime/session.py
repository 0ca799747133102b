"""Sessions: the execution providers an artifact may use (TensorRT -> CUDA -> CPU, as far as its
target allows), the engines that run model.onnx, and OpenVINO's CPU plugin behind the part of
onnxruntime's InferenceSession the runtime uses; `make_session` falls back down the list.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .engines import DEFAULT_ENGINE, ENGINES
from .manifest import RuntimeSettings
from .untyped import OvObject

if TYPE_CHECKING:
    import onnxruntime as ort


PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_HINT = " (with a GPU, `pip install 'onnxruntime-gpu[cuda,cudnn]'` brings the CUDA and cuDNN libraries it needs)"
# Which providers may run a model compiled for each target, best first.
TARGET_PROVIDERS = {
    "tensorrt": PREFERENCE,
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


def select_providers(available: Sequence[str], target: str = "cpu") -> list[str]:
    """Providers to try, best first: those the target allows that this onnxruntime offers."""
    allowed = TARGET_PROVIDERS.get(target, TARGET_PROVIDERS["cpu"])
    chosen = [p for p in allowed if p in available]
    return chosen or ["CPUExecutionProvider"]


def provider_options(provider: str, settings: RuntimeSettings, cache_dir: Path) -> dict[str, str | bool]:
    """Options per provider, from the manifest's `runtime` section (what compile chose for the target).
    TensorRT builds its engine at the first load on the target GPU and caches it; the cache files
    are keyed by GPU architecture and TensorRT version, so one folder serves several machines."""
    if provider == "TensorrtExecutionProvider":
        return {
            "trt_fp16_enable": bool(settings.get("fp16", True)),
            "trt_int8_enable": bool(settings.get("int8", False)),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir / "trt-engines"),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir / "trt-timing"),
        }
    if provider == "CUDAExecutionProvider":
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}


@dataclass(frozen=True)
class Port:
    """An input or output as onnxruntime describes it (the fields this runtime reads)."""

    name: str
    shape: list[int | str]
    type: str


def port_name(port: OvObject) -> str:
    """An OpenVINO port's name as the graph named its input or output: the converter may give a
    tensor the names of ops folded into it too (`/Concat_output_0` beside `past_key_values.0.key`),
    and `any_name` can be either."""
    return str(next((name for name in sorted(port.get_names()) if not name.startswith("/")), port.any_name))


class OpenVINOSession:
    """OpenVINO's CPU plugin behind the part of onnxruntime's InferenceSession this runtime uses. It
    compiles the ONNX file itself (its own fusions and int8 kernels for the QDQ pairs NNCF wrote).
    The float ops' precision is set (`INFERENCE_PRECISION_HINT`), never left to OpenVINO, whose
    default changes with the CPU: bf16 where it was measured so, fp32 otherwise.

    Input shapes that recur (fixed-length padding, steady batch sizes) get a model compiled for that
    shape after `SPECIALIZE_AFTER` calls, at most `MAX_SPECIALIZED` of them (~0.5 s and one more copy
    of the weights each). When all are taken, a shape whose recent calls weigh more than twice the
    coldest compiled shape's takes its place; a call's weight decays by `DECAY` with every later
    call. So a steady new shape gets a slot within a few calls, while shapes called in turn at equal
    rates never evict each other. Every other shape runs on the dynamic-shape model. MiniLM int8,
    L=128, our 2-core AVX-512 CPU, one run of the runtime: 6.97 vs 7.78 ms at batch 1, 187.44 vs
    196.38 ms at batch 32 (the peer: 9.55, 312.20)."""

    SPECIALIZE_AFTER = 3
    MAX_SPECIALIZED = 8
    DECAY = 0.9

    def __init__(self, model_path: Path, threads: int, precision: str = "f32"):
        import openvino

        self.core = openvino.Core()
        self.config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.path = Path(model_path)
        self.model = self.core.read_model(str(model_path))
        self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [port_name(port) for port in self.compiled.outputs]
        self.seen: dict[tuple[tuple[int, ...], ...], int] = {}
        self.weights: dict[tuple[tuple[int, ...], ...], tuple[float, int]] = {}  # shape: (weight, at call)
        self.calls = 0
        self.specialized: dict[tuple[tuple[int, ...], ...], OvObject] = {}
        self.lock = threading.Lock()  # infer requests run one call at a time; onnxruntime's run is thread-safe

    def _request(self, feed: dict[str, np.ndarray]) -> OvObject:
        """The infer request for these inputs' shapes: a static-shape one for a recurring shape."""
        shape = tuple(tuple(feed[name].shape) for name in sorted(feed))
        self.seen[shape] = calls = self.seen.get(shape, 0) + 1
        self.calls += 1
        self.weights[shape] = (self._weight(shape) + 1, self.calls)
        if shape in self.specialized:
            return self.specialized[shape]
        if calls < self.SPECIALIZE_AFTER:
            return self.request
        if len(self.specialized) >= self.MAX_SPECIALIZED:
            coldest = min(self.specialized, key=self._weight)
            if self._weight(shape) <= 2 * self._weight(coldest):
                return self.request
            del self.specialized[coldest]
        model = self.model.clone()
        model.reshape({port_name(port): list(feed[port_name(port)].shape) for port in model.inputs})
        self.specialized[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.specialized[shape]

    def _weight(self, shape: tuple[tuple[int, ...], ...]) -> float:
        """The shape's calls so far, each weighted DECAY ** (calls of any shape made since)."""
        weight, at = self.weights.get(shape, (0.0, self.calls))
        return weight * self.DECAY ** (self.calls - at)

    @staticmethod
    def _port(port: OvObject) -> Port:
        shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return Port(port_name(port), shape, f"tensor({port.get_element_type().to_string()})")

    def get_inputs(self) -> list[Port]:
        return [self._port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[Port]:
        return [self._port(p) for p in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return ["OpenVINO (CPU)"]

    def run(self, names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        indices = range(len(self.output_names)) if names is None else [self.output_names.index(n) for n in names]
        with self.lock:
            request = self._request(feed)
            # The request reads the caller's arrays in place (no copy in); outputs are copied out, as
            # the request reuses its buffers on the next call.
            request.infer(feed, share_inputs=True, share_outputs=True)
            return [request.get_output_tensor(i).data.copy() for i in indices]


OPENVINO_MISSING = (
    "openvino: not installed; onnxruntime runs this OpenVINO-tuned int8 graph instead (the same graph; "
    "slower on it): `pip install openvino` for the speed it was chosen for"
)
OPENVINO_MISSING_OWN_FILE = (
    "openvino: not installed; onnxruntime runs model.onnx, the fastest graph measured for it: "
    "`pip install openvino` for the faster OpenVINO one"
)


def make_session(
    model_path: Path,
    target: str = "cpu",
    threads: int | None = None,
    available: Sequence[str] | None = None,
    settings: RuntimeSettings | None = None,
    openvino_path: Path | None = None,
) -> tuple[ort.InferenceSession | OpenVINOSession, list[str]]:
    """An InferenceSession on the best provider that actually starts; falls back down the list.
    Returns the session and a note per provider that was tried and could not be used. The
    `openvino` engines (settings) run on OpenVINO when it imports (`openvino_path`, the artifact's
    OpenVINO file, else `model_path`), else `model_path` on onnxruntime."""
    import onnxruntime as ort

    notes: list[str] = []
    threads = threads or os.cpu_count() or 1
    row = ENGINES.get(str((settings or {}).get("engine", DEFAULT_ENGINE)))
    precision = row.float_ops if row else None
    if precision is not None:
        try:
            return OpenVINOSession(openvino_path or model_path, threads, precision), notes
        except ImportError:
            notes.append(OPENVINO_MISSING if openvino_path is None else OPENVINO_MISSING_OWN_FILE)
        except Exception as exc:  # OpenVINO present but unable to compile the graph on this machine
            notes.append(f"openvino: {str(exc).splitlines()[0][:200]}; onnxruntime runs the graph instead")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    providers = select_providers(available if available is not None else ort.get_available_providers(), target)
    cache_dir = Path(os.environ.get("OPTIMIZE_RUNTIME_CACHE", Path.home() / ".cache" / "optimize-runtime"))
    for i, provider in enumerate(providers):
        chain = [(p, provider_options(p, settings or {}, cache_dir)) for p in providers[i:]]
        try:
            session = ort.InferenceSession(str(model_path), options, providers=chain)
        except Exception as exc:  # a provider whose device or libraries are missing fails here
            notes.append(
                f"{provider}: {str(exc).splitlines()[0][:200]}{GPU_HINT if provider != PREFERENCE[-1] else ''}"
            )
            continue
        if session.get_providers()[0] == provider:
            return session, notes
        # onnxruntime fell back silently (e.g. the GPU build on a machine without a GPU)
        notes.append(f"{provider}: not usable on this machine")
    raise RuntimeError("no execution provider could load the model: " + "; ".join(notes))
