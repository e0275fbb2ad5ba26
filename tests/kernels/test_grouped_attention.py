"""The bf16 decode kernel for rows that share a sequence's pages (kernels/csrc/grouped_attention.c,
reached through `paged_decode_attention_cpu` on CPUs with AVX512-BF16): several rows of one
sequence in a call (a verify, a token tree) must each come out bit for bit as that row alone,
whatever the grouping, the thread count and the buffers it needs, and close to a float64 softmax.
Where the kernel does not build, the same checks hold for the row-by-row kernel."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kcheck import assert_close
from worker.spec.tree import tree_holes

BS = 16


def cpu():
    from kernels import cpu_paged_attention

    return cpu_paged_attention


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: list[list[int]],
           lens: list[int], holes: list[int] | None = None) -> torch.Tensor:
    """One call, row i with its own page table, length and holes."""
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    n = len(lens)
    out = torch.full_like(q[:n], float("nan"))
    rows = torch.arange(n, dtype=torch.int32)
    cpu().paged_decode_attention_cpu(
        q[:n], kc, vc, table, torch.tensor(lens, dtype=torch.int32), rows, rows, out,
        q.shape[-1] ** -0.5, None, None if holes is None else torch.tensor(holes, dtype=torch.int64))
    return out


def naive(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: list[list[int]],
          lens: list[int], holes: list[int] | None = None) -> torch.Tensor:
    rep = q.shape[1] // kc.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, (table, n) in enumerate(zip(tables, lens)):
        k = torch.stack([kc[table[p // BS], p % BS] for p in range(n)]).double()
        v = torch.stack([vc[table[p // BS], p % BS] for p in range(n)]).double()
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("hd,lhd->hl", q[i].double(), k) * q.shape[-1] ** -0.5
        h = holes[i] if holes else 0
        hidden = [0 < n - 1 - c < 64 and bool(h >> (n - 1 - c) & 1) for c in range(n)]
        s[:, torch.tensor(hidden)] = float("-inf")
        out[i] = torch.einsum("hl,lhd->hd", s.softmax(-1), v)
    return out


def pages(num: int, heads: tuple[int, int], d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(num, BS, heads[1], d, generator=gen).bfloat16()
    vc = torch.randn(num, BS, heads[1], d, generator=gen).bfloat16()
    order = torch.randperm(num, generator=gen).tolist()  # scattered pages
    return kc, vc, order, gen


@pytest.mark.parametrize(("head_dim", "heads"), [(64, (9, 3)), (128, (8, 2)), (32, (4, 4)),
                                                 (64, (8, 1))])
def test_tree_rows_together_equal_each_alone(head_dim: int, heads: tuple[int, int]) -> None:
    parents = [-1, -1, 0, 1, 2, 3, -1, 6, 4, 8, 9, 10, 7, 0, 13]
    past = 150
    n = past + 1 + len(parents)
    kc, vc, order, gen = pages(-(-n // BS) + 2, heads, head_dim, seed=head_dim)
    table = order[:-(-n // BS)]
    rows = len(parents) + 1  # the root, then the tree
    lens = [past + 1 + r for r in range(rows)]
    holes = tree_holes(parents)
    q = torch.randn(rows, heads[0], head_dim, generator=gen).bfloat16()
    together = attend(q, kc, vc, [table] * rows, lens, holes)
    assert_close(together, naive(q, kc, vc, [table] * rows, lens, holes), torch.bfloat16,
                 "tree rows in one call")
    for r in range(rows):
        alone = attend(q[r:r + 1], kc, vc, [table], [lens[r]], [holes[r]])
        assert torch.equal(together[r], alone[0]), f"row {r}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one task per KV head instead of rows split across tasks
        assert torch.equal(attend(q, kc, vc, [table] * rows, lens, holes), together)
    finally:
        torch.set_num_threads(threads)


def test_long_context_group_beyond_the_stack_buffer() -> None:
    """16 rows x 3 query heads over ~700 keys need more score space than the kernel keeps on
    its stack: the heap path gives the same bits."""
    heads, d, past, rows = (9, 3), 64, 700, 16
    n = past + rows
    kc, vc, order, gen = pages(-(-n // BS) + 1, heads, d, seed=3)
    table = order[:-(-n // BS)]
    lens = [past + 1 + r for r in range(rows)]
    q = torch.randn(rows, heads[0], d, generator=gen).bfloat16()
    together = attend(q, kc, vc, [table] * rows, lens)
    assert_close(together, naive(q, kc, vc, [table] * rows, lens), torch.bfloat16, "long")
    for r in (0, 7, 15):
        assert torch.equal(together[r], attend(q[r:r + 1], kc, vc, [table], [lens[r]])[0])


def test_sequences_sharing_prefix_pages() -> None:
    """Prefix caching: sequences share their first pages and then differ. Rows whose pages
    agree over every key they read may be grouped, others must not be."""
    heads, d = (9, 3), 64
    kc, vc, order, gen = pages(12, heads, d, seed=5)
    shared = order[:2]
    a = [*shared, order[2]]           # 40 tokens
    b = [*shared, order[3]]           # 45 tokens: its third page differs from a's
    c = shared                        # 20 tokens: reads only the shared pages
    tables = [a, a, b, b, c, a]
    lens = [39, 40, 44, 45, 20, 33]
    q = torch.randn(len(lens), heads[0], d, generator=gen).bfloat16()
    out = attend(q, kc, vc, tables, lens)
    assert_close(out, naive(q, kc, vc, tables, lens), torch.bfloat16, "shared prefixes")
    for r in range(len(lens)):
        assert torch.equal(out[r], attend(q[r:r + 1], kc, vc, [tables[r]], [lens[r]])[0])


def test_tree_rows_in_one_call_equal_their_chains() -> None:
    """A tree token, verified among the other rows of its tree, equals bit for bit the same
    token at the end of the chain of its ancestors (as plain decoding computes it). A
    difference in the last fp32 bits only shows where it flips a bf16 rounding, so many
    queries are compared."""
    parents = [-1, -1, 0, 1, 2, 3, -1, 6, 4, 8, 9, 10, 7, 0, 13]
    past, heads, d, sets = 61, (9, 3), 64, 24
    n = past + 1 + len(parents)
    num = -(-n // BS)
    kc, vc, _, gen = pages(num, heads, d, seed=11)
    table = list(range(num))
    holes = tree_holes(parents)
    rows = len(parents) + 1
    q = torch.randn(sets * rows, heads[0], d, generator=gen).bfloat16()
    lens = [past + 1 + r for r in range(rows)] * sets
    tree = attend(q, kc, vc, [table] * len(lens), lens, holes * sets)
    for node in range(len(parents)):
        branch, a = [], node
        while a >= 0:
            branch.append(a)
            a = parents[a]
        keep = list(range(past + 1)) + [past + 1 + b for b in reversed(branch)]
        pad = num * BS - len(keep)
        kc2, vc2 = (torch.cat((c.view(-1, heads[1], d)[keep],
                               c.view(-1, heads[1], d)[:1].expand(pad, -1, -1)))
                    .view(num, BS, heads[1], d).contiguous() for c in (kc, vc))
        mine = q[node + 1::rows]
        chain = attend(mine, kc2, vc2, [table] * sets, [len(keep)] * sets)
        assert torch.equal(tree[node + 1::rows], chain), f"token {node}"


def test_a_batch_of_decodes_beyond_the_stack_tables() -> None:
    """70 sequences of one row each (more than the kernel keeps on its stack), lengths from a
    single key to a few pages, each row on its own pages."""
    heads, d, gen = (9, 3), 64, torch.Generator().manual_seed(8)
    lens = [1 + int(x) for x in torch.randint(0, 200, (70,), generator=gen)]
    need = [-(-n // BS) for n in lens]
    kc, vc, order, gen = pages(sum(need), heads, d, seed=9)
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    q = torch.randn(len(lens), heads[0], d, generator=gen).bfloat16()
    out = attend(q, kc, vc, tables, lens)
    assert_close(out, naive(q, kc, vc, tables, lens), torch.bfloat16, "70 decodes")
    for r in (0, 33, 69):
        assert torch.equal(out[r], attend(q[r:r + 1], kc, vc, [tables[r]], [lens[r]])[0])
