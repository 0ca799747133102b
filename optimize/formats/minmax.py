"""int4 "minmax": each block of 32 weights as `d * q + m` with q in 0..15, d = (max - min) / 15 and m
the block's own float minimum, so weights dequantized from a llama.cpp Q4_1 GGUF land back on their
grid exactly (Q8_0 weights likewise at 8 bits, and the token embedding as an 8-bit table).
MatMulNBits takes only integer zero points on its fast path, so `x . W` is computed as
MatMulNBits(x, q, d) with no zero-point input (q is read as q - 8), plus the sums of x over each
block times the block's offset m + 8 d: a MatMul 32 times smaller. The block sums are computed once
per input (gate and up share theirs). Applied to the fp32 graph onnxruntime-genai's builder wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimize.runtime.untyped import OnnxProto

BLOCK = 32


def requantize(model_path: Path, accuracy_level: int, int8_head: bool) -> dict[str, float]:
    """Rewrite every MatMul with a constant weight in place; returns the largest reconstruction error
    of the 4-bit and of the 8-bit weights (0 for weights dequantized from Q4_1 / Q8_0)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    weights = {i.name: i for i in model.graph.initializer}
    nodes, replaced, worst4, worst8 = [], set(), 0.0, 0.0
    sums: dict[str, str] = {}  # input -> its block sums, computed once (gate and up share an input)
    for node in model.graph.node:
        init = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if init is None or len(init.dims) != 2 or init.dims[0] % BLOCK:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        blocks = w.T.reshape(w.shape[1], w.shape[0] // BLOCK, BLOCK)
        replaced.add(init.name)
        if int8_head and node.name.startswith("/lm_head/"):
            made, error = _eight_bit_matmul(model, node, init.name, blocks, accuracy_level)
            worst8 = max(worst8, error)
        else:
            made, error = _four_bit_matmul(model, node, init.name, blocks, accuracy_level, sums)
            worst4 = max(worst4, error)
        nodes += made
    nodes, worst_embedding = _embedding_8bit(model, nodes)
    used = {i for node in nodes for i in node.input}
    kept = [i for i in model.graph.initializer if i.name not in replaced or i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(model_path), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True)
    return {"max_error_4bit": worst4, "max_error_8bit": worst8, "max_error_embedding": worst_embedding}


def _eight_bit_matmul(
    model: OnnxProto, node: OnnxProto, name: str, blocks: np.ndarray, accuracy_level: int
) -> tuple[list[OnnxProto], float]:
    """The MatMul as MatMulNBits over 8-bit blocks (the LM head); its weights added to the graph."""
    from onnx import helper, numpy_helper

    n, count, _ = blocks.shape
    q8, scale, error = eight_bit(blocks)
    model.graph.initializer.extend(
        [numpy_helper.from_array(q8, name + "_Q8"), numpy_helper.from_array(scale, name + "_scales")]
    )
    attributes = {"K": count * BLOCK, "N": n, "bits": 8, "block_size": BLOCK, "accuracy_level": accuracy_level}
    inputs = [node.input[0], name + "_Q8", name + "_scales"]
    made = helper.make_node(
        "MatMulNBits", inputs, list(node.output), node.name + "_Q8", domain="com.microsoft", **attributes
    )
    return [made], error


def _four_bit_matmul(
    model: OnnxProto, node: OnnxProto, name: str, blocks: np.ndarray, accuracy_level: int, sums: dict[str, str]
) -> tuple[list[OnnxProto], float]:
    """The MatMul as MatMulNBits over 4-bit blocks plus each block's minimum (a MatMul of the input's
    block sums with the minimums, added); its weights added to the graph."""
    from onnx import helper, numpy_helper

    n, count, _ = blocks.shape
    base = node.name
    q, scale, low, error = four_bit(blocks)
    # No zero-point input: MatMulNBits then reads q as q - 8 (its default), so each block's offset
    # is its minimum plus 8 steps: d * q + m = d * (q - 8) + (m + 8 d).
    offset = (low + 8 * scale).T.astype(np.float32)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), name + "_Q4"),
            numpy_helper.from_array(scale, name + "_scales"),
            numpy_helper.from_array(np.ascontiguousarray(offset), name + "_minimums"),
        ]
    )
    attributes = {"K": count * BLOCK, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": accuracy_level}
    made = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], name + "_Q4", name + "_scales"],
            [base + "/q4"],
            base + "_Q4",
            domain="com.microsoft",
            **attributes,
        ),
        *_block_sums(model, node.input[0], count, sums),
        helper.make_node("MatMul", [sums[node.input[0]], name + "_minimums"], [base + "/offset"], base + "/Minimums"),
        helper.make_node("Add", [base + "/q4", base + "/offset"], list(node.output), base + "/Add"),
    ]
    return made, error


def _block_sums(model: OnnxProto, source: str, count: int, sums: dict[str, str]) -> list[OnnxProto]:
    """The nodes that sum `source` over each block of 32 (none when an earlier MatMul already did)."""
    from onnx import helper, numpy_helper

    if source in sums:
        return []
    tag = f"{source}/block_sums_{len(sums)}"
    sums[source] = tag
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 0, count, BLOCK], dtype=np.int64), tag + "_shape"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), tag + "_axis"),
        ]
    )
    return [
        helper.make_node("Reshape", [source, tag + "_shape"], [tag + "_blocks"], tag + "/Reshape"),
        helper.make_node("ReduceSum", [tag + "_blocks", tag + "_axis"], [tag], tag + "/ReduceSum", keepdims=0),
    ]


def four_bit(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Blocks as Q4_1 stores them, `d * q + m`: the values q (0..15, one per uint8), the scales d,
    the minimums m, and the largest reconstruction error."""
    low, high = blocks.min(-1), blocks.max(-1)
    scale = np.where(high > low, (high - low) / 15, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    error = float(np.abs(q * scale[..., None] + low[..., None] - blocks).max())
    return q, scale, low.astype(np.float32), error


def eight_bit(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Blocks as Q8_0 stores them (scale = largest magnitude / 127, no offset): the values stored as
    uint8 around the zero point 128, the scales, and the largest reconstruction error."""
    scale = np.abs(blocks).max(-1) / 127
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127)
    error = float(np.abs(q * scale[..., None] - blocks).max())
    return (q + 128).astype(np.uint8), scale, error


def _embedding_8bit(model: OnnxProto, nodes: list[OnnxProto]) -> tuple[list[OnnxProto], float]:
    """The token embedding as an 8-bit table (GatherBlockQuantized, blocks of 32 along the hidden size;
    exact for Q8_0): the Gather of a float table, or of the transposed LM head of a tied model, which
    otherwise keeps a full fp32 copy of the largest matrix."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    producers = {output: node for node in nodes for output in node.output}
    out, worst = [], 0.0
    dropped: set[int] = set()
    for node in nodes:
        source = producers.get(node.input[0]) if node.op_type == "Gather" else None
        transposed = source is not None and source.op_type == "Transpose" and source.input[0] in weights
        name = str(source.input[0]) if transposed and source is not None else ""
        name = name or (str(node.input[0]) if node.op_type == "Gather" else "")
        table = weights.get(name)
        if table is None or len(table.dims) != 2:
            out.append(node)
            continue
        values = numpy_helper.to_array(table).astype(np.float32)
        values = values.T if transposed else values  # [vocabulary, hidden]
        if values.shape[1] % BLOCK:
            out.append(node)
            continue
        q8, scale, error = eight_bit(values.reshape(values.shape[0], -1, BLOCK))
        worst = max(worst, error)
        base = node.name
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q8.reshape(values.shape), base + "_Q8"),
                numpy_helper.from_array(scale, base + "_scales"),
                numpy_helper.from_array(np.full(scale.shape, 128, dtype=np.uint8), base + "_zero"),
            ]
        )
        inputs = [base + "_Q8", node.input[1], base + "_scales", base + "_zero"]
        outputs = list(node.output)
        gather = helper.make_node("GatherBlockQuantized", inputs, outputs, base + "_Q8", domain="com.microsoft")
        gather.attribute.extend(
            helper.make_attribute(key, value)
            for key, value in {"gather_axis": 0, "quantize_axis": 1, "block_size": BLOCK, "bits": 8}.items()
        )
        out.append(gather)
        if transposed:
            dropped.add(id(source))
    return [node for node in out if id(node) not in dropped], worst
