"""y = x @ W.T + bias, the dense matmul every float layer calls.

On CPU, bf16 activations with at most SKINNY_MAX_ROWS rows (decode steps of small batches) go to
the weight-streaming kernel in kernels/cpu_linear.py, which reads bf16 weights at close to memory
bandwidth where torch's GEMM reaches about a third of it. Bigger batches are compute bound and
torch's blocked GEMM wins; CUDA and every other case run `F.linear` (cuBLAS on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_linear

# Rows up to which the skinny kernel beats torch's bf16 GEMM here (bench/kernels.py --cpu).
SKINNY_MAX_ROWS = 4


def linear_reference(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1] and weight.is_contiguous()
            and cpu_linear.supports(cpu_linear.BF16)):
        return cpu_linear.linear_bf16(x, weight, bias)
    return linear_reference(x, weight, bias)
