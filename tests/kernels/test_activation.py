"""SiLU-and-multiply: the CPU C kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import _library, silu_and_mul, silu_and_mul_reference
from tests.kernels.kcheck import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 72), (5, 1536), (40, 40)])
def test_cpu_kernel_matches_reference(dtype: torch.dtype, rows: int, inter: int) -> None:
    """Inter sizes with and without a 16-lane tail; bf16 keeps torch's two roundings, so all but
    rare 1-ulp flips (its exp and ours differ in the last fp32 bit) are bit-identical."""
    assert _library() is not None, "the C kernel did not build on this machine"
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(dtype)
    out, ref = silu_and_mul(x), silu_and_mul_reference(x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, "silu_and_mul")
    if dtype == torch.bfloat16:
        assert (out != ref).float().mean() < 0.01, "rounding points differ from the reference"
