"""SiLU-and-multiply of the gated MLP: silu(x[:, :I]) * x[:, I:].

On CPU a C kernel (kernels/csrc/activation.c) does it in one pass with torch's roundings; the
reference is three torch ops and two passes over the input."""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels.cpu_library import load

_ABI = 1


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.activation_abi() != _ABI:
        return None
    lib.silu_and_mul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.silu_and_mul.restype = None
    return lib


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    lib = _library() if x.device.type == "cpu" else None
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return silu_and_mul_reference(x)
    inter = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inter)
    lib.silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], inter,
                     int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out
