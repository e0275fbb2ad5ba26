"""The CPU weight-streaming matmuls (kernels/csrc/skinny_linear.c) against float64 references of
the same rounded inputs: row counts that fill and leave partial register blocks (blocks of 4),
output sizes that leave a partial tile of 4 columns, K that leaves a masked tail."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear
from kernels.linear import SKINNY_MAX_ROWS, linear
from kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
)
from tests.kernels.kcheck import assert_close

ROWS = [1, 3, 4, 6, 17]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    for kind in (cpu_linear.BF16, cpu_linear.INT8, cpu_linear.INT4):
        if not cpu_linear.supports(kind):
            pytest.skip(f"the skinny kernel for kind {kind} does not run on this CPU")


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k", "bias"), [(37, 96, True), (64, 200, False)])
def test_bf16_matches_reference(m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = _inputs(m, n, k, torch.bfloat16, seed=m * 31 + n)
    b = b if bias else None
    y = cpu_linear.linear_bf16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_close(y, _reference(x, w, b), torch.bfloat16, f"bf16 m={m}")


def test_bf16_strided_rows_and_leading_dims() -> None:
    """x may be a column slice of a wider tensor (rows not contiguous) and carry batch dims."""
    x, w, b = _inputs(4, 40, 64, torch.bfloat16, seed=5)
    wide = torch.cat([x, torch.randn(4, 16).bfloat16()], dim=1)[:, :64]
    y = cpu_linear.linear_bf16(wide.view(2, 2, 64), w, b)
    assert y.shape == (2, 2, 40)
    assert_close(y.view(4, 40), _reference(x, w, b), torch.bfloat16, "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
def test_int8_matches_dequantized_reference(m: int, dtype: torch.dtype) -> None:
    x, w, b = _inputs(m, 37, 200, dtype, seed=m)
    q, s = quantize_int8(w.float())
    y = cpu_linear.linear_int8(x, q, s, b)
    assert y.dtype == dtype
    assert_close(y, _reference(x, dequantize_int8(q, s), b), dtype, f"int8 m={m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "group"), [(1, 32), (3, 64), (4, 128), (6, 32), (17, 64)])
def test_int4_matches_dequantized_reference(m: int, group: int, dtype: torch.dtype) -> None:
    x, w, b = _inputs(m, 37, 256, dtype, seed=m + group)
    packed, scales, zeros = quantize_int4(w.float(), group)
    sm = cpu_linear.int4_scale_min(scales, zeros)
    y = cpu_linear.linear_int4(x, packed, sm, group, b)
    assert y.dtype == dtype
    ref = _reference(x, dequantize_int4(packed, scales, zeros, group), b)
    assert_close(y, ref, dtype, f"int4 m={m} g={group}")


def test_ops_route_small_batches_to_the_kernels() -> None:
    """`linear`/`int8_linear` on CPU give the kernel's exact output for decode-sized batches."""
    x, w, _ = _inputs(SKINNY_MAX_ROWS, 24, 64, torch.bfloat16, seed=1)
    assert torch.equal(linear(x, w), cpu_linear.linear_bf16(x, w))
    q, s = quantize_int8(w.float())
    assert torch.equal(int8_linear(x, q, s), cpu_linear.linear_int8(x, q, s))
    big, _, _ = _inputs(SKINNY_MAX_ROWS + 1, 24, 64, torch.bfloat16, seed=2)
    assert_close(linear(big, w), _reference(big, w, None), torch.bfloat16, "torch path")
    packed, scales, zeros = quantize_int4(w.float(), 32)
    assert_close(int4_linear(x.float(), packed, scales, zeros, 32),
                 _reference(x, dequantize_int4(packed, scales, zeros, 32), None), torch.float32,
                 "int4 op")
