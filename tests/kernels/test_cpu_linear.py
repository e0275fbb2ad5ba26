"""The CPU weight-streaming matmuls (kernels/csrc/skinny_linear.c) against float64 references of
the same rounded inputs: row counts that fill and leave partial register blocks (blocks of 4),
output sizes that leave a partial tile of 4 columns, K that leaves a masked tail."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear
from kernels.cpu_decode_layer import MAX_ROWS
from kernels.linear import linear
from kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
)
from tests.kernels.kcheck import assert_close

ROWS = [1, 3, 4, 6, 16, 17, 33]


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
@pytest.mark.parametrize(("n", "k", "bias"), [(37, 96, True), (64, 200, False), (80, 128, False)])
def test_bf16_matches_reference(m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = _inputs(m, n, k, torch.bfloat16, seed=m * 31 + n)
    b = b if bias else None
    y = cpu_linear.linear_bf16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_close(y, _reference(x, w, b), torch.bfloat16, f"bf16 m={m}")


def _has_amx() -> bool:
    """The CPU has AMX-BF16 and the kernel can grant tile data (Linux >= 5.16): then the kernels
    must use it, and a silent fallback to AVX-512 fails these tests."""
    import os

    with open("/proc/cpuinfo") as f:
        flagged = "amx_bf16" in f.read()
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return flagged and (major, minor) >= (5, 16)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 40, 64, 65, 100, 130, 300])
def test_amx_part_covers_whole_blocks_and_matches(m: int) -> None:
    """On an AMX machine every row count goes through tiles for every whole 16-column block (the
    remaining 5 columns are AVX-512's): up to 64 rows the skinny loop, past that the blocked
    one, with an odd block count, an odd group count and more than one panel of rows among the
    cases; the tile result matches the float64 reference."""
    x, w, b = _inputs(m, 53, 160, torch.bfloat16, seed=m)
    y, done = cpu_linear.amx_part_bf16(x, w, b)
    expected = 48 if _has_amx() else 0
    assert done == expected
    if done:
        assert_close(y[:, :done], _reference(x, w, b)[:, :done], torch.bfloat16, f"amx m={m}")
        assert (y[:, done:] == 0).all()  # its columns only


def test_a_rows_result_does_not_depend_on_the_rows_beside_it() -> None:
    """Bit for bit, for every row count the kernels take (with AMX: the skinny loop and the
    blocked one): a speculative verify (k + 1 rows) must reproduce plain decoding (1 row)
    exactly, or greedy outputs diverge in bf16."""
    x, w, b = _inputs(cpu_linear.bf16_max_rows(), 1037, 576, torch.bfloat16, seed=11)
    alone = cpu_linear.linear_bf16(x[:1], w, b)
    for m in range(2, x.shape[0] + 1):
        assert torch.equal(cpu_linear.linear_bf16(x[:m], w, b)[:1], alone), f"m={m}"


def test_outputs_larger_than_the_caches_are_streamed_out_exactly() -> None:
    """A prefill-sized y (past 8 MB) leaves through non-temporal stores; an odd block count puts
    its last 16 columns through the half-line path. Both match the reference and the one-row
    result bit for bit."""
    if not _has_amx():
        pytest.skip("the streamed path is AMX's")
    x, w, b = _inputs(1040, 4112, 64, torch.bfloat16, seed=12)
    y, done = cpu_linear.amx_part_bf16(x, w, b)
    assert done == 4112 and y.numel() * 2 >= 8 << 20
    assert_close(y, _reference(x, w, b), torch.bfloat16, "streamed")
    for r in (0, 517, 1039):
        assert torch.equal(cpu_linear.amx_part_bf16(x[r:r + 1], w, b)[0][0], y[r]), f"row {r}"


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
    rows = cpu_linear.bf16_max_rows()
    assert rows == (cpu_linear.AMX_MAX_ROWS if _has_amx() else cpu_linear.AVX512_MAX_ROWS)
    x, w, _ = _inputs(rows, 24, 64, torch.bfloat16, seed=1)
    assert torch.equal(linear(x, w), cpu_linear.linear_bf16(x, w))
    q, s = quantize_int8(w.float())
    assert torch.equal(int8_linear(x, q, s), cpu_linear.linear_int8(x, q, s))
    big, _, _ = _inputs(rows + 1, 24, 64, torch.bfloat16, seed=2)
    assert_close(linear(big, w), _reference(big, w, None), torch.bfloat16, "torch path")
    packed, scales, zeros = quantize_int4(w.float(), 32)
    x = x[:4]
    assert_close(int4_linear(x.float(), packed, scales, zeros, 32),
                 _reference(x, dequantize_int4(packed, scales, zeros, 32), None), torch.float32,
                 "int4 op")


def test_every_fused_step_size_streams_through_the_kernel() -> None:
    """A speculative verify of up to the fused layer's row limit must score its LM-head rows
    with the kernel that scores a plain decode, or bf16 greedy output could differ between
    them (torch's GEMM rounds differently)."""
    if not cpu_linear.supports(cpu_linear.BF16):
        pytest.skip("no AVX512-BF16: bf16 matmuls run in torch")
    assert cpu_linear.bf16_max_rows() >= MAX_ROWS
