"""Paged attention over a flattened, unpadded batch that mixes prefill chunks and decodes.

Sequence i contributes query tokens [query_start[i], query_start[i+1]) that sit at the last
query_len positions of its context of seq_lens[i] tokens; their K/V have already been stored in
the paged cache. Each query attends causally to its paged past plus itself (and only to the last
`sliding_window` positions when a window is set: key j is visible from query p when
p - window < j <= p, as in Hugging Face's Mistral).

Tree attention (verifying a token tree in one forward, worker/spec/tree.py): a sequence's query
tokens are its tree's nodes in an order where parents come first, and each must see only its
ancestors among them. `attn_holes[t]` (int64 per query token, 0 = plain causal) hides keys from
token t: bit j hides the key j places before t's own, counted in the sequence's KV order (the
token's own key is j = 0; keys more than 63 back are always visible). Holes count KV order, not
positions: a tree's siblings share a position.

On CPU, decode rows go to a C kernel that reads the pages in place (kernels/cpu_paged_attention.py,
proven against the reference). Prefill chunks without a cached past share batched causal SDPA
calls, right-padded to the longest of a batch (a padded key sits after every real query, so the
causal mask alone hides it); the others run one SDPA each. The reference is still the
fallback CPU path, so it is written for speed too: decodes are batched into one gathered SDPA call. Gather indices and masks depend only on
the step, not on the layer, so they are built once per step (`AttentionMetadata.reference_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import cpu_paged_attention
from kernels._dispatch import use_triton


@dataclass
class AttentionMetadata:
    query_start: torch.Tensor  # [B + 1] int32, on the compute device
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    block_size: int
    max_query_len: int
    max_seq_len: int
    # Host copies, so that the CPU reference never reads a device tensor back.
    query_start_host: list[int]
    seq_lens_host: list[int]
    sliding_window: int | None = None
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache row of each new token (-1: skip)
    attn_holes: torch.Tensor | None = None  # [T] int64 tree masks (see above); None: causal
    attn_holes_host: list[int] | None = None
    _plan: _ReferencePlan | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    def reference_plan(self) -> _ReferencePlan:
        if self._plan is None:
            self._plan = _ReferencePlan.build(self)
        return self._plan


@dataclass
class _PrefillChunk:
    q_start: int
    q_end: int
    slots: torch.Tensor  # [L] flat cache rows of the context
    # [q_len, L] bool, True = attend. None: causal without a window, computed as a maskless
    # pass over the cached past merged with a causal pass over the chunk itself, because
    # SDPA's explicit-mask path on CPU is ~8x slower than its fused causal kernel.
    mask: torch.Tensor | None
    past_len: int


@dataclass
class _FreshBatch:
    """Prefill chunks with no cached past, run as one causal SDPA over [B, H, q_len, D]."""

    batch: int
    q_len: int  # the longest chunk's; shorter ones are right-padded
    q_rows: torch.Tensor  # [B * q_len] query row of each padded position (pads repeat a row)
    slots: torch.Tensor  # [B * q_len] cache row of each padded position (pads: any real row)
    # Where real positions go: out rows, and their index among the padded ones (None: no pads).
    out_rows: torch.Tensor
    real: torch.Tensor | None


# Padding a batch of fresh chunks costs compute on pad rows; past this share, split the batch.
_MAX_PAD_FACTOR = 1.25


def _fresh_batches(chunks: list[_PrefillChunk], device: torch.device
                   ) -> tuple[list[_FreshBatch], list[_PrefillChunk]]:
    """Groups causal chunks without a past or window mask, longest first, into batches padded
    by at most _MAX_PAD_FACTOR; returns them and the chunks left to run alone."""
    fresh: list[_PrefillChunk] = []
    alone: list[_PrefillChunk] = []
    for c in chunks:
        (fresh if c.mask is None and c.past_len == 0 else alone).append(c)
    fresh.sort(key=lambda c: c.q_end - c.q_start, reverse=True)
    groups: list[list[_PrefillChunk]] = []
    for c in fresh:
        n = c.q_end - c.q_start
        g = groups[-1] if groups else None
        if g is not None:
            longest = g[0].q_end - g[0].q_start
            real = sum(x.q_end - x.q_start for x in g) + n
            if longest * (len(g) + 1) <= _MAX_PAD_FACTOR * real:
                g.append(c)
                continue
        groups.append([c])
    batches = []
    for g in groups:
        if len(g) == 1:
            alone.append(g[0])
            continue
        q_len = g[0].q_end - g[0].q_start
        q_rows, slots, out_rows, real = [], [], [], []
        for b, c in enumerate(g):
            n = c.q_end - c.q_start
            rows = list(range(c.q_start, c.q_end))
            q_rows += rows + [c.q_start] * (q_len - n)
            slots.append(c.slots)
            if q_len > n:
                slots.append(c.slots[:1].expand(q_len - n))
            out_rows += rows
            real += range(b * q_len, b * q_len + n)
        padded = len(out_rows) < len(q_rows)
        batches.append(_FreshBatch(
            len(g), q_len, torch.tensor(q_rows, device=device), torch.cat(slots),
            torch.tensor(out_rows, device=device),
            torch.tensor(real, device=device) if padded else None))
    return batches, alone


def _tree_mask(holes: list[int], ctx: int, device: torch.device) -> torch.Tensor:
    """[q_len, ctx] bool, True = attend: causal over the last q_len keys, minus the holes."""
    q_len = len(holes)
    pos = torch.arange(ctx, device=device)
    last = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)  # each query's own key
    back = last - pos.unsqueeze(0)
    bits = torch.tensor(holes, dtype=torch.int64, device=device).unsqueeze(1)
    hidden = (back < 64) & (back >= 0) & ((bits >> back.clamp(0, 63)) & 1).bool()
    return (back >= 0) & ~hidden


@dataclass
class _DecodeGather:
    # [Bd, max_blocks] cache blocks of each decode. Whole blocks are gathered (contiguous
    # block_size * Hkv * D runs) rather than single token rows: ~20% faster attention on CPU.
    blocks: torch.Tensor
    mask: torch.Tensor  # [Bd, 1, 1, max_blocks * block_size] bool


@dataclass
class _ReferencePlan:
    decode_rows: list[int]  # sequences with one query token
    decode_token_idx: torch.Tensor | None  # [Bd] int32 flat query rows of the decodes
    decode_seq_ids: torch.Tensor | None  # [Bd] int32
    all_decode: bool
    chunks: list[_PrefillChunk]
    _gather: _DecodeGather | None = field(default=None, repr=False)
    _fresh: tuple[list[_FreshBatch], list[_PrefillChunk]] | None = field(default=None,
                                                                         repr=False)

    def fresh_batches(self, device: torch.device) -> tuple[list[_FreshBatch], list[_PrefillChunk]]:
        if self._fresh is None:
            self._fresh = _fresh_batches(self.chunks, device)
        return self._fresh

    @staticmethod
    def build(meta: AttentionMetadata) -> _ReferencePlan:
        device = meta.block_tables.device
        bs = meta.block_size
        window = meta.sliding_window
        qs, sl = meta.query_start_host, meta.seq_lens_host
        decode_rows = [i for i in range(len(sl)) if qs[i + 1] - qs[i] == 1]
        holes = meta.attn_holes_host
        assert holes is None or not any(holes[qs[i]] for i in decode_rows), \
            "tree masks are for sequences with several query tokens"
        token_idx = seq_ids = None
        if decode_rows:
            token_idx = torch.tensor([qs[i] for i in decode_rows], dtype=torch.int32,
                                     device=device)
            seq_ids = torch.tensor(decode_rows, dtype=torch.int32, device=device)
        chunks: list[_PrefillChunk] = []
        for i in range(len(sl)):
            q_len = qs[i + 1] - qs[i]
            if q_len == 1:
                continue
            ctx = sl[i]
            pos = torch.arange(ctx, device=device)
            table = meta.block_tables[i].long()
            slots = table[pos // bs] * bs + pos % bs
            mask = None
            if window is not None and window < ctx:
                q_pos = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)
                mask = (pos.unsqueeze(0) <= q_pos) & (pos.unsqueeze(0) > q_pos - window)
            if holes is not None and any(holes[qs[i]:qs[i + 1]]):
                tree = _tree_mask(holes[qs[i]:qs[i + 1]], ctx, device)
                mask = tree if mask is None else mask & tree
            chunks.append(_PrefillChunk(qs[i], qs[i + 1], slots, mask, ctx - q_len))
        return _ReferencePlan(decode_rows, token_idx, seq_ids, len(decode_rows) == len(sl),
                              chunks)

    def decode_gather(self, meta: AttentionMetadata) -> _DecodeGather:
        if self._gather is None:
            assert self.decode_seq_ids is not None
            bs, window = meta.block_size, meta.sliding_window
            rows = self.decode_seq_ids.long()
            lens = meta.seq_lens.index_select(0, rows).long()
            num_blocks = -(-max(meta.seq_lens_host[i] for i in self.decode_rows) // bs)
            # Table padding points at block 0: real memory, masked out below.
            blocks = meta.block_tables.index_select(0, rows)[:, :num_blocks].long()
            pos = torch.arange(num_blocks * bs, device=blocks.device)
            valid = pos.unsqueeze(0) < lens.unsqueeze(1)
            if window is not None:
                valid &= pos.unsqueeze(0) > (lens.unsqueeze(1) - 1 - window)
            self._gather = _DecodeGather(blocks, valid[:, None, None, :])
        return self._gather


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    plan = meta.reference_plan()
    out = query.new_empty(query.shape)
    if plan.decode_rows:
        o = _reference_decodes(query, k_cache, v_cache, meta, scale)
        if plan.all_decode:
            return o
        out.index_copy_(0, plan.decode_token_idx.long(), o)
    _reference_chunks(query, k_cache, v_cache, plan, scale, out)
    return out


def _reference_decodes(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """[Bd, Hq, D]: all decode rows in one gathered SDPA call."""
    plan = meta.reference_plan()
    gather = plan.decode_gather(meta)
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], k_cache.shape[2]
    bd, lmax = gather.blocks.shape[0], gather.mask.shape[-1]
    q = query if plan.all_decode else query.index_select(0, plan.decode_token_idx.long())
    blocks = gather.blocks.view(-1)
    k = k_cache.index_select(0, blocks).view(bd, lmax, num_kv_heads, head_dim)
    v = v_cache.index_select(0, blocks).view(bd, lmax, num_kv_heads, head_dim)
    return F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [Bd, Hq, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=gather.mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).squeeze(2)


def _reference_chunks(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      plan: _ReferencePlan, scale: float, out: torch.Tensor) -> None:
    """Prefill chunks, written into their rows of `out`: fresh ones in batched SDPA calls,
    the others one SDPA each."""
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], k_cache.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    batches, alone = plan.fresh_batches(query.device)
    for fb in batches:
        shape = (fb.batch, fb.q_len, -1, head_dim)
        q = query.index_select(0, fb.q_rows).view(shape).transpose(1, 2)  # [B, Hq, L, D]
        k = _expand_heads_batched(k_flat.index_select(0, fb.slots).view(shape), num_heads)
        v = _expand_heads_batched(v_flat.index_select(0, fb.slots).view(shape), num_heads)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        o = o.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B * L, Hq, D]
        out.index_copy_(0, fb.out_rows, o if fb.real is None else o.index_select(0, fb.real))
    for c in alone:
        q = query[c.q_start:c.q_end].transpose(0, 1)  # [Hq, q_len, D]
        # Expanding KV heads beats enable_gqa here: in bf16 enable_gqa leaves the fused kernel.
        k = _expand_heads(k_flat.index_select(0, c.slots), num_heads)  # [Hq, L, D]
        v = _expand_heads(v_flat.index_select(0, c.slots), num_heads)
        # 4-D inputs: with 3-D ones SDPA on CPU silently takes its slow math path.
        if c.mask is not None:
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=c.mask,
                                               scale=scale)[0]
        elif c.past_len == 0:
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                               scale=scale)[0]
        else:
            o = _past_plus_causal(q, k, v, c.past_len, scale)
        out[c.q_start:c.q_end] = o.transpose(0, 1)


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[L, Hkv, D] -> [Hq, L, D], each KV head repeated for its query-head group."""
    return _expand_heads_batched(x.unsqueeze(0), num_heads).squeeze(0)


def _expand_heads_batched(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, Hkv, D] -> [B, Hq, L, D], each KV head repeated for its query-head group."""
    batch, length, num_kv_heads, head_dim = x.shape
    x = x.transpose(1, 2)
    if num_kv_heads == num_heads:
        return x
    group = num_heads // num_kv_heads
    return x.unsqueeze(2).expand(batch, num_kv_heads, group, length, head_dim).reshape(
        batch, num_heads, length, head_dim)


def _past_plus_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                      scale: float) -> torch.Tensor:
    """Attention of a chunk to [cached past | itself], as two fused passes merged exactly.

    softmax over the union = the two partial results weighted by exp(lse_part - lse_total)
    (the flash-attention / cascade-attention merge), where lse is each pass's log-sum-exp.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or q.device.type != "cpu":
        q_len, ctx = q.shape[1], k.shape[1]
        pos = torch.arange(ctx, device=q.device)
        mask = pos.unsqueeze(0) <= torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                              scale=scale)[0]
    o1, l1 = flash(q.unsqueeze(0), k[:, :past].unsqueeze(0), v[:, :past].unsqueeze(0), 0.0,
                   False, scale=scale)[:2]
    o2, l2 = flash(q.unsqueeze(0), k[:, past:].unsqueeze(0), v[:, past:].unsqueeze(0), 0.0,
                   True, scale=scale)[:2]
    lse = torch.logaddexp(l1, l2)
    w1 = (l1 - lse).exp().unsqueeze(-1)
    w2 = (l2 - lse).exp().unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(q.dtype).squeeze(0)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if use_triton(query):
        from kernels.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(query, k_cache, v_cache, meta, scale)
    plan = meta.reference_plan()
    if plan.decode_rows and cpu_paged_attention.supports(query, k_cache, meta.block_size):
        out = query.new_empty(query.shape)
        cpu_paged_attention.paged_decode_attention_cpu(
            query, k_cache, v_cache, meta.block_tables, meta.seq_lens, plan.decode_token_idx,
            plan.decode_seq_ids, out, scale, meta.sliding_window)
        _reference_chunks(query, k_cache, v_cache, plan, scale, out)
        return out
    return paged_attention_reference(query, k_cache, v_cache, meta, scale)
