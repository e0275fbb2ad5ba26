"""CPU binding of the paged decode-attention kernel in kernels/csrc/paged_decode_attention.c.

Decode rows of a step (one query token per sequence) attend to their pages in place; the torch
reference in kernels/paged_attention.py is what it is proven against and what runs for prefill
chunks and where the library cannot be built.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu_library import load

_ABI = 4
# Mirrors MAX_GROUP / MAX_HEAD_DIM / MAX_BLOCK in the C source (stack buffers per task).
MAX_GROUP, MAX_HEAD_DIM, MAX_BLOCK = 16, 256, 256

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64,
             _i64, _i64, _i64, ctypes.c_float, ctypes.c_int, _ptr]


@functools.cache
def _functions() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    lib = load()
    if lib is None or lib.paged_decode_attention_abi() != _ABI:
        return None
    fns = {}
    for dtype, symbol in ((torch.float32, "paged_decode_attention_f32"),
                          (torch.bfloat16, "paged_decode_attention_bf16")):
        fn = getattr(lib, symbol)
        fn.argtypes = _ARGTYPES
        fn.restype = None
        fns[dtype] = fn
    return fns


def supports(query: torch.Tensor, k_cache: torch.Tensor, block_size: int) -> bool:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and k_cache.dtype == query.dtype and k_cache.is_contiguous()
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP
            and head_dim <= MAX_HEAD_DIM and block_size <= MAX_BLOCK
            and block_size & (block_size - 1) == 0  # the kernel indexes pages by shifts
            and _functions() is not None)


def paged_decode_attention_cpu(
    query: torch.Tensor,  # [T, Hq, D]; rows q_rows are decodes
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    q_rows: torch.Tensor,  # [Bd] int32 query row of each decode
    seq_ids: torch.Tensor,  # [Bd] int32 its sequence
    out: torch.Tensor,  # [T, Hq, D]; rows q_rows are written
    scale: float,
    sliding_window: int | None,
    holes: torch.Tensor | None = None,  # [Bd] int64 keys hidden from each row (tree attention)
) -> None:
    """Callers check `supports()` first. The index tensors must be int32 and contiguous.
    `holes`: bit j of holes[i] hides key seq_len - 1 - j from row i (kernels/paged_attention.py
    explains the tree masks)."""
    fns = _functions()
    assert fns is not None
    if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
        query = query.contiguous()
    assert out.stride(2) == 1 and out.stride(1) == out.shape[2]
    assert block_tables.dtype == seq_lens.dtype == q_rows.dtype == seq_ids.dtype == torch.int32
    assert block_tables.is_contiguous() and seq_lens.is_contiguous()
    if holes is not None:
        assert holes.dtype == torch.int64 and holes.is_contiguous()
        assert holes.numel() == q_rows.numel()
    fns[query.dtype](
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        q_rows.data_ptr(), seq_ids.data_ptr(), q_rows.numel(), out.data_ptr(), out.stride(0),
        query.shape[1], k_cache.shape[2], query.shape[2], k_cache.shape[1],
        sliding_window or 0, scale, torch.get_num_threads(),
        None if holes is None else holes.data_ptr())
