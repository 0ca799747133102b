"""The GGUF format of a decoder (llama.cpp, Ollama, LM Studio): one `model.gguf`, by one of two routes.

A model that came as a GGUF is written back with the header (architecture hyperparameters, tokenizer,
chat template) of the GGUF it came as, kept beside its converted checkpoint (`GGUF_HEADER`), and
weights on the grid they came on. Every other checkpoint goes through llama.cpp's own tools
(`llama_cpp.py`): its converter writes the fp32 GGUF (tensor layout and tokenizer metadata for every
architecture it knows), its importance matrix is collected over the recipe's calibration texts, and
its quantizer writes each of the recipe's `gguf_types` (Q4_K_M and Q8_0 by default) weighted by it.

On the first route, int4 is llama.cpp's Q4_1 (blocks of 32 as `d * q + m`, d and m in fp16): the minmax grid of the
genai stage, so weights dequantized from a Q4_1 GGUF are written back exactly; the token embedding
and the LM head are Q8_0 at either precision, and int8 is Q8_0 throughout. The gate is measured on
the file as its loader reads it: llama.cpp through llama-cpp-python where installed, otherwise
transformers' GGUF reader (the weights dequantized, computed in fp32), and the manifest says which.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optimize import runtime
from optimize.errors import UsageError
from optimize.formats import llama_cpp
from optimize.models.checkpoint import TOKENIZER, copy_present, read_config
from optimize.models.gguf_input import GGUF_HEADER, copy_header
from optimize.runtime.untyped import Json

if TYPE_CHECKING:
    import gguf
    import torch

FILE = "model.gguf"
ENGINE = "llama.cpp"  # what runs the folder (runtime.ENGINES)
BITS = (4, 8)  # tried smallest first; the first whose gate holds ships
ARCHITECTURES = {"LlamaForCausalLM": "llama"}  # transformers' class -> the GGUF architecture written
KEPT_FILES = (*TOKENIZER, "config.json")
CONTEXT = 2048  # llama.cpp's context when measuring: the longest window a suite scores


def problem(checkpoint: Path, texts: Sequence[str]) -> str | None:
    """Why no GGUF can be written of `checkpoint` (or no importance matrix from `texts`), or None."""
    architecture = str((read_config(checkpoint).get("architectures") or ["?"])[0])
    if (checkpoint / GGUF_HEADER).is_file():
        if architecture not in ARCHITECTURES:
            listed = ", ".join(ARCHITECTURES)
            return f"format gguf: a model read from a GGUF is written back for {listed}, not {architecture}"
        return None
    known = llama_cpp.architectures(llama_cpp.source())
    if architecture not in known:
        return (
            f"format gguf: llama.cpp's converter (llama-cpp-python {llama_cpp.release()}) does not know "
            f"{architecture} ({len(known)} architectures it does)"
        )
    tokenizer = runtime.Tokenizer(checkpoint / "tokenizer.json", 1 << 20)
    tokens = sum(len(tokenizer.ids(text)) for text in texts)
    if tokens < llama_cpp.tokens_needed():
        return (
            f"format gguf: the importance matrix needs at least {llama_cpp.tokens_needed()} tokens of calibration "
            f"text; the recipe's calibration gives {tokens}: give more `calibration.samples` or longer texts"
        )
    return None


def route(checkpoint: Path, requested: Sequence[str]) -> str:
    """How the GGUF will be written, for the pre-flight."""
    if (checkpoint / GGUF_HEADER).is_file():
        return "back on the grid of the GGUF it came as (Q4_1 then Q8_0), under that GGUF's header"
    tried = ", then ".join(str(level) for level in levels(checkpoint, requested))
    return f"llama.cpp's converter, its importance matrix over the calibration texts, then {tried}"


def levels(checkpoint: Path, requested: Sequence[str]) -> tuple[int | str, ...]:
    """What is tried, smallest first: a model read from a GGUF back on its own grid (int4, int8);
    any other at the recipe's llama.cpp types."""
    if (checkpoint / GGUF_HEADER).is_file():
        return BITS
    return tuple(sorted(requested, key=lambda kind: llama_cpp.TYPES[kind]))


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection in llama.cpp's row order (rotary pairs interleaved), as its converter
    writes it; transformers' GGUF reader undoes exactly this."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weight.shape)


def write(checkpoint: Path, out: Path, level: int | str, texts: Sequence[str]) -> dict[str, object]:
    """`out/model.gguf` of `checkpoint`: back on its own grid (`level` in bits) for a model read from
    a GGUF, else through llama.cpp's tools (`level`: a llama-quantize type). Returns what the
    manifest records."""
    if isinstance(level, str):
        return _through_llama_cpp(checkpoint, out, level, texts)
    return _back_to_gguf(checkpoint, out, level)


def _through_llama_cpp(checkpoint: Path, out: Path, kind: str, texts: Sequence[str]) -> dict[str, object]:
    """llama.cpp's converter (fp32, kept beside for the other types), its importance matrix over the
    calibration texts (once), and its quantizer at `kind`."""
    scratch = out.parent / "gguf-f32"
    scratch.mkdir(parents=True, exist_ok=True)
    full, matrix = scratch / "model-f32.gguf", scratch / "imatrix.gguf"
    if not full.is_file():
        llama_cpp.convert(checkpoint, full)
    if not matrix.is_file():
        llama_cpp.imatrix(full, texts, matrix)
    out.mkdir(parents=True, exist_ok=True)
    llama_cpp.quantize(full, out / FILE, kind, matrix)
    copy_present(checkpoint, out, KEPT_FILES)
    return {"type": kind, "bits": llama_cpp.TYPES[kind], "importance_matrix": True, "llama_cpp": llama_cpp.release()}


def _back_to_gguf(checkpoint: Path, out: Path, bits: int) -> dict[str, object]:
    """Q4_1 linear weights at 4 bits, Q8_0 at 8, the embedding and LM head Q8_0, norms fp32, under
    the header of the GGUF the model came as (each tensor type's count recorded)."""
    import gguf

    config = read_config(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out / FILE, arch=ARCHITECTURES[config["architectures"][0]])
    copy_header(gguf.GGUFReader(checkpoint / GGUF_HEADER), writer, skip=("general.file_type",))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if bits == 4 else gguf.LlamaFileType.MOSTLY_Q8_0)
    counts: dict[str, int] = {}
    for name, data, kind in _tensors(checkpoint, config, bits):
        counts[kind.name] = counts.get(kind.name, 0) + 1
        stored = data if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, kind)
        writer.add_tensor(name, stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copy_present(checkpoint, out, KEPT_FILES)
    return {"bits": bits, "tensor_types": counts}


def _tensors(checkpoint: Path, config: Json, bits: int) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """Each tensor of the checkpoint as llama.cpp names, orders and stores it: (name, fp32 data, type)."""
    import gguf
    from safetensors.numpy import load_file

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    linear = gguf.GGMLQuantizationType.Q4_1 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # llama.cpp reads a missing output as the embedding, shared
    for key in sorted(tensors):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"format gguf: no llama.cpp name for the tensor {key}")
        data = tensors[key].astype(np.float32)
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            data = permute(data, heads if "q_proj" in key else kv_heads)
        kind = gguf.GGMLQuantizationType.F32
        if data.ndim == 2:
            kind = linear if name.startswith("blk.") else gguf.GGMLQuantizationType.Q8_0
        yield name, data, kind


def loader() -> str:
    """What reads a GGUF here: llama.cpp (through llama-cpp-python) where installed, else transformers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import llama_cpp  # noqa: F401

        return f"llama.cpp (llama-cpp-python {version('llama-cpp-python')})"
    except (ImportError, PackageNotFoundError):
        return f"transformers {version('transformers')} (GGUF dequantized to fp32)"


def per_sequence(inputs: dict[str, np.ndarray], logits: Callable[[Sequence[int]], np.ndarray]) -> np.ndarray:
    """A padded batch through an engine that scores one unpadded sequence at a time (`logits`: its
    positions x vocabulary): logits (batch x positions x vocabulary) at the real tokens, zeros at padding."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].astype(bool)
    rows = [logits([int(t) for t in row[mask]]) for row, mask in zip(ids, real, strict=True)]
    out = np.zeros((*ids.shape, rows[0].shape[-1]), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, real[i]] = row
    return out


class GgufModel:
    """A folder's model.gguf behind the evaluator's `run(inputs)`: logits at every position, from
    llama.cpp where installed (its own kernels, which is what ships), else transformers' reader."""

    def __init__(self, folder: Path, seq_len: int):
        self.path = folder / FILE
        self.tokenizer = runtime.Tokenizer(folder / "tokenizer.json", seq_len)
        self.provider = loader()
        threads = os.cpu_count() or 1
        self.torch: torch.nn.Module | None = None  # transformers' reader, where llama.cpp is not installed
        if self.provider.startswith(ENGINE):
            import llama_cpp

            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=CONTEXT, n_batch=512, logits_all=True, n_threads=threads, verbose=False
            )
        else:
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(threads)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=FILE, dtype=torch.float32)
            self.torch = loaded.train(False)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (batch x positions x vocabulary) at the real tokens (zeros at padding)."""
        return per_sequence(inputs, self._logits)

    def _logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > CONTEXT:
            raise ValueError(f"gguf: {len(ids)} tokens is more than the {CONTEXT} this loader scores at once")
        if self.torch is None:
            self.llm.reset()
            self.llm.eval(list(ids))
            return np.array(self.llm.scores[: len(ids)], dtype=np.float32)
        import torch

        with torch.inference_mode():
            return np.asarray(self.torch(torch.tensor([list(ids)])).logits[0].float().numpy())

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        raise ValueError("a GGUF decoder does not embed")
