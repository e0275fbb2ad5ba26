"""Triton weight-only int8 / int4 matmul, y = x @ W.T (+ bias), dequantizing W inside the tile
loop so the weight crosses HBM at 1 (int8) or 0.5 (int4) bytes per element. Layouts and formulas
are in kernels/quant_matmul.py.

int8: the per-output-channel scale factors out of the K sum, sum_k x[m,k] q[n,k] s[n] =
s[n] * sum_k x[m,k] q[n,k], so the loop multiplies x by q converted to x's dtype (exact: |q| <=
127 fits fp16/bf16 mantissas) and the scale is applied once to the fp32 accumulator.
int4: scale and zero vary along K by group, so each K tile (which never straddles a group:
BLOCK_K divides group_size) dequantizes (q - zero) * scale in fp32, casts to x's dtype and feeds
tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles walk the same column tiles together, so a weight tile
    # is reused from L2 by GROUP_M programs (the Triton matmul tutorial's swizzle).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    group_size,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)  # packed bytes of the tile
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_kb[None, :]  # [BN, BK/2]
    s_ptrs = scale_ptr + offs_n.to(tl.int64) * stride_sn
    z_ptrs = zero_ptr + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # K is a multiple of group_size, itself a multiple of BLOCK_K: no K mask is needed.
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        packed = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        # Byte j holds k = 2j (low nibble) and 2j + 1 (high): join puts them side by side on a
        # new last axis and the reshape interleaves them back into K order.
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        g = k0 // group_size
        s = tl.load(s_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Decode-sized M is a GEMV bound by the weight read: a
    16-row tile (tl.dot's minimum) and narrow N tiles give many programs to stream the weight.
    Prefill-sized M is compute bound: larger square tiles reuse each dequantized weight tile."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return 64, 64, 4
    return 128, 128, 8


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def int8_linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    assert x2.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bm, bn, warps = _tiles(m)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int8_matmul_kernel[grid](
            x2, qweight, scales, bias if bias is not None else scales, y,
            m, n, k, x2.stride(0), qweight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=warps,
        )
    return y.view(*x.shape[:-1], n)


def int4_linear_triton(
    x: torch.Tensor, qweight_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    n, k = qweight_packed.shape[0], qweight_packed.shape[1] * 2
    assert k % group_size == 0 and group_size % 16 == 0
    assert scales.shape == zeros.shape == (n, k // group_size)
    assert scales.stride() == zeros.stride() and scales.stride(1) == 1
    x2 = x.reshape(-1, k)
    assert x2.stride(1) == 1 and qweight_packed.is_contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bm, bn, warps = _tiles(m)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int4_matmul_kernel[grid](
            x2, qweight_packed, scales, zeros, bias if bias is not None else scales, y,
            m, n, k, x2.stride(0), qweight_packed.stride(0), scales.stride(0), y.stride(0),
            group_size,
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(group_size, 64), GROUP_M=8, num_warps=warps,
        )
    return y.view(*x.shape[:-1], n)
