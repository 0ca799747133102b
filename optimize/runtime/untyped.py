"""Names for what libraries without type information hand us: onnx's protobufs, onnxruntime's and
OpenVINO's objects, the attribute-read objects of transformers, and parsed JSON whose fields are read
one by one. Each is `Any` underneath; naming it here, once, lets a signature say which library's
object it takes, and keeps `Any` out of the rest of the code."""

from __future__ import annotations

from typing import Any, TypeAlias

Json: TypeAlias = dict[str, Any]  # JSON read field by field: config.json, a request body, a data row, --json
OnnxProto: TypeAlias = Any  # onnx's ModelProto, GraphProto, NodeProto (protobuf messages)
OrtObject: TypeAlias = Any  # onnxruntime's NodeArg, its quantization enums and calibration readers
OvObject: TypeAlias = Any  # OpenVINO's and OpenVINO GenAI's models, ports, pipelines, configs, handles
HfObject: TypeAlias = Any  # transformers' configs, models, layers and outputs, read by attribute
ClickError: TypeAlias = Any  # click's exception classes, vendored by typer (where, by its version)
