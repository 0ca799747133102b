"""A Triton Inference Server model repository from an encoder artifact (`optimize package ARTIFACT
--format triton`): the artifact's fastest file for the engine Triton will run, and a `config.pbtxt`
built as Triton's own `ModelConfig` protobuf (from `tritonclient`), so it cannot hold a field Triton
does not know. Inputs and outputs are read from the graph; the repository is parsed back against the
schema and checked against the graph before it is renamed into place (`check`).

    OUT/NAME/config.pbtxt      backend, max_batch_size, inputs/outputs, dynamic batching, instances
    OUT/NAME/1/model.onnx      onnxruntime backend (TensorRT or CUDA accelerators for GPU targets)
    OUT/NAME/1/model.xml|.bin  openvino backend, where OpenVINO is the artifact's fastest engine
    OUT/NAME/tokenizer.json    what clients tokenize with (Triton runs the graph: token states out;
                               pooling as the artifact's sentence-transformers files say)
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

from optimize import tasks
from optimize.artifact import write as artifact_files
from optimize.errors import UsageError
from optimize.runtime import on_openvino, openvino_file_of, verify
from optimize.runtime.engines import DEFAULT_ENGINE, ENGINES, openvino_engine
from optimize.runtime.untyped import OrtObject, OvObject

MAX_BATCH = 32  # the largest batch the gates timed
QUEUE_DELAY_US = 2000  # dynamic batching waits this long to fill a batch
# ONNX element types (onnx.TensorProto) and OpenVINO type names -> Triton's data types.
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}
OPENVINO_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "i32": "TYPE_INT32", "i64": "TYPE_INT64"}
Port = tuple[str, str, list[int]]  # name, Triton data type, dims without the batch dimension


def model_config() -> ModuleType:
    """Triton's `model_config_pb2`, loaded from `tritonclient` without its gRPC client."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--format triton checks the repository against Triton's schema: pip install tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    loader_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def graph_ports(model_file: Path) -> tuple[list[Port], list[Port]]:
    """Inputs and outputs of an ONNX or OpenVINO IR file, the first (batch) dimension dropped."""
    if model_file.suffix == ".xml":
        import openvino

        from optimize.runtime.session import port_name

        model = openvino.Core().read_model(str(model_file))

        def ov(ports: OvObject) -> list[Port]:
            return [
                (
                    port_name(p),
                    OPENVINO_TYPES[p.get_element_type().get_type_name()],
                    [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()][1:],
                )
                for p in ports
            ]

        return ov(model.inputs), ov(model.outputs)
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph

    def port(value: OrtObject) -> Port:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
        return value.name, ONNX_TYPES[tensor.elem_type], dims

    initializers = {i.name for i in graph.initializer}
    return [port(v) for v in graph.input if v.name not in initializers], [port(v) for v in graph.output]


def config_text(name: str, backend: str, target: str, inputs: list[Port], outputs: list[Port], fp16: bool) -> str:
    """`config.pbtxt`, built as Triton's ModelConfig message."""
    from google.protobuf import text_format

    pb = model_config()
    config = pb.ModelConfig(name=name, backend=backend, max_batch_size=MAX_BATCH)
    for ports, field in ((inputs, config.input), (outputs, config.output)):
        for port_name, data_type, dims in ports:
            field.add(name=port_name, data_type=pb.DataType.Value(data_type), dims=dims)
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    gpu = target in ("cuda", "tensorrt")
    kind = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    config.instance_group.add(count=1, kind=kind)
    if target == "tensorrt":  # onnxruntime's TensorRT provider, its engine cached on the GPU machine
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16" if fp16 else "FP32"
        accelerator.parameters["trt_engine_cache_enable"] = "1"
    return str(text_format.MessageToString(config))


def write(artifact: Path, out: Path) -> Path:
    """The repository for `artifact` at `out` (written beside it, renamed into place); returns the
    model's folder."""
    manifest = verify(artifact)
    if not tasks.embeds(manifest.get("task")) or (artifact / "genai_config.json").is_file():
        raise UsageError(f"{artifact}: --format triton packages encoders (a decoder folder is served by its engine)")
    runtime = manifest.get("runtime", {})
    openvino = openvino_file_of(manifest)
    target = str(runtime.get("target", "cpu"))
    use_openvino = openvino is not None and target == "cpu" and on_openvino(str(runtime.get("engine", "")))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(manifest.get("name", artifact.name)))
    if out.exists():
        raise UsageError(f"{out}: already exists; remove it or choose another -o")
    staging = artifact_files.staging_dir(out)
    try:
        version = staging / name / "1"
        version.mkdir(parents=True)
        if use_openvino:
            assert openvino is not None
            source = artifact / openvino
            shutil.copyfile(source, version / "model.xml")
            shutil.copyfile(source.with_suffix(".bin"), version / "model.bin")
            model_file, backend = version / "model.xml", str(ENGINES[openvino_engine(False)].triton)
        else:
            for path in artifact.glob("model.onnx*"):
                shutil.copyfile(path, version / path.name)
            model_file, backend = version / "model.onnx", str(ENGINES[DEFAULT_ENGINE].triton)
        for extra in ("tokenizer.json", "manifest.json"):
            shutil.copyfile(artifact / extra, staging / name / extra)
        inputs, outputs = graph_ports(model_file)
        text = config_text(name, backend, target, inputs, outputs, bool(runtime.get("fp16", True)))
        (staging / name / "config.pbtxt").write_text(text)
        check(staging / name)
        artifact_files.swap_into_place(staging, out, overwrite=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / name


def check(model_dir: Path) -> None:
    """`config.pbtxt` parses as Triton's ModelConfig, and its inputs and outputs are the graph's:
    names, data types and dims."""
    from google.protobuf import text_format

    pb = model_config()
    path = model_dir / "config.pbtxt"
    try:
        config = text_format.Parse(path.read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise UsageError(f"{path}: not a Triton model config: {exc}") from None
    model_file = (
        model_dir / "1" / ("model.xml" if config.backend == ENGINES[openvino_engine(False)].triton else "model.onnx")
    )
    if not model_file.is_file():
        raise UsageError(f"{path}: backend {config.backend!r} needs {model_file.relative_to(model_dir)}")
    expected = graph_ports(model_file)
    for kind, declared, found in (("input", config.input, expected[0]), ("output", config.output, expected[1])):
        given = [(p.name, pb.DataType.Name(p.data_type), list(p.dims)) for p in declared]
        if given != found:
            raise UsageError(f"{path}: {kind}s {given} are not the graph's {found}")
