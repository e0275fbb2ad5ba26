"""KV store: write new K/V rows into the paged cache by slot mapping; slot -1 is padding."""

from __future__ import annotations

import ctypes
import functools
import math

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
    if lib is None or lib.kv_store_abi() != 2:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.store_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.store_kv.restype = None
    lib.move_rows.argtypes = [ptr, i64, ptr, ptr, i64, i64]
    lib.move_rows.restype = ctypes.c_int
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


class RowMover:
    """Copies slot rows src[i] -> dst[i] in a fixed set of same-shaped caches ([num_blocks,
    block_size, ...] each, e.g. every layer's K and V), reading all rows before writing any.
    On CPU one C call does every cache; elsewhere two torch index ops per cache."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches
        lib = _library()
        first = caches[0]
        self._c = (lib is not None and all(
            c.device.type == "cpu" and c.is_contiguous() and c.shape == first.shape
            and c.dtype == first.dtype for c in caches))
        self._rows = first.shape[0] * first.shape[1]
        if self._c:
            self._ptrs = (ctypes.c_void_p * len(caches))(*(c.data_ptr() for c in caches))
            self._row_bytes = math.prod(first.shape[2:]) * first.element_size()

    def __call__(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        if len(src) != len(dst) or not all(0 <= r < self._rows for r in (*src, *dst)):
            raise ValueError(f"moving KV rows {src} to {dst}: need as many of each, in "
                             f"[0, {self._rows})")
        if self._c:
            n = len(src)
            rc = _library().move_rows(self._ptrs, len(self.caches), (ctypes.c_int64 * n)(*src),
                                      (ctypes.c_int64 * n)(*dst), n, self._row_bytes)
            if rc != 0:
                raise MemoryError(f"moving {n} KV rows: no memory for a {n}-row buffer")
            return
        device = self.caches[0].device
        s = torch.tensor(src, dtype=torch.int64, device=device)
        d = torch.tensor(dst, dtype=torch.int64, device=device)
        for cache in self.caches:
            flat = cache.view(-1, *cache.shape[2:])
            flat.index_copy_(0, d, flat.index_select(0, s))
