"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton


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


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from kernels.triton_rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if x.dtype == torch.float32:
        return _rms_norm_fast_cpu(x, weight, eps, residual)
    # In bf16/fp16 torch's kernel loses accuracy that Hugging Face's fp32 normalisation keeps.
    return rms_norm_reference(x, weight, eps, residual)
