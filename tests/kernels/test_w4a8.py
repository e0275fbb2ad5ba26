"""The integer dot-product matmul (kernels/csrc/w4a8_linear.c) against its torch reference: 4-bit
(w4a8's decoder layers) and 8-bit (its LM head) codes, row counts that fill and leave partial
blocks of 8, output sizes that leave a partial block of 16 rows, fp32 and bf16 activations."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear, cpu_w4a8
from kernels.quant_matmul import unpack_int4
from worker.quant.linear import quantize_int4_minmax

pytestmark = pytest.mark.skipif(not cpu_w4a8.available(),
                                reason="needs AVX512-VNNI and a C compiler")


def _weights(n: int, k: int, bits: int, seed: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if bits == 4:
        packed, scales, zeros = quantize_int4_minmax(w, 32)
        scale_min = cpu_linear.int4_scale_min(scales, zeros)
        codes = unpack_int4(packed)
        return codes, scale_min, cpu_w4a8.pack(packed, scale_min)
    codes, scale_min = cpu_w4a8.quantize8(w)
    return codes, scale_min, cpu_w4a8.pack8(codes, scale_min)


def _dense(codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """W = q * scale + min with fp16 scales, as packed."""
    n, k = codes.shape
    s, m = scale_min[..., 0].half().float(), scale_min[..., 1].half().float()
    return (codes.float().view(n, k // 32, 32) * s[..., None] + m[..., None]).view(n, k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 64), (3, 40, 96), (8, 16, 32), (9, 50, 64),
                                           (17, 33, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_its_reference(bits, m, n, k, dtype) -> None:
    codes, scale_min, (weights, scales) = _weights(n, k, bits, seed=m * n + k)
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    got = cpu_w4a8.linear(x, weights, scales, n, bias)
    want = cpu_w4a8.reference(x, codes, scale_min) + bias.float()
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # bf16: the output's rounding
    assert ((got.float() - want).abs() <= tol * want.abs().clamp(min=1) + 1e-5).all()
    # Two int8 planes keep the activations to ~15 bits: close to the float product.
    dense = x.float() @ _dense(codes, scale_min).T + bias.float()
    assert (want - dense).abs().max() <= 1e-3 * dense.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_and_big_steps(bits, monkeypatch) -> None:
    n, k = 70, 96
    codes, scale_min, (weights, scales) = _weights(n, k, bits, seed=bits)
    dense = _dense(codes, scale_min)
    assert torch.equal(cpu_w4a8.dequantize(weights, scales, n, torch.float32), dense)
    assert torch.equal(cpu_w4a8.dequantize(weights, scales, n, torch.bfloat16),
                       dense.bfloat16())
    # past MAX_ROWS rows the weight is dequantized for torch's GEMM
    monkeypatch.setattr(cpu_w4a8, "MAX_ROWS", 4)
    x = torch.randn(5, k)
    torch.testing.assert_close(cpu_w4a8.linear(x, weights, scales, n), x @ dense.T)


def _one_plane(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """What plain int8 activations (a single plane) would give."""
    g = x.view(x.shape[0], -1, 32)
    s = g.abs().amax(-1, keepdim=True) / 127
    x1 = torch.sign(g / s) * torch.floor((g / s).abs() + 0.5) * s
    sc, mn = scale_min[..., 0].half().float(), scale_min[..., 1].half().float()
    c = codes.float().view(codes.shape[0], -1, 32)
    return (torch.einsum("mgi,ngi->mng", x1, c) * sc[None]).sum(-1) \
        + (mn[None] * g.sum(-1)[:, None, :]).sum(-1)


def test_one_plane_would_not_do() -> None:
    """Activations with an outlier per group (5000x the rest): one int8 plane rounds the rest
    to nothing, the second plane to steps 254 times finer (here ~1/13 of their size)."""
    n, k = 32, 64
    codes, scale_min, (weights, scales) = _weights(n, k, 4, seed=3)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)) * 0.01
    x[0, ::32] = 50.0
    dense = x @ _dense(codes, scale_min).T
    err = (cpu_w4a8.linear(x, weights, scales, n) - dense).abs().max()
    assert err * 8 < (_one_plane(x, codes, scale_min) - dense).abs().max()


def test_groups_must_be_whole() -> None:
    packed, scales, zeros = quantize_int4_minmax(torch.randn(16, 48), 16)
    with pytest.raises(ValueError, match="groups of 32"):
        cpu_w4a8.pack(packed, cpu_linear.int4_scale_min(scales, zeros))
