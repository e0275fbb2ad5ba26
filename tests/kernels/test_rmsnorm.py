"""Fused residual add + RMSNorm: Triton (interpreted on CPU) against the torch reference, and
the reference against the formula."""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import rms_norm_reference
from tests.kernels.kcheck import assert_close


def test_reference_matches_formula() -> None:
    x, w = torch.randn(5, 96, dtype=torch.float64), torch.randn(96, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    assert_close(rms_norm_reference(x.float(), w.float(), 1e-6), expected, torch.float32)


@pytest.mark.parametrize(("dtype", "weight_dtype", "hidden", "residual"), [
    (torch.float32, torch.float32, 256, False),
    (torch.float32, torch.float32, 100, True),  # hidden not a power of two: masked lanes
    (torch.float16, torch.float16, 576, True),
    (torch.bfloat16, torch.bfloat16, 192, True),
    (torch.float16, torch.float32, 128, False),  # fp32 weight promotes the output to fp32
])
def test_rms_norm_matches_reference(
    kernel_module, device, dtype: torch.dtype, weight_dtype: torch.dtype, hidden: int,
    residual: bool,
) -> None:
    mod = kernel_module("kernels.triton_rmsnorm")
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(2, 7, hidden, generator=gen) * 3).to(dtype)
    w = torch.randn(hidden, generator=gen).to(weight_dtype)
    r = torch.randn(2, 7, hidden, generator=gen).to(dtype) if residual else None
    ref = rms_norm_reference(x, w, 1e-5, r)
    out = mod.rms_norm_triton(x.to(device), w.to(device), 1e-5,
                              r.to(device) if r is not None else None)
    if residual:
        (out, new_res), (ref, ref_res) = out, ref
        # The new residual is x + r rounded once to x's dtype; the interpreter truncates fp32 to
        # bf16 where the GPU rounds to nearest, hence a bound and not equality.
        assert new_res.dtype == dtype
        assert_close(new_res.cpu(), ref_res, dtype, "residual")
    assert out.dtype == ref.dtype and out.shape == x.shape
    assert_close(out.cpu(), ref, dtype, "rms_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "residual", "hidden"), [
    (1, False, 576), (3, True, 576), (70, True, 576), (5, True, 100)])  # 100: the scalar path
def test_cpu_kernel_matches_reference(dtype: torch.dtype, rows: int, residual: bool,
                                      hidden: int) -> None:
    """The C kernel behind `rms_norm` on CPU keeps the reference's rounding points: bf16 outputs
    are bit-identical but for rare 1-ulp flips from the order of the fp32 sum of squares (in
    fp32 that order moves every output by an ulp, so fp32 is held to the error bound only)."""
    from kernels.rmsnorm import _rms_norm_c

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    r = torch.randn(rows, hidden, generator=gen).to(dtype) if residual else None
    r_before = None if r is None else r.clone()
    got = _rms_norm_c(x, w, 1e-5, r)
    assert got is not None, "the C kernel did not build on this machine"
    ref = rms_norm_reference(x, w, 1e-5, r)
    if residual:
        (out, res), (ref_out, ref_res) = got, ref
        assert torch.equal(res, ref_res), "residual sum differs"
        assert torch.equal(r, r_before), "the caller's residual was modified"
    else:
        out, ref_out = got, ref
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, "rms_norm C")
    if dtype == torch.bfloat16:
        assert (out != ref_out).float().mean() < 0.01, "rounding points differ from the reference"
