"""KV store: write new K/V rows into the paged cache by slot mapping; slot -1 is padding."""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._dispatch import use_triton
from kernels.cpu_library import load


def store_kv_reference(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * block_size + offset, -1 = skip
) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_flat.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.kv_store_abi() != 1:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.store_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.store_kv.restype = None
    return lib


def _store_kv_c(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """The C copy (kernels/csrc/kv_store.c); False where it does not apply. Rows may be views
    into the fused QKV output: only each token's heads need to be contiguous."""
    lib = _library()
    row = key.shape[1] * key.shape[2]
    if (lib is None or key.dtype != k_cache.dtype or value.dtype != v_cache.dtype
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return False
    for x in (key, value):
        if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            return False
    e = key.element_size()
    lib.store_kv(key.data_ptr(), key.stride(0) * e, value.data_ptr(), value.stride(0) * e,
                 k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                 slot_mapping.numel(), row * e, torch.get_num_threads())
    return True


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_triton(key):
        from kernels.triton_kv_store import store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    elif key.device.type != "cpu" or not _store_kv_c(key, value, k_cache, v_cache, slot_mapping):
        store_kv_reference(key, value, k_cache, v_cache, slot_mapping)
