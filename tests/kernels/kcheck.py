"""Helpers shared by the kernel tests: error metric and the per-dtype bounds."""

from __future__ import annotations

import torch

# Bounds on rel_err(kernel, reference), per dtype of the kernel's inputs. fp32: a few ulps of
# accumulated rounding (2**-23 ~ 1.2e-7) over sums of up to a few hundred terms. fp16 (10-bit
# mantissa, eps 9.8e-4) and bf16 (7-bit, eps 7.8e-3): a couple of ulps of the output, where the
# kernel rounds at different points (P cast before P @ V, fused dequantization) than the reference.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the norm-wise relative error. NaN anywhere (an unwritten,
    poisoned element) makes it NaN, which fails every bound."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any():
        return float("nan")
    return float((out64 - ref64).abs().max() / ref64.abs().max().clamp(min=1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: rel err {err:.3g} > {REL_TOL[dtype]:.1g} ({dtype})"
