"""Quantization methods: how one set of layers is put in low precision, each with its own settings.

`Method` (the union at the bottom) is the table: a method is one class here (its recipe fields
and a `build` function) and one entry in that union. In a recipe it is the quantize stage's `method:`, e.g.
`method: {name: static, calibrate: entropy}` or `method: {name: rtn, block_size: 128}`; without
one, int8 uses `dynamic` and int4 `rtn`.

All of them go through `onnxruntime.quantization`, except `openvino`, which is NNCF's (OpenVINO's
quantizer) for OpenVINO's kernels, with onnxruntime's for the MatMuls NNCF leaves float; nothing
here quantizes by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimize import cpu
from optimize.runtime.engines import DEFAULT_ENGINE, ENGINES, openvino_engine
from optimize.runtime.untyped import OnnxProto, OrtObject, OvObject


class CalibrationReader(Protocol):
    """onnxruntime's CalibrationDataReader: feeds of tokenized calibration texts."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...

    def rewind(self) -> None: ...


class MethodBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: ClassVar[str]  # the low precision this method produces: int8 or int4

    @property
    def engine(self) -> str:
        """What runs the graph this method writes (`runtime.ENGINES`)."""
        return DEFAULT_ENGINE

    def label(self) -> str:
        return str(getattr(self, "name", type(self).__name__))

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        raise NotImplementedError


# The ops whose constant weight a method quantizes, and which input holds it.
WEIGHT_INPUT = {"MatMul": 1, "Gather": 0, "Attention": 1, "EmbedLayerNormalization": 2}

Int8Weights = Literal["auto", "s8", "s8-reduced", "u8"]
INT8_WEIGHTS_HELP = (
    "auto: full-range s8 on CPUs with VNNI/AMX/dotprod, 7-bit s8-reduced elsewhere "
    "(full range saturates onnxruntime's AVX2 kernel, see optimize/cpu.py); u8: unsigned weights "
    "(onnxruntime's u8u8 kernel, which sums in 32 bits on any x86 CPU)"
)


def int8_weight_range(weights: Int8Weights, info: cpu.CpuInfo) -> str:
    """`s8` (full range), `s8-reduced` (7 bits) or `u8`, as set or from what the CPU can sum safely."""
    if weights != "auto":
        return weights
    return "s8" if info.int8_dot else "s8-reduced"


def _weight_type(weights: Int8Weights) -> tuple[OrtObject, bool]:
    """onnxruntime's weight type and reduce_range for a weight setting on this CPU."""
    from onnxruntime import quantization as q

    chosen = int8_weight_range(weights, cpu.current())
    return (q.QuantType.QUInt8 if chosen == "u8" else q.QuantType.QInt8), chosen == "s8-reduced"


class Dynamic(MethodBase):
    """int8 weights; activations quantized at run time (DynamicQuantizeMatMul, MatMulInteger)."""

    precision: ClassVar[str] = "int8"
    name: Literal["dynamic"] = "dynamic"
    per_channel: bool = Field(True, description="int8 weight scales per output channel")
    weights: Int8Weights = Field("auto", description=INT8_WEIGHTS_HELP)
    fuse: bool = Field(
        False,
        description="fuse attention, layer norms and embeddings (onnxruntime.transformers) before quantizing, "
        "so attention runs as one int8 QAttention op (measure it: it was slower on our AVX-512 VNNI CPU)",
    )

    def label(self) -> str:
        return f"dynamic {int8_weight_range(self.weights, cpu.current())}{' fused' if self.fuse else ''}"

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        from onnxruntime import quantization as q

        weight_type, reduce_range = _weight_type(self.weights)
        q.quantize_dynamic(
            str(src),
            str(out),
            per_channel=self.per_channel,
            weight_type=weight_type,
            reduce_range=reduce_range,
            op_types_to_quantize=list(WEIGHT_INPUT),
            nodes_to_quantize=layers,
            # Fused contrib ops defeat ONNX shape inference; their float outputs are float.
            extra_options={"DefaultTensorType": 1},
        )


class Static(MethodBase):
    """int8 weights and activations, activation ranges calibrated on the calibration texts, as QDQ
    pairs around float ops (onnxruntime fuses them into int8 kernels) or as QOperator ops
    (QLinearMatMul, ...)."""

    precision: ClassVar[str] = "int8"
    name: Literal["static"]
    calibrate: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = Field(True, description="int8 weight scales per output channel")
    weights: Int8Weights = Field("auto", description=INT8_WEIGHTS_HELP)
    format: Literal["qdq", "qoperator"] = Field(
        "qdq", description="QuantizeLinear/DequantizeLinear pairs, or QLinear ops"
    )

    def label(self) -> str:
        return f"static {self.format} {int8_weight_range(self.weights, cpu.current())} ({self.calibrate})"

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        from onnxruntime import quantization as q

        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }[self.calibrate]
        weight_type, reduce_range = _weight_type(self.weights)
        qoperator = self.format == "qoperator"
        q.quantize_static(
            str(src),
            str(out),
            calibration(),
            quant_format=q.QuantFormat.QOperator if qoperator else q.QuantFormat.QDQ,
            per_channel=self.per_channel,
            # QLinearMatMul takes uint8 activations; QDQ pairs are symmetric int8.
            activation_type=q.QuantType.QUInt8 if qoperator else q.QuantType.QInt8,
            weight_type=weight_type,
            op_types_to_quantize=["MatMul", "Gather"],
            reduce_range=reduce_range,
            nodes_to_quantize=layers,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": not qoperator},
        )


class WeightOnly8(MethodBase):
    """8-bit weights in blocks (MatMulNBits) multiplied with activations quantized to int8 per block
    at run time (accuracy level 4): the kernel onnxruntime tunes for LLM decoding."""

    precision: ClassVar[str] = "int8"
    name: Literal["nbits8"]
    block_size: int = Field(32, ge=16, le=4096, description="weights per scale (a power of two)")

    def label(self) -> str:
        return f"nbits8 b{self.block_size}"

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=True, accuracy_level=4, bits=8
        )
        quantizer = nbits.MatMulNBitsQuantizer(
            str(src),
            bits=8,
            block_size=self.block_size,
            is_symmetric=True,
            accuracy_level=4,
            nodes_to_include=layers,
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


class WeightOnly4(MethodBase):
    """int4 weights in blocks (MatMulNBits), activations stay float: RTN, HQQ, or GPTQ (calibrated)."""

    precision: ClassVar[str] = "int4"
    name: Literal["rtn", "hqq", "gptq"] = "rtn"
    block_size: int = Field(128, ge=16, le=4096, description="weights per scale (a power of two)")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128, ...), not {value}")
        return value

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        algo: OvObject = {
            "rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
            "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=self.block_size),
            "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration(), block_size=self.block_size),
        }[self.name]()
        quantizer = nbits.MatMulNBitsQuantizer(
            str(src), block_size=self.block_size, is_symmetric=True, nodes_to_include=layers, algo_config=algo
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


class OpenVINOStatic(MethodBase):
    """int8 weights and activations for OpenVINO's CPU kernels (int8 brgemm with VNNI or AMX, int8
    attention): NNCF's post-training quantization for transformers writes QDQ pairs into the ONNX
    graph, after SmoothQuant (which moves activation outliers into the weights), with activation
    ranges from the calibration texts. The artifact runs it with OpenVINO (manifest `runtime.engine`);
    onnxruntime reads the same file where OpenVINO is missing, slower. Needs `openvino` and `nncf`.

    The defaults are measured (all-MiniLM-L6-v2, STS-B test sentences, cosine_min vs fp32): NNCF's
    own (SmoothQuant 0.95, its range estimator) 0.934; min-max ranges 0.950; min-max with
    SmoothQuant 0.8 0.985, at the same speed. The ops left in float (layer norms, softmax, GELU, the
    attention subgraph's float parts) run in bf16 where the CPU computes bf16 natively (`float_ops:
    auto`): 175.21 vs 192.04 ms at batch 32, L=128 on our AVX-512 BF16 CPU, same run. Symmetric
    activations (NNCF's `performance` preset) put every int8 MatMul on OpenVINO's faster kernel path
    (no zero point): 5.737 vs 6.036 ms at batch 1 and 178.906 vs 181.738 at batch 32, in turns;
    Spearman 0.8189 vs 0.8206, cosine_min 0.976 vs 0.979. Attention's second MatMul is int8 too
    (`attention_output`, see `_quantize_attention_output`)."""

    precision: ClassVar[str] = "int8"
    name: Literal["openvino"]
    smooth_quant: float = Field(0.8, ge=-1, le=1, description="SmoothQuant alpha for MatMuls (-1: off)")
    calibrate: Literal["minmax", "nncf"] = Field("minmax", description="activation ranges: min-max or NNCF's default")
    samples: int = Field(256, ge=1, description="calibration texts to measure activation ranges on")
    float_ops: Literal["auto", "f32", "bf16"] = Field(
        "auto", description="precision of the ops left in float; auto: bf16 where the CPU computes bf16 natively"
    )
    activations: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="activation ranges: symmetric (no zero point: OpenVINO's faster int8 path) or not"
    )
    attention_output: Literal["int8", "float"] = Field(
        "int8", description="attention's probabilities x values MatMul, which NNCF's transformer preset leaves float"
    )

    @property
    def engine(self) -> str:
        if self.float_ops == "auto":
            return float_engine()
        return openvino_engine(self.float_ops == "bf16")

    def label(self) -> str:
        floats = "bf16" if self.engine.endswith("bf16") else "f32"
        return f"openvino static s8 ({self.calibrate}, smooth quant {self.smooth_quant}, float ops {floats})"

    def build(self, src: Path, out: Path, layers: list[str], calibration: Callable[..., CalibrationReader]) -> None:
        import nncf
        import onnx
        from nncf.quantization import advanced_parameters as advanced
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        nncf.set_log_level(logging.ERROR)
        reader = calibration(self.samples)
        feeds = list(iter(reader.get_next, None))
        model = onnx.load(str(src))
        constants = {i.name for i in model.graph.initializer}
        # Weighted MatMuls left out of `layers` stay float; attention's MatMuls (no weights) are NNCF's.
        ignored = [
            n.name
            for n in model.graph.node
            if n.op_type == "MatMul" and n.name not in layers and any(i in constants for i in n.input)
        ]
        options: dict[str, object] = {
            "smooth_quant_alphas": advanced.AdvancedSmoothQuantParameters(matmul=self.smooth_quant)
        }
        if self.calibrate == "minmax":
            options["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=getattr(nncf.QuantizationPreset, "PERFORMANCE" if self.activations == "symmetric" else "MIXED"),
            subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=advanced.AdvancedQuantizationParameters(**options),
        )
        onnx.save(quantized, str(out))
        if self.attention_output == "int8":
            reader.rewind()
            _quantize_attention_output(quantized.graph, out, src, reader)


def _quantize_attention_output(graph: OnnxProto, path: Path, float_path: Path, reader: CalibrationReader) -> None:
    """int8 inputs for each MatMul of softmax probabilities by values, with min-max ranges from the
    calibration texts (onnxruntime's static quantizer, symmetric, the MatMul's output left float):
    OpenVINO then runs all of attention in int8. all-MiniLM-L6-v2, L=128, our AVX-512 VNNI CPU, in
    turns: 5.979 vs 6.165 ms at batch 1; STS-B Spearman 0.8198 vs 0.8201, cosine_min 0.9817 vs 0.9856.
    NNCF leaves this MatMul float by design (its transformer patterns), so onnxruntime's quantizer,
    limited to these nodes, adds the pairs. The ranges are measured on the float model at
    `float_path` (as NNCF measures its own; the tensors keep their names through NNCF) and handed to
    the quantizer as its calibration cache: calibrating the QDQ graph in onnxruntime took 47 of the
    stage's 189 s on MiniLM here."""
    import inspect
    import tempfile

    from onnxruntime import quantization as q
    from onnxruntime.quantization import calibrate

    producers = {output: node for node in graph.node for output in node.output}  # `graph`: the one at `path`
    targets = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and getattr(producers.get(node.input[0]), "op_type", "") == "Softmax"
    ]
    if not targets:
        return
    cached = "calibration_cache_path" in inspect.signature(q.quantize_static).parameters
    with tempfile.TemporaryDirectory(prefix="optimize-ranges-") as tmp:
        options: dict[str, object] = {}
        if cached:  # onnxruntime that takes ranges (1.31 does); older ones calibrate the QDQ graph
            calibrator = calibrate.create_calibrator(float_path, ["MatMul"], augmented_model_path=f"{tmp}/aug.onnx")
            calibrator.collect_data(reader)
            options["calibration_cache_path"] = Path(tmp) / "ranges.json"
            calibrate.save_tensors_data(calibrator.compute_data(), options["calibration_cache_path"])
            del calibrator
        q.quantize_static(
            str(path),
            str(path),
            None if cached else reader,
            **options,
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=targets,
            activation_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )


def float_engine() -> str:
    """OpenVINO running a float graph: in bf16 where this CPU computes bf16 natively, else fp32."""
    return openvino_engine(cpu.current().bf16_math)


def openvino_available() -> bool:
    """True when OpenVINO and NNCF are installed (the `openvino` method can be built and run)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in (str(ENGINES[float_engine()].module), "nncf"))


# The table of methods: one entry per class above.
Method = Annotated[Dynamic | Static | WeightOnly8 | WeightOnly4 | OpenVINOStatic, Field(discriminator="name")]


def default_method(precision: str) -> Dynamic | WeightOnly4:
    return WeightOnly4() if precision == "int4" else Dynamic()
