"""When to take the Triton path: CUDA tensors and an importable Triton. Everything else runs the
plain torch reference, which is also the CPU implementation."""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()
