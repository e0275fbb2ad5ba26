"""Tree attention (kernels/paged_attention.py, `attn_holes`): each query token of a token tree
sees the sequence's past and its own ancestors only. The torch reference, the C kernel (as the
fused decode layer calls it: one row per query token) and the Triton prefill kernel
(interpreted) against a naive float64 softmax with the tree's mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.paged_attention import paged_attention, paged_attention_reference
from tests.kernels.kcheck import assert_close
from tests.kernels.test_paged_attention import make_batch, naive_attention, to
from worker.spec.tree import tree_holes

# Parents of each query token after the first (the root, the last committed token): -1 is the
# root. A chain, a bushy tree, a tree whose second branch starts after a deep first one.
TREES = [
    [-1, 0, 1, 2],
    [-1, -1, -1, 0, 0, 1, 3, 3, 4],
    [-1, 0, 1, 2, 3, -1, 5, 6, 0, 8],
]


def batch_with_trees(trees: list[list[int]], pasts: list[int], heads: tuple[int, int],
                     head_dim: int, dtype: torch.dtype, seed: int):
    """A decode and a prefill chunk around sequences whose query tokens are trees."""
    seqs = [(40, 1)] + [(past + len(t) + 1, len(t) + 1) for t, past in zip(trees, pasts)] \
        + [(30, 6)]
    q, kc, vc, meta, tables = make_batch(seqs, *heads, head_dim, 16, dtype, None, seed)
    holes = [0]
    for t in trees:
        holes += tree_holes(t)
    holes += [0] * 6
    meta = dataclasses.replace(meta, attn_holes=torch.tensor(holes, dtype=torch.int64),
                               attn_holes_host=holes)
    return q, kc, vc, meta, tables


def test_tree_holes_hide_exactly_the_non_ancestors() -> None:
    holes = tree_holes([-1, -1, 0, 1])  # root r; a, b children of r; c under a; d under b
    # rows: r, a, b, c, d; bit j hides the key j rows back
    assert holes == [0, 0, 0b10, 0b10, 0b1010]


@pytest.mark.parametrize(("dtype", "heads"), [(torch.float32, (8, 2)), (torch.bfloat16, (9, 3))])
def test_reference_tree_masks(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    q, kc, vc, meta, tables = batch_with_trees(TREES, [20, 3, 45], heads, 64, dtype, seed=2)
    ref = naive_attention(q, kc, vc, meta, tables, 0.125)
    assert_close(paged_attention_reference(q, kc, vc, meta, 0.125), ref, dtype, "reference")
    assert_close(paged_attention(q, kc, vc, meta, 0.125), ref, dtype, "op")
    # the holes matter: without them the tree rows come out different
    plain = paged_attention_reference(q, kc, vc, dataclasses.replace(
        meta, attn_holes=None, attn_holes_host=None, _plan=None), 0.125)
    assert not torch.allclose(plain.double(), ref, atol=1e-2)


@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, 64), (torch.bfloat16, 64),
                                                 (torch.float32, 40)])
def test_c_kernel_rows_with_holes(dtype: torch.dtype, head_dim: int) -> None:
    """As the fused layer runs a step: every query token is a row of its own with its own
    length (past + index + 1) and holes."""
    from kernels import cpu_paged_attention as cpu

    q, kc, vc, meta, tables = batch_with_trees(TREES, [20, 3, 45], (9, 3), head_dim, dtype,
                                               seed=5)
    assert cpu.supports(q, kc, 16), "the C kernel did not build on this machine"
    qs, lens = meta.query_start_host, meta.seq_lens_host
    owner = [i for i in range(len(lens)) for _ in range(qs[i + 1] - qs[i])]
    row_lens = [lens[i] - (qs[i + 1] - qs[i]) + (r - qs[i]) + 1 for r, i in enumerate(owner)]
    n = len(owner)
    out = torch.full_like(q, float("nan"))
    cpu.paged_decode_attention_cpu(
        q, kc, vc, meta.block_tables.index_select(0, torch.tensor(owner)).contiguous(),
        torch.tensor(row_lens, dtype=torch.int32), torch.arange(n, dtype=torch.int32),
        torch.arange(n, dtype=torch.int32), out, head_dim ** -0.5, None, meta.attn_holes)
    ref = naive_attention(q, kc, vc, meta, tables, head_dim ** -0.5)
    assert_close(out, ref, dtype, "cpu kernel with holes")


def test_triton_prefill_kernel_tree_masks(kernel_module, device) -> None:
    mod = kernel_module("kernels.triton_paged_attention")
    q, kc, vc, meta, tables = batch_with_trees(TREES, [20, 3, 45], (8, 2), 64, torch.float32,
                                               seed=7)
    q2, kc2, vc2, meta2 = to(device, q, kc, vc, meta)
    meta2 = dataclasses.replace(meta2, attn_holes=meta.attn_holes.to(device))
    out = mod.paged_attention_triton(q2, kc2, vc2, meta2, 0.125).cpu()
    assert_close(out, naive_attention(q, kc, vc, meta, tables, 0.125), torch.float32,
                 "triton with holes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_kernel_tree_row_is_bitwise_its_chain(dtype: torch.dtype) -> None:
    """A tree token's attention equals, bit for bit, that of the same token at the end of the
    chain of its ancestors: the kernel walks visible keys in order, so chunks and summation
    order are the chain's. This is what makes tree verification reproduce greedy decoding in
    bf16, as chain verification does."""
    from kernels import cpu_paged_attention as cpu

    parents = [-1, -1, 0, 1, 2, 3, -1, 6, 4, 8, 9, 10, 7]
    past, bs, heads, d = 37, 16, (9, 3), 64
    n = past + 1 + len(parents)
    gen = torch.Generator().manual_seed(4)
    pages = -(-n // bs)
    kc = torch.randn(pages, bs, heads[1], d, generator=gen).to(dtype)
    vc = torch.randn(pages, bs, heads[1], d, generator=gen).to(dtype)
    table = torch.arange(pages, dtype=torch.int32)[None]
    holes = tree_holes(parents)
    for node in (len(parents) - 1, 9, 5):
        row = node + 1  # row 0 is the root
        q = torch.randn(1, heads[0], d, generator=gen).to(dtype)
        out_tree = torch.empty_like(q)
        cpu.paged_decode_attention_cpu(
            q, kc, vc, table, torch.tensor([past + row + 1], dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), out_tree,
            d ** -0.5, None, torch.tensor([holes[row]], dtype=torch.int64))
        # the chain: the past and root, then the ancestors and the token itself, contiguous
        branch, a = [], node
        while a >= 0:
            branch.append(a)
            a = parents[a]
        keep = list(range(past + 1)) + [past + 1 + b for b in reversed(branch)]
        kc2, vc2 = (c.view(-1, heads[1], d)[keep] for c in (kc, vc))
        pad = pages * bs - len(keep)
        kc2, vc2 = (torch.cat((c, c[:1].expand(pad, -1, -1))).view(pages, bs, heads[1], d)
                    for c in (kc2, vc2))
        out_chain = torch.empty_like(q)
        cpu.paged_decode_attention_cpu(
            q, kc2.contiguous(), vc2.contiguous(), table,
            torch.tensor([len(keep)], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), out_chain, d ** -0.5, None)
        assert torch.equal(out_tree, out_chain), f"token {node}"
