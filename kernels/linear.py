"""y = x @ W.T + bias, the dense matmul every float layer calls.

On CPU, bf16 activations with at most `cpu_linear.bf16_max_rows()` rows (decode steps,
speculative verifies) go to kernels/cpu_linear.py: AMX tiles where the CPU has them, else a
weight-streaming AVX-512 kernel that reads bf16 weights at close to memory bandwidth where
torch's GEMM reaches about a third of it. Bigger batches are compute bound and torch's blocked
GEMM wins; CUDA and every other case run `F.linear` (cuBLAS on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_linear


def multi_row_matmul_is_flat(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matmul of a few rows (a speculative verify) costs about what one row costs here: on CUDA and
    for bf16 on AMX CPUs; the AVX-512 kernel alone is compute bound past 2-4 rows."""
    return device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16
                                      and cpu_linear.amx_available())


def linear_reference(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and weight.is_contiguous() and cpu_linear.supports(cpu_linear.BF16)
            and x.numel() <= cpu_linear.bf16_max_rows() * x.shape[-1]):
        return cpu_linear.linear_bf16(x, weight, bias)
    return linear_reference(x, weight, bias)
