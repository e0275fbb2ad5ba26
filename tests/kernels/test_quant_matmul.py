"""Weight-only int8/int4 linear: quantizers, references against plain dequantized matmuls, the
CPU fast paths against the references, and the Triton kernels (interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels import quant_matmul as qm
from tests.kernels.kcheck import assert_close


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_pack_unpack_roundtrip_and_layout() -> None:
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    packed = qm.pack_int4(q)
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    # Documented layout: byte j = q[2j] | q[2j+1] << 4.
    assert int(packed[2, 5]) == int(q[2, 10]) + 16 * int(q[2, 11])
    assert torch.equal(qm.unpack_int4(packed), q)


def test_quantize_int8_error_is_half_a_step() -> None:
    w = weights(48, 96, 0)
    q, s = qm.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    # Round to nearest: |W - q s| <= s / 2 per element (absmax keeps everything in range).
    assert ((qm.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_int4_error_is_half_a_step(group_size: int) -> None:
    w = weights(40, 256, group_size)
    packed, s, z = qm.quantize_int4(w, group_size)
    assert s.shape == z.shape == (40, 256 // group_size)
    err = (qm.dequantize_int4(packed, s, z, group_size) - w).abs()
    step = s.repeat_interleave(group_size, 1)
    # Rounding the zero point to an integer can shift the group by up to half a step too.
    assert (err <= step + 1e-6).all()


def test_references_equal_plain_dequantized_matmul() -> None:
    """Dequantize by the documented formulas element by element, independently of the helpers."""
    n, k, g = 8, 64, 32
    w = weights(n, k, 5)
    x = torch.randn(3, k, dtype=torch.float64).float()
    bias = torch.randn(n)
    q8, s8 = qm.quantize_int8(w)
    w8 = torch.tensor([[int(q8[i, j]) * float(s8[i]) for j in range(k)] for i in range(n)])
    assert_close(qm.int8_linear_reference(x, q8, s8, bias), x @ w8.T + bias, torch.float32)
    packed, s4, z4 = qm.quantize_int4(w, g)
    w4 = torch.empty(n, k)
    for i in range(n):
        for j in range(k):
            byte = int(packed[i, j // 2])
            nib = byte & 0xF if j % 2 == 0 else byte >> 4
            w4[i, j] = (nib - float(z4[i, j // g])) * float(s4[i, j // g])
    assert_close(qm.int4_linear_reference(x, packed, s4, z4, g, bias), x @ w4.T + bias,
                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_cpu_fast_path_matches_reference(dtype: torch.dtype) -> None:
    w = weights(72, 160, 1)
    q, s = qm.quantize_int8(w.to(dtype))
    x = torch.randn(2, 5, 160).to(dtype)
    bias = torch.randn(72).to(dtype)
    out = qm.int8_linear(x, q, s, bias)  # CPU tensors: aten._weight_int8pack_mm
    assert out.shape == (2, 5, 72) and out.dtype == dtype
    assert_close(out, qm.int8_linear_reference(x, q, s, bias), dtype)


@pytest.mark.parametrize(("dtype", "n", "group_size"), [
    (torch.float32, 64, 32), (torch.bfloat16, 40, 64), (torch.float32, 100, 128),
])
def test_int4_cpu_fast_path_matches_reference(dtype: torch.dtype, n: int, group_size: int) -> None:
    w = weights(n, 256, n).to(dtype)
    packed, s, z = qm.quantize_int4(w, group_size)
    prepared = qm.prepare_int4_for_cpu(packed, s, z, group_size)  # N = 40, 100: padded to 16
    x = torch.randn(3, 4, 256).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = qm.int4_linear_cpu(x, prepared, bias)
    assert out.shape == (3, 4, n) and out.dtype == dtype
    assert_close(out, qm.int4_linear_reference(x, packed, s, z, group_size, bias), dtype)


# M = 1 (decode), 5, 70 (crosses the 64-row tile); N not a multiple of the tile; K not a
# multiple of BLOCK_K for int8.
@pytest.mark.parametrize(("dtype", "m", "n", "k", "bias"), [
    (torch.float32, 1, 96, 200, True),
    (torch.float16, 5, 80, 128, False),
    (torch.bfloat16, 70, 72, 96, True),
])
def test_int8_triton_matches_reference(
    kernel_module, device, dtype: torch.dtype, m: int, n: int, k: int, bias: bool,
) -> None:
    mod = kernel_module("kernels.triton_quant_matmul")
    q, s = qm.quantize_int8(weights(n, k, m).to(dtype))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = qm.int8_linear_reference(x, q, s, b)
    out = mod.int8_linear_triton(*(t.to(device) if t is not None else None
                                   for t in (x, q, s, b)))
    assert_close(out.cpu(), ref, dtype, "int8")


@pytest.mark.parametrize(("dtype", "m", "n", "k", "group_size", "bias"), [
    (torch.float32, 1, 96, 256, 32, True),
    (torch.float16, 5, 80, 128, 64, False),
    (torch.bfloat16, 70, 72, 256, 128, True),
    (torch.float32, 17, 40, 128, 128, False),
])
def test_int4_triton_matches_reference(
    kernel_module, device, dtype: torch.dtype, m: int, n: int, k: int, group_size: int,
    bias: bool,
) -> None:
    mod = kernel_module("kernels.triton_quant_matmul")
    packed, s, z = qm.quantize_int4(weights(n, k, m).to(dtype), group_size)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = qm.int4_linear_reference(x, packed, s, z, group_size, b)
    args = [t.to(device) for t in (x, packed, s, z)]
    out = mod.int4_linear_triton(*args, group_size, b.to(device) if b is not None else None)
    assert_close(out.cpu(), ref, dtype, "int4")
