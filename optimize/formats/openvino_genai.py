"""The OpenVINO GenAI format of a decoder: a folder `openvino_genai.LLMPipeline(folder, "CPU")` loads
as it is (`openvino_model.xml/.bin`, stateful with its KV cache, `openvino_tokenizer.xml` and
`openvino_detokenizer.xml`, the checkpoint's configs and tokenizer).

The graph is our own ONNX export with its KV cache (`optimize/formats/onnx_graph.py`) in fp32, converted by
OpenVINO and made stateful as OpenVINO GenAI runs it (the cache in the model's state, `beam_idx`
choosing its rows); its weights are then put on the genai stage's grid here: int4 is each block
of 32 input weights as `d * q + m` (q in 0..15, d and m per block, the minmax grid of
`optimize/formats/minmax.py`, so weights dequantized from a Q4_1 GGUF land back exactly), stored as
OpenVINO's compressed-weight pattern (u4 weights, then Subtract a zero point, Multiply a scale)
with the zero point `-m / d` in fp32: measured on SmolLM2, the CPU plugin fuses it into its int4
FullyConnected kernel as it does NNCF's integer zero points, and the logits stay within 1.2e-4 of
the fp32 model, where an fp16 zero point drifts by 0.11 and an integer one (NNCF's INT4_ASYM) by
18. The token embedding and the LM head (two tables in the ONNX export even when tied) are Q8_0
(int8, blocks of 32, one scale each) at either precision, and int8 is Q8_0 throughout, as in the
GGUF.

The gate is measured through the OpenVINO CPU plugin on this very file, the sequence fed in chunks
so that later positions read the KV cache at the precision the IR names (`KV_CACHE`), which is what
the runtime's engine then runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optimize import runtime
from optimize.errors import UsageError
from optimize.formats.gguf import per_sequence
from optimize.formats.minmax import BLOCK, eight_bit, four_bit
from optimize.models.checkpoint import CONFIG, TOKENIZER, copy_present, read_config
from optimize.runtime.engine_openvino_genai import openvino_properties
from optimize.runtime.untyped import OvObject

FILE = "openvino_model.xml"
ENGINE = "openvino-genai"  # what runs the folder (runtime.ENGINES)
BITS = (4, 8)  # tried smallest first; the first whose gate holds ships
# Named in the IR, so a user's LLMPipeline gets what was gated. Not the CPU's u8 default: our graph's
# cache is concatenated outside the fused attention, so the stateful pipeline keeps it in f32 whatever
# is asked, while prompt lookup's paged pipeline would keep u8 (a random Llama then left greedy
# decoding at token 22 of 24, the f32 logits 0.07 apart there): f32 on both paths.
KV_CACHE = "f32"
CHUNK = 128  # tokens per call when measuring: positions past the first chunk read the cache
KEPT_FILES = (*CONFIG, *TOKENIZER, "chat_template.jinja")
NEEDS = {
    "openvino_genai": "openvino-genai",
    "openvino_tokenizers": "openvino-tokenizers",
}


def problem(checkpoint: Path, texts: Sequence[str] = ()) -> str | None:
    """Why no OpenVINO GenAI folder can be written here, or None."""
    from importlib.util import find_spec

    def absent(module: str) -> bool:
        try:
            return find_spec(module) is None
        except ModuleNotFoundError:  # its parent package is missing
            return True

    missing = [package for module, package in NEEDS.items() if absent(module)]
    if missing:
        return (
            f"format openvino-genai: needs {', '.join(missing)} "
            "(pip install 'optimize[openvino-genai]', the same release as the openvino installed)"
        )
    return None


def loader() -> str:
    from importlib.metadata import version

    return (
        f"OpenVINO {version('openvino')} CPU plugin (openvino-genai {version('openvino-genai')}), KV cache {KV_CACHE}"
    )


def write(checkpoint: Path, out: Path, bits: int) -> dict[str, object]:
    """`out/` as OpenVINO GenAI loads it, its weights at `bits` on the grid above. Returns what the
    manifest records (tensor counts per type, the largest reconstruction errors, the KV cache)."""

    found = problem(checkpoint)
    if found:
        raise UsageError(found)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="optimize-ov-") as tmp:
        model = _export(checkpoint, Path(tmp))
        written = requantize(model, bits, int(read_config(checkpoint).get("vocab_size") or 0))
        # The IR's own runtime options are what every loader compiles with unless told otherwise:
        # the cache precision gated, for every path alike.
        model.set_rt_info(KV_CACHE, ["runtime_options", "KV_CACHE_PRECISION"])
        # Activations quantized to int8 in groups as they run (the CPU plugin's default, 32, where the
        # CPU has VNNI): a position then computes differently alone than among several, so prompt
        # lookup's checked drafts left greedy decoding (a random Llama: token 3 of 24). Off, for
        # every loader; the float ops' precision is not an IR option (`openvino_properties`).
        model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
        _save(model, out / FILE)
        del model
    _tokenizer(checkpoint, out)
    copy_present(checkpoint, out, KEPT_FILES)
    written["kv_cache"] = KV_CACHE
    return written


def _export(checkpoint: Path, out: Path) -> OvObject:
    """The checkpoint's ONNX export with a KV cache, in OpenVINO, stateful: each `past_key_values.N.*`
    input and its `present.N.*` output become one state, read through a Gather by `beam_idx` (the
    inputs OpenVINO GenAI feeds: input_ids, attention_mask, position_ids, beam_idx)."""
    import openvino
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    from optimize import tasks
    from optimize.formats import onnx_graph as graphs
    from optimize.models.handle import ModelHandle
    from optimize.models.loading import load_torch
    from optimize.models.routes import ROUTE_CACHED

    module = load_torch(ModelHandle(checkpoint, tasks.GENERATION))
    graph = graphs.build_graph(module, tasks.GENERATION)
    if graph.route != ROUTE_CACHED:
        raise UsageError(
            f"format openvino-genai: {type(module).__name__}'s cache is not keys and values alone "
            "(a recurrent or convolution state), which OpenVINO GenAI's stateful model needs; "
            "ship formats: [onnx] (the runtime's loop over the whole sequence) for this architecture"
        )
    graphs.write(graph, out / "model.onnx", "torchscript")
    del module
    model = openvino.convert_model(str(out / "model.onnx"))
    beam_idx = ops.parameter(openvino.PartialShape([-1]), openvino.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    pairs = {}
    for param in model.get_parameters():
        # the converter may give a tensor several names (`/Concat_output_0` beside the input's)
        name = next((n for n in param.output(0).get_names() if n.startswith("past_key_values.")), None)
        if name is None:
            continue
        readers = list(param.output(0).get_target_inputs())
        chosen = ops.gather(param, beam_idx, ops.constant(np.int64(0)))
        for reader in readers:
            reader.replace_source_output(chosen.output(0))
        param.output(0).get_tensor().set_names({name})
        pairs[name] = name.replace("past_key_values", "present", 1)
    model.add_parameters([beam_idx])
    apply_make_stateful_transformation(model, pairs)
    # Each state starts empty with the batch of the first call: batch x heads x 0 x head size
    batch = ops.gather(
        ops.shape_of(model.input("input_ids"), output_type="i64"),
        ops.constant(np.array([0], np.int64)),
        ops.constant(np.int64(0)),
    )
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.get_min_length() for d in op.get_output_partial_shape(0)]
            shape = ops.concat([batch, ops.constant(np.array(dims[1:], np.int64))], axis=0)
            zero = ops.constant(np.array(0, np.float32), dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, shape).output(0)])
    model.validate_nodes_and_infer_types()
    return model


def requantize(model: OvObject, bits: int, vocab: int) -> dict[str, object]:
    """Every MatMul weight (and the embedding table) of an OpenVINO model on the grid, in place."""
    import openvino
    import openvino.opset13 as ops

    counts: dict[str, int] = {}
    worst = {"max_error_4bit": 0.0, "max_error_8bit": 0.0}
    for constant in [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]:
        users = [target.get_node() for target in constant.output(0).get_target_inputs()]
        shape = (
            list(constant.get_output_partial_shape(0).to_shape())
            if constant.get_output_partial_shape(0).is_static
            else []
        )
        weight = any(u.get_type_name() == "MatMul" and u.get_attributes().get("transpose_b") for u in users)
        # the token embedding (not another table a graph gathers from, such as a rotary cache)
        table = bool(shape) and shape[0] == vocab and any(u.get_type_name() == "Gather" for u in users)
        if (
            len(shape) != 2
            or shape[1] % BLOCK
            or not (weight or table)
            or constant.get_element_type() != openvino.Type.f32
        ):
            continue
        rows, columns = shape
        blocks = constant.get_data().reshape(rows, columns // BLOCK, BLOCK)
        if bits == 8 or rows == vocab:  # Q8_0: the embedding, the LM head, and int8 everything
            q8, scale, error = eight_bit(blocks)
            worst["max_error_8bit"] = max(worst["max_error_8bit"], error)
            values = ops.convert(
                ops.constant((q8.astype(np.int16) - 128).astype(np.int8), dtype=openvino.Type.i8), openvino.Type.f32
            )
            decompressed = ops.multiply(values, ops.constant(scale[..., None]))
            kind = "Q8_0"
        else:
            q, scale, low, error = four_bit(blocks)
            worst["max_error_4bit"] = max(worst["max_error_4bit"], error)
            values = ops.convert(ops.constant(q, dtype=openvino.Type.u4), openvino.Type.f32)
            zero = ops.constant((-low / scale)[..., None].astype(np.float32))
            decompressed = ops.multiply(ops.subtract(values, zero), ops.constant(scale[..., None]))
            kind = "Q4_1"
        flat = ops.reshape(decompressed, ops.constant(np.array(shape, dtype=np.int64)), special_zero=False)
        for target in list(constant.output(0).get_target_inputs()):
            target.replace_source_output(flat.output(0))
        counts[kind] = counts.get(kind, 0) + 1
    return {"tensors": counts, **{key: round(value, 8) for key, value in worst.items()}}


def _tokenizer(checkpoint: Path, out: Path) -> None:
    """openvino-tokenizers' conversion of the checkpoint's tokenizer (OpenVINO GenAI's own; the
    runtime feeds and decodes tokens with `tokenizer.json` itself). A byte-level BPE read from a
    GGUF by transformers carries decoder steps for SentencePiece (byte fallback, `▁` to space) that
    openvino-tokenizers cannot build; with no such tokens in the vocabulary they do nothing, so the
    decoder is read as byte-level alone."""
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="optimize-ov-tok-") as tmp:
        copy_present(checkpoint, Path(tmp), TOKENIZER)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        decoder, vocab = spec.get("decoder") or {}, spec.get("model", {}).get("vocab", {})
        steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
        level = [step for step in steps if step.get("type") == "ByteLevel"]
        if level and not any("▁" in token or token.startswith("<0x") for token in vocab):
            spec["decoder"] = level[0]
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec))
        hf = AutoTokenizer.from_pretrained(tmp)
        try:
            encoder, decoder_model = convert_tokenizer(hf, with_detokenizer=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(
                f"format openvino-genai: openvino-tokenizers cannot convert this tokenizer ({exc})"
            ) from None
    _save(encoder, out / "openvino_tokenizer.xml")
    _save(decoder_model, out / "openvino_detokenizer.xml")


def _save(model: OvObject, path: Path) -> None:
    """`model` saved as written (no fp16 compression). What OpenVINO names itself (ops, the model)
    takes a process-wide counter: renamed by place and file, so the same checkpoint gives the same
    bytes in any process, and twice in one."""
    import openvino

    numbered = re.compile(r"[A-Z][A-Za-z0-9]*_\d+(\.\d+)?")  # OpenVINO's own names: `Convert_355855`
    for index, op in enumerate(model.get_ordered_ops()):
        if numbered.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")
        for port, output in enumerate(op.outputs()):
            names = output.get_names()
            if any(numbered.fullmatch(name) for name in names):
                kept = {name for name in names if not numbered.fullmatch(name)}
                output.get_tensor().set_names(kept | {f"{op.get_type_name()}_{index}.{port}"})
    model.set_friendly_name(path.stem)
    openvino.save_model(model, str(path), compress_to_fp16=False)


class OpenVinoDecoder:
    """A folder's `openvino_model.xml` behind the evaluator's `run(inputs)`: logits at every position
    from the OpenVINO CPU plugin, compiled as OpenVINO GenAI compiles it (the KV cache at the
    precision the IR's runtime options name, `KV_CACHE` as written; `kv_cache` overrides it)."""

    def __init__(self, folder: Path, seq_len: int, threads: int, kv_cache: str | None = None):
        import openvino

        self.tokenizer = runtime.Tokenizer(folder / "tokenizer.json", seq_len)
        self.provider = loader()
        properties = openvino_properties(threads)  # f32, as the runtime's pipelines compile it
        if kv_cache:
            properties["KV_CACHE_PRECISION"] = kv_cache
        self.compiled = openvino.Core().compile_model(str(folder / FILE), "CPU", properties)
        self.request = self.compiled.create_infer_request()

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (batch x positions x vocabulary) at the real tokens (zeros at padding)."""
        return per_sequence(inputs, self._logits)

    def _logits(self, ids: Sequence[int]) -> np.ndarray:
        self.request.reset_state()
        rows = []
        for start in range(0, len(ids), CHUNK):
            chunk = np.array([ids[start : start + CHUNK]], dtype=np.int64)
            end = start + chunk.shape[1]
            result = self.request.infer(
                {
                    "input_ids": chunk,
                    "attention_mask": np.ones((1, end), dtype=np.int64),
                    "position_ids": np.arange(start, end, dtype=np.int64)[None],
                    "beam_idx": np.zeros(1, dtype=np.int32),
                }
            )
            rows.append(np.array(result["logits"][0], dtype=np.float32))
        return np.concatenate(rows)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        raise ValueError("an OpenVINO GenAI decoder does not embed")
