"""argmax over the last dimension of 2-D fp32 logits: greedy sampling's one reduction.

On CPU a C kernel (kernels/csrc/argmax.c) answers exactly what torch.argmax(-1) does (the first
maximum; a row with a NaN gives its first NaN) at several times torch's speed; anything else
runs torch."""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu_library import load

_ABI = 1


def argmax_rows_reference(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(-1)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.argmax_abi() != _ABI:
        return None
    lib.argmax_rows_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.argmax_rows_f32.restype = None
    return lib


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: the index of each row's maximum of x [rows, n]."""
    lib = _library() if x.device.type == "cpu" else None
    if (lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0
            or x.stride(1) != 1):
        return argmax_rows_reference(x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(),
                        torch.get_num_threads())
    return out
