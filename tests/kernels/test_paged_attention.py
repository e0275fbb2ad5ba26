"""Paged attention: the Triton kernels (interpreted) and the torch reference, each against a
naive per-token softmax(q K^T) V in float64."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from kernels.paged_attention import AttentionMetadata, paged_attention_reference
from tests.kernels.kcheck import assert_close

# (context length, query length) per sequence. Decodes (q = 1) and prefill chunks with a cached
# past (q < ctx) and without (q == ctx), lengths that end mid-page and cross page boundaries.
MIXED = [(37, 37), (90, 1), (53, 20), (3, 1), (70, 1), (18, 2)]


def make_batch(
    seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, window: int | None, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(ctx / block_size) for ctx, _ in seqs]
    num_blocks = sum(pages) + 3  # spare pages hold random data that must never be read
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)  # pages of a sequence are scattered, not contiguous
    tables, used = [], 0
    for n in pages:
        tables.append(order[used:used + n])
        used += n
    width = max(pages)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qs = [0]
    for _, q_len in seqs:
        qs.append(qs[-1] + q_len)
    query = torch.randn(qs[-1], num_heads, head_dim, generator=gen).to(dtype)
    lens = [ctx for ctx, _ in seqs]
    meta = AttentionMetadata(
        query_start=torch.tensor(qs, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=block_tables, block_size=block_size,
        max_query_len=max(q for _, q in seqs), max_seq_len=max(lens),
        query_start_host=qs, seq_lens_host=lens, sliding_window=window,
    )
    return query, k_cache, v_cache, meta, tables


def to(
    device: torch.device, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    meta: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    meta = dataclasses.replace(meta, query_start=meta.query_start.to(device),
                               seq_lens=meta.seq_lens.to(device),
                               block_tables=meta.block_tables.to(device))
    return q.to(device), kc.to(device), vc.to(device), meta


def naive_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    tables: list[list[int]], scale: float,
) -> torch.Tensor:
    """Token by token, float64: gather the context's K/V page by page, mask (causal, window,
    tree holes), softmax, sum."""
    num_heads = query.shape[1]
    num_kv_heads, bs = k_cache.shape[2], k_cache.shape[1]
    rep = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=torch.float64)
    for i, ctx in enumerate(meta.seq_lens_host):
        q0, q1 = meta.query_start_host[i], meta.query_start_host[i + 1]
        k = torch.stack([k_cache[tables[i][p // bs], p % bs] for p in range(ctx)]).double()
        v = torch.stack([v_cache[tables[i][p // bs], p % bs] for p in range(ctx)]).double()
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [ctx, Hq, D]
        for j in range(q1 - q0):
            p = ctx - (q1 - q0) + j
            s = torch.einsum("hd,lhd->hl", query[q0 + j].double(), k) * scale
            visible = torch.arange(ctx) <= p
            if meta.sliding_window is not None:
                visible &= torch.arange(ctx) > p - meta.sliding_window
            if meta.attn_holes_host is not None:  # tree rows: bit d hides the key d back
                holes = meta.attn_holes_host[q0 + j]
                visible &= torch.tensor([not (0 < p - c < 64 and holes >> (p - c) & 1)
                                         for c in range(ctx)])
            s[:, ~visible] = float("-inf")
            out[q0 + j] = torch.einsum("hl,lhd->hd", s.softmax(-1), v)
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_reference_matches_naive(heads: tuple[int, int], window: int | None) -> None:
    q, kc, vc, meta, tables = make_batch(MIXED, *heads, 32, 16, torch.float32, window, seed=1)
    scale = 32 ** -0.5
    out = paged_attention_reference(q, kc, vc, meta, scale)
    assert_close(out, naive_attention(q, kc, vc, meta, tables, scale), torch.float32, "reference")


# Fresh prefills (no past) of unequal lengths among decodes and a chunk with a past: the first
# four share one right-padded batch, the 5-token one runs alone (padding it would pass 1.25x).
FRESH = [(37, 37), (90, 1), (30, 30), (37, 37), (53, 20), (16, 16), (5, 5), (3, 1)]


@pytest.mark.parametrize(("dtype", "heads"), [(torch.float32, (4, 4)), (torch.bfloat16, (8, 2))])
def test_fresh_chunks_share_padded_batches(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    q, kc, vc, meta, tables = make_batch(FRESH, *heads, 32, 16, dtype, None, seed=4)
    batches, alone = meta.reference_plan().fresh_batches(q.device)
    assert [(b.batch, b.q_len, b.real is not None) for b in batches] == [(4, 37, True)]
    assert sorted(c.q_end - c.q_start for c in alone) == [5, 20]
    scale = 32 ** -0.5
    out = paged_attention_reference(q, kc, vc, meta, scale)
    assert_close(out, naive_attention(q, kc, vc, meta, tables, scale), dtype, "fresh batches")


def test_equal_fresh_chunks_batch_without_padding() -> None:
    q, kc, vc, meta, tables = make_batch([(20, 20), (90, 1), (20, 20)], 8, 2, 32, 16,
                                         torch.float32, None, seed=6)
    batches, alone = meta.reference_plan().fresh_batches(q.device)
    assert [(b.batch, b.q_len, b.real) for b in batches] == [(2, 20, None)] and not alone
    out = paged_attention_reference(q, kc, vc, meta, 0.2)
    assert_close(out, naive_attention(q, kc, vc, meta, tables, 0.2), torch.float32, "equal")


# (dtype, head_dim, (Hq, Hkv), window, partition_size, block_size): every value of each axis is
# covered, and split-K (partition 32 < contexts up to 90) runs with and without a window, GQA
# 1/4/8 and both head dims. The interpreter is slow, so this is a covering set, not a product.
CASES = [
    (torch.float32, 64, (2, 2), None, None, 16),
    (torch.float32, 128, (8, 2), 7, 32, 16),
    (torch.float32, 64, (8, 1), None, 32, 8),
    (torch.float16, 128, (4, 1), None, None, 16),
    (torch.float16, 64, (2, 2), 20, 32, 16),
    (torch.bfloat16, 64, (8, 1), 7, None, 16),
    (torch.bfloat16, 128, (2, 2), None, 32, 8),
]


@pytest.mark.parametrize(("dtype", "head_dim", "heads", "window", "partition", "block_size"),
                         CASES)
def test_triton_matches_naive(
    kernel_module, device, dtype: torch.dtype, head_dim: int, heads: tuple[int, int], window: int | None,
    partition: int | None, block_size: int,
) -> None:
    mod = kernel_module("kernels.triton_paged_attention")
    q, kc, vc, meta, tables = make_batch(MIXED, *heads, head_dim, block_size, dtype, window,
                                         seed=hash((head_dim, heads, window)) % 1000)
    scale = head_dim ** -0.5
    out = mod.paged_attention_triton(*to(device, q, kc, vc, meta), scale,
                                     partition_size=partition).cpu()
    assert out.dtype == dtype
    # Against the exact result of the same (rounded) inputs: the bound is the kernel's own error.
    assert_close(out, naive_attention(q, kc, vc, meta, tables, scale), dtype, "triton")


@pytest.mark.parametrize("window", [None, 40])
def test_decode_split_k_long_context(kernel_module, device, window: int | None) -> None:
    """Decode-only batch (the prefill kernel is not launched): a long row split into 6
    partitions, a short row whose later partitions are empty, and the no-split path."""
    mod = kernel_module("kernels.triton_paged_attention")
    seqs = [(300, 1), (20, 1), (129, 1)]
    q, kc, vc, meta, tables = make_batch(seqs, 8, 2, 64, 16, torch.float32, window, seed=3)
    ref = naive_attention(q, kc, vc, meta, tables, 0.125)
    for partition in (64, None):
        out = mod.paged_attention_triton(*to(device, q, kc, vc, meta), 0.125,
                                         partition_size=partition).cpu()
        assert_close(out, ref, torch.float32, f"partition {partition}")


def test_prefill_only_batch_crosses_query_tiles(kernel_module, device) -> None:
    """Chunks longer than one query tile (64 rows / GQA 4 = 16 tokens) with and without past."""
    mod = kernel_module("kernels.triton_paged_attention")
    seqs = [(40, 35), (70, 23)]
    q, kc, vc, meta, tables = make_batch(seqs, 4, 1, 64, 16, torch.float16, None, seed=4)
    out = mod.paged_attention_triton(*to(device, q, kc, vc, meta), 0.125).cpu()
    assert_close(out, naive_attention(q, kc, vc, meta, tables, 0.125), torch.float16, "prefill")


# The CPU decode kernel (C, compiled on first use): head dims on its vector path (64, 128) and off
# it (40), GQA 1/4/8, pages smaller than its 16-key chunks (8), equal (16) and larger (32), windows
# shorter than a chunk and spanning several.
CPU_CASES = [
    (torch.float32, 64, (2, 2), None, 16),
    (torch.float32, 128, (8, 2), 7, 8),
    (torch.float32, 40, (8, 1), None, 32),
    (torch.float32, 64, (9, 3), 40, 16),
    (torch.bfloat16, 64, (9, 3), None, 16),
    (torch.bfloat16, 128, (8, 1), 20, 16),
    (torch.bfloat16, 40, (4, 4), 7, 8),
]
DECODES = [(300, 1), (1, 1), (17, 1), (16, 1), (90, 1), (33, 1)]


@pytest.mark.parametrize(("dtype", "head_dim", "heads", "window", "block_size"), CPU_CASES)
def test_cpu_decode_kernel_matches_naive(dtype: torch.dtype, head_dim: int,
                                         heads: tuple[int, int], window: int | None,
                                         block_size: int) -> None:
    from kernels import cpu_paged_attention as cpu

    seqs = DECODES[:3] + MIXED + DECODES[3:]  # decode rows before, among and after prefills
    q, kc, vc, meta, tables = make_batch(seqs, *heads, head_dim, block_size, dtype, window,
                                         seed=hash((head_dim, heads, window)) % 1000)
    assert cpu.supports(q, kc, block_size), "the C kernel did not build on this machine"
    plan = meta.reference_plan()
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    cpu.paged_decode_attention_cpu(q, kc, vc, meta.block_tables, meta.seq_lens,
                                   plan.decode_token_idx, plan.decode_seq_ids, out, scale, window)
    rows = plan.decode_token_idx.long()
    ref = naive_attention(q, kc, vc, meta, tables, scale)
    assert out.dtype == dtype
    assert_close(out[rows], ref[rows], dtype, "cpu decode kernel")
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.isnan(out[others]).all(), "the kernel wrote rows that are not decodes"


def test_op_on_cpu_mixes_kernel_decodes_with_reference_prefills() -> None:
    """`paged_attention()` sends decode rows to the C kernel and chunks to SDPA: all rows exact."""
    from kernels.paged_attention import paged_attention

    q, kc, vc, meta, tables = make_batch(MIXED + DECODES, 8, 2, 64, 16, torch.float32, None,
                                         seed=9)
    out = paged_attention(q, kc, vc, meta, 0.125)
    assert_close(out, naive_attention(q, kc, vc, meta, tables, 0.125), torch.float32, "op")
