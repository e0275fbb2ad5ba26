"""Rotary position embedding, neox layout (rotate halves), applied from a cos/sin cache.

Scaling (llama3, linear, ...) is baked into the cache by the model's rotary layer, so this op
only gathers by position and rotates.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._dispatch import use_triton
from kernels.cpu_library import load


def rotary_embedding_reference(
    positions: torch.Tensor,  # [T] int64
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] fp32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    # Like Hugging Face: cos/sin are computed in fp32, then the rotation runs in the model dtype.
    cos_sin = cos_sin_cache.index_select(0, positions).to(query.dtype)
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)

    return rotate(query), rotate(key)


_ROTARY_ABI = 1


@functools.cache
def _rotary_lib() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.rotary_abi() != _ROTARY_ABI:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.rotary_inplace.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64,
                                   ctypes.c_int, ctypes.c_int]
    lib.rotary_inplace.restype = None
    return lib


def _rotary_c(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
              cos_sin_cache: torch.Tensor) -> bool:
    """Rotate query and key in place with the C kernel (kernels/csrc/rotary.c); False where it
    does not apply. Each token's heads must be contiguous (a row of a fused QKV output is)."""
    lib = _rotary_lib()
    d = query.shape[-1]
    if (lib is None or query.dtype not in (torch.float32, torch.bfloat16)
            or key.dtype != query.dtype or positions.dtype != torch.int64
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()
            or not positions.is_contiguous() or query.dim() != 3 or key.dim() != 3):
        return False
    for x in (query, key):
        if x.stride(2) != 1 or x.stride(1) != d:
            return False
    lib.rotary_inplace(query.data_ptr(), query.stride(0), query.shape[1], key.data_ptr(),
                       key.stride(0), key.shape[1], d, positions.data_ptr(), positions.numel(),
                       cos_sin_cache.data_ptr(), cos_sin_cache.shape[1],
                       int(query.dtype == torch.bfloat16), torch.get_num_threads())
    return True


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(query):
        from kernels.triton_rotary import rotary_embedding_triton

        return rotary_embedding_triton(positions, query, key, cos_sin_cache)
    if query.device.type == "cpu" and _rotary_c(positions, query, key, cos_sin_cache):
        return query, key
    return rotary_embedding_reference(positions, query, key, cos_sin_cache)
