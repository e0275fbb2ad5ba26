"""GGUF tensors as Hugging Face parameters: names, layout, dequantization and packed blocks.

Two things differ from a Hugging Face checkpoint besides the names:
- GGUF lists dimensions innermost first; the reader already hands us row-major arrays whose shape
  is the HF one (out_features, in_features), so only the names need mapping.
- llama.cpp's convert_hf_to_gguf.py permutes the rows of q_proj/k_proj (weights and biases) of
  llama-arch models so that ggml's RoPE can rotate adjacent pairs. HF-style rotate_half RoPE
  pairs dimension i with i + head_dim/2, so those rows are put back in HF order here. Qwen2 files
  are written without the permutation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from worker.gguf.errors import GGUFError
from worker.gguf.reader import GGUFFile, check_architecture

# Types whose blocks gguf.quants.dequantize (the package's reference) turns into float32.
SUPPORTED_QUANT_TYPES: frozenset[Q] = frozenset(
    {
        Q.F32,
        Q.F16,
        Q.BF16,
        Q.Q8_0,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q2_K,
        Q.Q3_K,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
    }
)

# Architectures whose q/k rows llama.cpp permuted on conversion.
_PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral"})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp writes that carry nothing the HF model needs (precomputed RoPE tables).
_IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")


class PackedTensor(NamedTuple):
    """One parameter as stored in the GGUF, for kernels that run quantized weights directly.

    data: for block-quantized types, uint8 [rows, bytes_per_row] of ggml blocks along the last
    (input) dimension; for F32/F16, the values; for BF16, uint8 [rows, 2 * columns].
    Rows are already in Hugging Face order (q/k un-permuted).
    """

    data: np.ndarray
    quant_type: Q
    shape: tuple[int, ...]


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name; None for tensors the HF model has no use for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _IGNORED.fullmatch(gguf_name):
        return None
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFError(
            f"GGUF tensor {gguf_name!r} has no place in a Llama-family model; the file holds a "
            "different architecture than its metadata says, or a variant Tandem does not support."
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def check_quant_types(gguf_file: GGUFFile) -> None:
    """GGUFError naming the first tensor whose quantization type cannot be dequantized."""
    for tensor in gguf_file.reader.tensors:
        if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_QUANT_TYPES))
            raise GGUFError(
                f"{gguf_file.path}: tensor {tensor.name} is quantized as {tensor.tensor_type.name}, "
                f"which Tandem cannot read; supported types are {supported}. Use a GGUF "
                "quantized to one of those (e.g. Q4_K_M, Q8_0) or a Hugging Face folder."
            )


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _row_order(gguf_file: GGUFFile, name: str, rows: int) -> np.ndarray | None:
    """Row indices that undo llama.cpp's q/k permutation, or None when the rows are in HF order."""
    if gguf_file.architecture not in _PERMUTED_ARCHITECTURES:
        return None
    part = name.split(".")[2] if name.startswith("blk.") else ""
    if part == "attn_q":
        heads = int(gguf_file.require("attention.head_count"))
    elif part == "attn_k":
        heads = int(
            gguf_file.arch_get("attention.head_count_kv", gguf_file.require("attention.head_count"))
        )
    else:
        return None
    if rows % (2 * heads):
        raise GGUFError(
            f"{gguf_file.path}: {name} has {rows} rows, not a multiple of 2 x {heads} heads."
        )
    # llama.cpp viewed each head as [2, head_dim/2] and stored it as [head_dim/2, 2]; read the
    # stored rows back in the [2, head_dim/2] order.
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _mapped(gguf_file: GGUFFile) -> Iterator[tuple[str, gguf.ReaderTensor]]:
    check_architecture(gguf_file)
    check_quant_types(gguf_file)
    for tensor in gguf_file.reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            yield name, tensor


def hf_shapes(gguf_file: GGUFFile) -> dict[str, tuple[int, ...]]:
    """HF parameter name → shape, without reading any tensor data."""
    return {name: _hf_shape(tensor) for name, tensor in _mapped(gguf_file)}


def packed_tensors(gguf_file: GGUFFile) -> dict[str, PackedTensor]:
    """Every parameter as its raw GGUF blocks (memory-mapped unless rows had to be reordered)."""
    packed: dict[str, PackedTensor] = {}
    for name, tensor in _mapped(gguf_file):
        data = tensor.data
        order = _row_order(gguf_file, tensor.name, data.shape[0])
        if order is not None:
            data = data[order]  # whole rows of blocks move together: blocks never span rows
        packed[name] = PackedTensor(
            data=data, quant_type=tensor.tensor_type, shape=_hf_shape(tensor)
        )
    return packed


def dequantize(gguf_file: GGUFFile, tensor: gguf.ReaderTensor) -> np.ndarray:
    """One tensor as float32 in HF shape and row order."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))
    order = _row_order(gguf_file, tensor.name, values.shape[0])
    return values if order is None else values[order]


def hf_tensors(
    gguf_file: GGUFFile, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantized tensor) one at a time, so a caller never holds the whole model twice."""
    for name, tensor in _mapped(gguf_file):
        # F32 tensors come back as read-only views of the memory map; torch wants writable memory.
        values = torch.from_numpy(np.require(dequantize(gguf_file, tensor), requirements=["C", "W"]))
        yield name, values.to(dtype)
