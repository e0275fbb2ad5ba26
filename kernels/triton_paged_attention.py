"""Triton paged attention: a decode kernel (flash-decoding split-K + reduce) for the rows with one
query token, and a prefill kernel (query tiles x key tiles) for the chunked-prefill rows.

Why two kernels and not one: a decode row has one query per head, so its work is a GEMV that is
bound by reading K/V; the best shape for it is "all query heads of one KV head x a slice of the
context" with the context split across programs when the batch is too small to fill the GPU. A
prefill row is a GEMM whose tiles of 64 query tokens reuse every loaded key 64 times. One unified
kernel must pick one tiling for both. Both kernels take the whole batch: each program reads its
row's query length from `query_start` and returns at once when the row belongs to the other
kernel, so no per-step index lists are built or copied to the device, and the launch grid depends
only on host integers (batch size, max query length, max sequence length).

Maths (both kernels): softmax(s) V computed online over key tiles (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022): keep per row the running max m, the running sum l of
exp(s - m) and the unnormalised output acc; for a new tile m' = max(m, max s),
acc <- acc * exp(m - m') + exp(s - m') V, l <- l * exp(m - m') + sum exp(s - m'). Scores are kept
in base 2 (s * scale * log2 e, then exp2), which is the same softmax and one multiply cheaper.
m starts at -1e30 rather than -inf so that a row whose tile is fully masked computes
exp2(-inf - (-1e30)) = 0 instead of exp2(-inf + inf) = NaN.

Split-K (flash-decoding, Dao et al. 2023): split s of a decode row writes (acc_s, m_s, l_s); the
reduce computes M = max m_s, out = sum acc_s 2^(m_s - M) / sum l_s 2^(m_s - M). An empty split
(beyond the row's length, or before its window) has m_s = -1e30 and contributes 0.

Masking (see kernels/paged_attention.py): the query at position p sees key j iff j <= p and, with
a window w, j > p - w. Each query position p = seq_len - q_len + i (queries are the last q_len
tokens of the context). With tree masks (HAS_HOLES, prefill kernel only: a tree is a sequence of
several query tokens) key j is also hidden when p - j < 64 and bit p - j of the query's holes is
set.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.paged_attention import AttentionMetadata

LOG2E = 1.4426950408889634
# Sentinel for "no score yet": finite so that exp2(sentinel - sentinel) is 1, not NaN.
NEG_BIG = -1.0e30


@triton.jit
def _gather_kv(cache_ptr, block_table_row, pos, kv_valid, dims, dmask, kvh,
               block_size, stride_b, stride_s, stride_h):
    # Token pos lives in page block_table[pos // block_size] at offset pos % block_size. The
    # page index is widened to int64: a cache can exceed 2**31 elements.
    page = tl.load(block_table_row + pos // block_size, mask=kv_valid, other=0).to(tl.int64)
    off = page * stride_b + (pos % block_size) * stride_s + kvh * stride_h
    return tl.load(cache_ptr + off[:, None] + dims[None, :],
                   mask=kv_valid[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ms,
    head_dim, block_size, window, partition_size,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - q_start != 1:
        return  # not a decode row
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, seq_len)
    if USE_WINDOW:
        # The query sits at p = seq_len - 1 and sees j > p - window.
        lo = tl.maximum(lo, seq_len - window)

    hloc = tl.arange(0, BLOCK_H)
    head_mask = hloc < GROUP
    heads = kvh * GROUP + hloc
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    # All GROUP query heads of this KV head share each K/V tile (GQA): K/V are read once.
    # Rows >= GROUP pad the tile up to the 16-row minimum of tl.dot and are never stored.
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + dims[None, :], mask=head_mask[:, None] & dmask[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_H], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        kv_valid = pos < hi
        k = _gather_kv(k_cache_ptr, table_row, pos, kv_valid, dims, dmask, kvh, block_size,
                       stride_kb, stride_ks, stride_kh)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(kv_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _gather_kv(v_cache_ptr, table_row, pos, kv_valid, dims, dmask, kvh, block_size,
                       stride_vb, stride_vs, stride_vh)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        # The query always sees itself, so l_i > 0 on every real row.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=head_mask[:, None] & dmask[None, :])
    else:
        part = (part_acc_ptr + seq.to(tl.int64) * stride_pb + heads[:, None] * stride_ph
                + split * stride_ps + dims[None, :])
        tl.store(part, acc, mask=head_mask[:, None] & dmask[None, :])
        ml = (part_ml_ptr + seq.to(tl.int64) * stride_mb + heads * stride_mh
              + split * stride_ms)
        tl.store(ml, m_i, mask=head_mask)
        tl.store(ml + 1, l_i, mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, query_start_ptr,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ms, stride_ot, stride_oh,
    head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - q_start != 1:
        return
    splits = tl.arange(0, BLOCK_S)
    smask = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    ml = part_ml_ptr + seq.to(tl.int64) * stride_mb + head * stride_mh + splits * stride_ms
    m = tl.load(ml, mask=smask, other=NEG_BIG)
    l_s = tl.load(ml + 1, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + seq.to(tl.int64) * stride_pb + head * stride_ph
                  + splits[:, None] * stride_ps + dims[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)
    # Rescale each split to the global max (base 2, as in the partial kernel).
    w = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr, holes_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    head_dim, block_size, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr, HAS_HOLES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_len <= 1:
        return  # decode rows (and empty padding rows) are not ours
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the chunk's first query

    # Rows of the tile are (query token, head of the GQA group) pairs, so one K/V tile serves
    # BLOCK_Q tokens x GROUP heads: K/V are read once per KV head.
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP_PAD
    hloc = rows % GROUP_PAD
    row_valid = (tok < q_len) & (hloc < GROUP)
    heads = kvh * GROUP + hloc
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dmask[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = first_pos + tok
    if HAS_HOLES:
        holes = tl.load(holes_ptr + q_rows, mask=row_valid, other=0)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # Keys this tile can see: up to its last query (causal), from its first query's window.
    hi = first_pos + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos + q_tile * BLOCK_Q - window + 1, 0)

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        kv_valid = pos < hi
        k = _gather_kv(k_cache_ptr, table_row, pos, kv_valid, dims, dmask, kvh, block_size,
                       stride_kb, stride_ks, stride_kh)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = kv_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        if HAS_HOLES:
            back = q_pos[:, None] - pos[None, :]
            bit = (holes[:, None] >> tl.minimum(tl.maximum(back, 0), 63).to(tl.int64)) & 1
            visible &= (back >= 64) | (bit == 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _gather_kv(v_cache_ptr, table_row, pos, kv_valid, dims, dmask, kvh, block_size,
                       stride_vb, stride_vs, stride_vh)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dmask[None, :])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_partition_size(query: torch.Tensor, num_programs: int) -> int | None:
    """Tokens per split, or None for no split. Splitting pays when the batch alone does not put
    two programs on every SM (flash-decoding); otherwise it only adds the reduce pass."""
    sms = _num_sms(query.device.index or 0) if query.is_cuda else 132
    return None if num_programs >= 2 * sms else 512


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as TF32 on tensor cores (10-bit mantissa); ask for IEEE so
    # the fp32 path matches the reference to fp32 rounding. fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, out: torch.Tensor,
    partition_size: int | None = None,
) -> None:
    """Attention of every query_len == 1 row of the batch, written into `out`. partition_size:
    context tokens per split-K program; None picks one (pin it to keep the grid fixed across
    steps, e.g. under CUDA-graph capture); a value >= max_seq_len disables the split."""
    _, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    batch = meta.num_seqs
    if partition_size is None:
        partition_size = _default_partition_size(query, batch * num_kv_heads)
    if partition_size is None or partition_size >= meta.max_seq_len:
        partition_size, num_splits = max(meta.max_seq_len, 1), 1
    else:
        num_splits = triton.cdiv(meta.max_seq_len, partition_size)
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64 if block_d <= 128 else 32
    part_acc = part_ml = out  # placeholders: unused when num_splits == 1
    pstrides = mstrides = (0, 0, 0)
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=query.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32,
                              device=query.device)
        pstrides, mstrides = part_acc.stride()[:3], part_ml.stride()[:3]
    window = meta.sliding_window
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, part_acc, part_ml,
        meta.query_start, meta.seq_lens, meta.block_tables,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        meta.block_tables.stride(0), *pstrides, *mstrides,
        head_dim, meta.block_size, window or 0, partition_size,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, NUM_SPLITS=num_splits, USE_WINDOW=window is not None,
        DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=4,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_acc, part_ml, out, meta.query_start,
            *pstrides, *mstrides, out.stride(0), out.stride(1),
            head_dim,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, num_warps=4,
        )


def paged_prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, out: torch.Tensor,
) -> None:
    """Attention of every query_len > 1 row of the batch, written into `out`."""
    _, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    # 64 (token, head) rows x 64 keys per step: a tile a H100 SM holds in registers at D = 128.
    block_m = max(64, group_pad) if block_d <= 128 else max(32, group_pad)
    block_q = block_m // group_pad
    block_n = 64 if block_d <= 128 else 32
    window = meta.sliding_window
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out,
        meta.query_start, meta.seq_lens, meta.block_tables,
        meta.attn_holes if meta.attn_holes is not None else meta.query_start,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        meta.block_tables.stride(0),
        head_dim, meta.block_size, window or 0,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_WINDOW=window is not None, HAS_HOLES=meta.attn_holes is not None,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=4,
    )


def paged_attention_triton(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    partition_size: int | None = None,
) -> torch.Tensor:
    assert query.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert query.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"
    out = torch.empty_like(query)
    if query.shape[0] == 0:
        return out
    # Which kernels to launch is read from the host copy; which rows each handles is decided on
    # the device from query_start, so nothing is copied per step.
    qs = meta.query_start_host
    if any(qs[i + 1] - qs[i] == 1 for i in range(meta.num_seqs)):
        paged_decode_attention(query, k_cache, v_cache, meta, scale, out, partition_size)
    if meta.max_query_len > 1:
        paged_prefill_attention(query, k_cache, v_cache, meta, scale, out)
    return out
