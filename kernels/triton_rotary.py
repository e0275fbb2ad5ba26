"""Triton rotary embedding, neox layout (rotate halves), gathered from a cos/sin cache.

For rotated dims d < rot_dim with half = rot_dim / 2 and i = d mod half:
    out[d] = x[d] * cos[i] - x[d + half] * sin[i]     (d < half)
    out[d] = x[d] * cos[i] + x[d - half] * sin[i]     (half <= d < rot_dim)
which is the complex rotation (x1 + i x2) * e^{i theta} of RoFormer eq. 34 on the paired halves.
Dims >= rot_dim (partial rotary) are copied. Scaling (llama3, linear, ...) is already in the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_t, stride_h, stride_dt, stride_dh, tok, num_heads, head_dim, half,
    cos, sin, partner, sign, is_rot,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    for h0 in range(0, num_heads, BLOCK_H):
        hh = h0 + heads
        mask = (hh[:, None] < num_heads) & (dims[None, :] < head_dim)
        base = src_ptr + tok * stride_t + hh[:, None] * stride_h
        x = tl.load(base + dims[None, :], mask=mask, other=0.0)
        xp = tl.load(base + partner[None, :], mask=mask & is_rot[None, :], other=0.0)
        rot = x.to(tl.float32) * cos[None, :] + sign[None, :] * xp.to(tl.float32) * sin[None, :]
        out = tl.where(is_rot[None, :], rot.to(x.dtype), x)
        tl.store(dst_ptr + tok * stride_dt + hh[:, None] * stride_dh + dims[None, :], out,
                 mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cache,
    num_q_heads, num_kv_heads, head_dim, rot_dim,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    half = rot_dim // 2
    dims = tl.arange(0, BLOCK_D)
    is_rot = dims < rot_dim
    first = dims < half
    idx = tl.where(first, dims, dims - half)
    partner = tl.where(first, dims + half, dims - half)
    sign = tl.where(first, -1.0, 1.0)
    # cos and sin are read once per token and shared by all its query and key heads.
    cos = tl.load(cache_ptr + pos * stride_cache + idx, mask=is_rot, other=1.0)
    sin = tl.load(cache_ptr + pos * stride_cache + half + idx, mask=is_rot, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, tok,
                  num_q_heads, head_dim, half, cos, sin, partner, sign, is_rot,
                  BLOCK_H=BLOCK_HQ, BLOCK_D=BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, tok,
                  num_kv_heads, head_dim, half, cos, sin, partner, sign, is_rot,
                  BLOCK_H=BLOCK_HK, BLOCK_D=BLOCK_D)


def rotary_embedding_triton(
    positions: torch.Tensor,  # [T] int
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rot_dim = cos_sin_cache.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= head_dim
    assert query.stride(2) == 1 and key.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    q_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    if num_tokens:
        block_d = triton.next_power_of_2(head_dim)
        # Heads per inner step: ~2K elements keeps the tile in registers.
        cap = max(1, 2048 // block_d)
        _rotary_kernel[(num_tokens,)](
            positions, query, key, cos_sin_cache, q_out, k_out,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0),
            num_q_heads, num_kv_heads, head_dim, rot_dim,
            BLOCK_HQ=min(triton.next_power_of_2(num_q_heads), cap),
            BLOCK_HK=min(triton.next_power_of_2(num_kv_heads), cap),
            BLOCK_D=block_d,
        )
    return q_out, k_out
