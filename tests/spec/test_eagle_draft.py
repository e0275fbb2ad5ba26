"""The one-call drafting kernel (kernels/csrc/eagle_draft.c) against the path it replaces: the
fused layer driven from Python, then the head's LM head, log_softmax and top-k in torch. Same
features, same pool contents, same top tokens."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_decode_layer as fused
from kernels.rmsnorm import rms_norm
from worker.spec.eagle_fused import BLOCK, FusedEagleLayer
from worker.spec.eagle_head import (
    DraftRequest,
    EagleHead,
    EagleHeadConfig,
    TorchEagleLayer,
    top_tokens,
)

DTYPES = [torch.float32, torch.bfloat16]


def make_head(dtype: torch.dtype) -> EagleHead:
    torch.manual_seed(0)
    cfg = EagleHeadConfig(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
                          head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                          vocab=tuple(range(3, 203)))
    head = EagleHead(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.2)
        head.input_norm.weight.fill_(1.0)
        head.post_attention_norm.weight.fill_(1.0)
        head.out_norm.weight.fill_(1.0)
    head = head.to(dtype).eval().requires_grad_(False)
    head.attach_target(torch.randn(300, 64).to(dtype), torch.randn(300, 64).to(dtype))
    head.fuse_for_drafting()
    return head


def python_path(layer: FusedEagleLayer, tokens, feats, positions, blocks, first_row, holes,
                scored, width):
    """What drafting did before the one-call kernel: the same kernels chained from Python
    (input fusion, the fused layer, the output norm), then the LM head and top-k in torch."""
    head, step, outs = layer.head, layer.max_rows, []
    for a in range(0, len(tokens), step):
        m = len(tokens[a:a + step])
        x = head.fuse_input(torch.tensor(tokens[a:a + step]), feats[a:a + step])
        rows = torch.arange(first_row + a, first_row + a + m)
        table = torch.tensor(blocks, dtype=torch.int32)
        slots = table[rows // BLOCK].to(torch.int64) * BLOCK + rows % BLOCK
        spec = fused.StepSpec(torch.tensor(positions[a:a + step]), slots, table.expand(m, -1),
                              (rows + 1).to(torch.int32), layer.spec,
                              None if holes is None else torch.tensor(holes[a:a + step]))
        out, residual = fused.run_layer(layer.spec, spec, x.contiguous(), None)
        outs.append(rms_norm(out + residual, head.out_norm.weight, head.out_norm.eps))
    g = torch.cat(outs)
    ids, logps = top_tokens(head, g[g.shape[0] - scored:], width) if scored else ([], [])
    return g, ids, logps


@pytest.mark.parametrize("dtype", DTYPES)
def test_draft_kernel_equals_the_python_path(dtype):
    if not fused.available(dtype):
        pytest.skip("the fused decode layer is not built for this dtype here")
    head = make_head(dtype)
    # pool and rotary table sized for calls of up to 512 rows (bf16 on AMX)
    ref, new = (FusedEagleLayer(head, 1 << 20, 2048) for _ in range(2))
    blocks_ref, blocks_new = ref.new_cache(), new.new_cache()
    # A catch-up longer than one kernel call (split in chunks), scoring its last row; then a
    # tree step of three rows with holes (each row sees the committed rows and itself only),
    # all scored; then a chain step.
    n = ref.max_rows + 5
    # Pages out of order, so that rows cross page boundaries through the table.
    for layer, blocks in ((ref, blocks_ref), (new, blocks_new)):
        layer.free_blocks.reverse()
        assert layer.reserve(blocks, n + 8)
    gen = torch.Generator().manual_seed(1)
    calls = [
        (torch.randint(0, 300, (n,), generator=gen).tolist(), list(range(n)), 0, None, 1, 3),
        ([7, 250, 11], [n] * 3, n, [0, 0b10, 0b110], 3, 3),
        ([42], [n + 1], n + 1, None, 1, 1),
    ]
    for tokens, positions, first_row, holes, scored, width in calls:
        feats = torch.randn(len(tokens), 64, generator=gen).to(dtype)
        g_ref, ids_ref, lp_ref = python_path(ref, tokens, feats, positions, blocks_ref,
                                             first_row, holes, scored, width)
        g, ids, lps = new.draft(tokens, feats, positions, blocks_new, first_row, holes,
                                scored, width)
        exact = dtype == torch.bfloat16  # the same kernels and rounding points; fp32 fc is torch's
        tol = {"atol": 0, "rtol": 0} if exact else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(g, g_ref, **tol)
        assert ids == ids_ref
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(lp_ref), atol=1e-4, rtol=0)
        assert len(ids) == scored and all(len(r) == width for r in ids)
    torch.testing.assert_close(new.k_cache, ref.k_cache, **tol)
    torch.testing.assert_close(new.v_cache, ref.v_cache, **tol)
    assert new.k_cache.abs().sum() > 0  # rows were stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batched_call_equals_one_call_per_sequence(dtype):
    """Rows of several sequences in one call (a batch's catch-ups, then its tree depths) give
    each sequence exactly what it gets drafting alone: same features, same pool contents,
    same top tokens. One request is longer than the room left in a call, so it continues in
    the next, attending to its rows already stored."""
    if not fused.available(dtype):
        pytest.skip("the fused decode layer is not built for this dtype here")
    head = make_head(dtype)
    alone, batched = (FusedEagleLayer(head, 1 << 20, 2048) for _ in range(2))
    gen = torch.Generator().manual_seed(2)
    lengths = [3, alone.max_rows - 2, 6]  # the second spills over into a second call
    caches = {id(layer): [layer.new_cache() for _ in lengths] for layer in (alone, batched)}
    for layer in (alone, batched):
        layer.free_blocks.reverse()
        for blocks, n in zip(caches[id(layer)], lengths):
            assert layer.reserve(blocks, n + 8)
    catch_up = [(torch.randint(0, 300, (n,), generator=gen).tolist(), list(range(n)), 0, None,
                 1, 2, torch.randn(n, 64, generator=gen).to(dtype)) for n in lengths]
    # then a depth of a tree (holes: each row sees the committed rows and itself), unscored
    # for the middle sequence
    depth = [([7 + i, 250 - i], [n, n], n, [0, 0b10], 2 - (i == 1), 2,
              torch.randn(2, 64, generator=gen).to(dtype)) for i, n in enumerate(lengths)]
    for calls in (catch_up, depth):
        want = [alone.draft(t, f, pos, blocks, row, holes, scored, width)
                for (t, pos, row, holes, scored, width, f), blocks
                in zip(calls, caches[id(alone)])]
        got = batched.draft_batch([
            DraftRequest(t, f, pos, blocks, row, holes, scored, width)
            for (t, pos, row, holes, scored, width, f), blocks
            in zip(calls, caches[id(batched)])])
        for (g, ids, lps), (g_ref, ids_ref, lps_ref) in zip(got, want):
            torch.testing.assert_close(g, g_ref, atol=0, rtol=0)
            assert ids == ids_ref and lps == lps_ref
    for a, b in zip(caches[id(alone)], caches[id(batched)]):
        for x, y in zip(alone.read(a, max(lengths) + 2), batched.read(b, max(lengths) + 2)):
            torch.testing.assert_close(y, x, atol=0, rtol=0)


def test_torch_layer_drafts_alike():
    """TorchEagleLayer.draft (CUDA, CPUs without the fused layer) gives the same guesses."""
    head = make_head(torch.float32)
    torch_layer = TorchEagleLayer(head)
    cache = torch_layer.new_cache()
    tokens, positions = [5, 9, 120, 33], [0, 1, 2, 3]
    feats = torch.randn(4, 64)
    g, ids, lps = torch_layer.draft(tokens, feats, positions, cache, 0, None, 2, 4)
    g_ref, _, _ = head.layer(torch.tensor(tokens)[None], feats[None], torch.arange(4))
    torch.testing.assert_close(g, g_ref[0], atol=1e-5, rtol=1e-5)
    ref_ids, ref_lps = top_tokens(head, g_ref[0, 2:], 4)
    assert ids == ref_ids and len(ids) == 2
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-5, rtol=0)
    assert torch_layer.draft(tokens, feats, positions, cache, 0)[1:] == ([], [])


def test_pending_features_are_bounded_and_counted():
    """Steps that do not speculate still hand the head their features; a sequence keeps at most
    max_pending rows of them (the oldest go: the head's cache then lacks those positions), and
    the count is kept as they come rather than summed at every step."""
    from types import SimpleNamespace

    from worker.spec.eagle_proposer import EagleProposer

    head = make_head(torch.float32)
    prop = EagleProposer(head, max_pending=5, layer=TorchEagleLayer(head))
    seq = SimpleNamespace(request_id="a")
    hidden = torch.randn(2, 64)
    for step in range(7):  # rows 0-1 of every step: a sequence of two rows, then nothing
        plan = SimpleNamespace(query_start=[0, 1 + step % 2], positions=[10 + step, 11 + step])
        prop.observe([seq], plan, hidden)
    st = prop._states["a"]
    assert st.pending_rows == sum(len(r) for _, r in st.pending) <= 5
    assert [first for first, _ in st.pending] == [14, 15, 16]  # the latest steps, 4 rows
    assert st.pending_rows == 4


def test_draft_call_refuses_what_would_read_out_of_bounds():
    """The kernel reads and writes where it is pointed: bad ids, positions or pages are
    refused before it runs."""
    if not fused.available(torch.float32):
        pytest.skip("the fused decode layer is not built here")
    head = make_head(torch.float32)
    layer = FusedEagleLayer(head, 1 << 14, 64)  # 8 pages of 16 rows
    blocks = layer.new_cache()
    assert layer.reserve(blocks, 16)
    feat = torch.randn(1, 64)
    ok = layer.draft([5], feat, [3], blocks, 0, scored=1, width=2)
    assert len(ok[1]) == 1
    for tokens, positions, table, first_row, what in (
            ([300], [3], blocks, 0, "token ids"), ([5], [64], blocks, 0, "positions"),
            ([5], [3], blocks, 16, "pages"), ([5], [3], [99], 0, "pages")):
        with pytest.raises(ValueError, match=what):
            layer.draft(tokens, feat, positions, table, first_row, scored=1, width=2)
