"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton
from kernels.cpu_library import load


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
        residual = x
    # Same order of operations as Hugging Face Llama: normalise in fp32, cast, then scale.
    x32 = x.float()
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


def _rms_norm_fast_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # torch's fused kernel; in fp32 it equals the reference to rounding.
    if residual is not None:
        x = x + residual
        residual = x
    out = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return out if residual is None else (out, residual)


_RMS_ABI, MAX_HIDDEN = 2, 16384  # MAX_HIDDEN mirrors the C source


@functools.cache
def _rms_norm_lib() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.rms_norm_abi() != _RMS_ABI:
        return None
    args = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    for fn in (lib.rms_norm_f32, lib.rms_norm_bf16):
        fn.argtypes, fn.restype = args, None
    return lib


def _rms_norm_c(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The C kernel (kernels/csrc/rms_norm.c), or None where it does not apply."""
    lib = _rms_norm_lib()
    hidden = x.shape[-1]
    if (lib is None or hidden > MAX_HIDDEN or x.dtype not in (torch.float32, torch.bfloat16)
            or weight.dtype != x.dtype or not x.is_contiguous() or not weight.is_contiguous()
            or (residual is not None and (residual.dtype != x.dtype
                                          or residual.shape != x.shape))):
        return None
    fn = lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.rms_norm_f32
    out = torch.empty_like(x)
    res_in = None if residual is None else residual.contiguous()
    res = None if residual is None else torch.empty_like(x)
    fn(x.data_ptr(), None if res_in is None else res_in.data_ptr(),
       None if res is None else res.data_ptr(), weight.data_ptr(), out.data_ptr(),
       x.numel() // hidden, hidden, eps, torch.get_num_threads())
    return out if res is None else (out, res)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from kernels.triton_rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if x.device.type == "cpu" and (fused := _rms_norm_c(x, weight, eps, residual)) is not None:
        return fused
    if x.dtype == torch.float32:
        return _rms_norm_fast_cpu(x, weight, eps, residual)
    # In bf16/fp16 torch's kernel loses accuracy that Hugging Face's fp32 normalisation keeps.
    return rms_norm_reference(x, weight, eps, residual)
