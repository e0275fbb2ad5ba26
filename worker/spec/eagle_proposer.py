"""EagleProposer: drafts from the target's own last hidden states (worker/spec/eagle_head.py).

The target's forward already computes, for every position it scores, the feature EAGLE needs:
the engine hands each step's final hidden states to `observe`. Per sequence the proposer keeps
the head's KV cache over committed positions, each computed from the target's true feature; at
`propose` it first catches up on the positions committed since (at most k+1 after a verify, the
prompt after a prefill), then rolls out: each draft token's feature guess is fed back in for the
next, in a scratch extension of the cache that is never kept. So rollback and on_accept have
nothing to undo: the next catch-up starts from committed tokens and true features only.

Positions whose features the proposer never saw (a prefix-cache hit, steps too large to
speculate) are simply absent from the head's cache: drafts get worse there, never wrong, since
the target verifies every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos.messages import StepPlan
from worker.sequence import Sequence
from worker.spec.eagle_fused import FusedEagleLayer
from worker.spec.eagle_head import EagleHead
from worker.spec.proposer import NO_PROPOSAL, NgramProposer, Proposal, Proposer

_CACHE_START = 256  # rows of head KV first allocated per sequence (doubled as needed)


@dataclass
class _EagleState:
    keys: torch.Tensor
    values: torch.Tensor
    rows: int = 0  # valid rows in keys/values
    done: int = 0  # next position to process (all before it were processed or skipped)
    last: torch.Tensor | None = None  # the head's feature guess at position done-1
    blocks: list[int] = field(default_factory=list)  # the fused layer's KV pages
    # Observed target features not yet used: (position of the first row, rows).
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class EagleProposer(Proposer):
    """Greedy rollout of an EAGLE head; stops when the head's own confidence says the rest is
    unlikely to be accepted (the product of its top probabilities falls below
    `min_confidence`, as EAGLE-2 uses the draft's confidence to estimate acceptance).

    With `ngram`, the n-gram lookup is asked first and its proposal is taken when it runs to
    at least `ngram_min_tokens` tokens: where the output copies its context (quotes, lists,
    code, loops) a matched n-gram is right more often and runs longer than the head's guess,
    and it costs nothing. The head catches up on the skipped positions the next time it
    drafts, in one call."""

    name = "eagle"
    wants_features = True

    def __init__(self, head: EagleHead, *, min_confidence: float = 0.3,
                 max_batch_size: int = 8, max_pending: int = 4096,
                 ngram: NgramProposer | None = None, ngram_min_tokens: int = 2,
                 fused: FusedEagleLayer | None = None) -> None:
        self.head = head.eval()
        self.fused = fused  # the C layer over its own KV pool; None: torch ops, KV per sequence
        self.ngram = ngram
        self.ngram_min_tokens = ngram_min_tokens
        self.proposals = {"head": 0, "ngram": 0}  # non-empty proposals by source
        self.min_confidence = min_confidence
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        p = next(iter(head.parameters()))
        self._dtype, self._device = p.dtype, p.device
        # on the head's device, as are the positions and tokens it is given (CUDA included)
        self._to_target = torch.tensor(head.cfg.vocab, dtype=torch.int64, device=p.device)
        self.max_position = fused.max_position if fused is not None else 1 << 62
        self._states: dict[str, _EagleState] = {}

    # -- features from the target -------------------------------------------------------------

    def observe(self, seqs: list[Sequence], plan: StepPlan, hidden: torch.Tensor) -> None:
        if len(seqs) > self.max_batch_size:
            return  # nothing speculates in such steps; the head skips these positions
        qs = plan.query_start
        for i, seq in enumerate(seqs):
            a, b = qs[i], qs[i + 1]
            if b <= a:
                continue
            st = self._state(seq)
            st.pending.append((plan.positions[a], hidden[a:b].to(self._dtype)))
            while sum(len(r) for _, r in st.pending) > self.max_pending:
                st.pending.pop(0)

    # -- proposals ---------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        return [self._propose(seq, k) for seq, k in zip(seqs, ks)]

    def _propose(self, seq: Sequence, k: int) -> Proposal:
        if self.ngram is not None and k > 0:
            tokens = self.ngram.model_for(seq).rollout(seq.token_ids, k)
            if len(tokens) >= self.ngram_min_tokens:
                self.proposals["ngram"] += 1
                return Proposal(tokens)
        st = self._state(seq)
        last = self._catch_up(seq, st)
        if last is None or k <= 0:
            return NO_PROPOSAL
        head = self.head
        if self.fused is not None and not self.fused.reserve(st.blocks, st.rows + k):
            return NO_PROPOSAL  # the head's KV pool is full: no scratch rows for a rollout
        keys, values = st.keys[:, :st.rows], st.values[:, :st.rows]
        feat, pos = last, seq.num_tokens - 1
        out: list[int] = []
        chance = 1.0
        while True:
            probs = torch.softmax(head.logits(feat).float(), dim=-1)
            conf, idx = probs.max(dim=-1)
            chance *= float(conf)
            if chance < self.min_confidence and out:
                break
            token = self._to_target[idx]
            out.append(int(token))
            if len(out) >= k or pos + 1 >= self.max_position:
                break
            pos += 1
            if self.fused is not None:  # scratch rows after the committed ones
                g = self.fused.layer(token.view(1), feat.view(1, -1),
                                     torch.tensor([pos], device=self._device),
                                     st.blocks, st.rows + len(out) - 1)
            else:
                g, k_new, v_new = head.layer(token.view(1), feat.view(1, -1),
                                             torch.tensor([pos], device=self._device),
                                             cache=(keys, values))
                keys, values = torch.cat((keys, k_new), 1), torch.cat((values, v_new), 1)
            feat = g[0]
        self.proposals["head"] += 1
        return Proposal(out)

    def _catch_up(self, seq: Sequence, st: _EagleState) -> torch.Tensor | None:
        """Runs the head over committed positions it has target features for; returns its
        feature guess at the last committed position (None if it has none)."""
        n = seq.num_tokens  # positions 0..n-1 are committed; position p needs feature p-1
        parts: list[tuple[int, torch.Tensor]] = []  # (first position, features before each)
        nxt = st.done
        if nxt == 0 and n > 0:  # no feature before position 0: the head was trained on zeros
            d = self.head.cfg.hidden_size
            parts.append((0, torch.zeros(1, d, dtype=self._dtype, device=self._device)))
            nxt = 1
        for first, rows in sorted(st.pending, key=lambda e: e[0]):
            # rows[j] is the target's feature at position first+j, the input of first+j+1; rows
            # past the committed tokens scored rejected proposals and are dropped
            lo, hi = max(nxt - 1 - first, 0), min(len(rows), n - 1 - first)
            if hi > lo:
                parts.append((first + lo + 1, rows[lo:hi]))
                nxt = first + hi + 1
        st.pending.clear()
        if not parts:
            return st.last if st.done == n else None
        positions = torch.cat([torch.arange(p, p + len(r)) for p, r in parts])
        if int(positions[-1]) >= self.max_position:
            return None
        tokens = torch.tensor(seq.token_ids, dtype=torch.int64).index_select(0, positions)
        positions, tokens = positions.to(self._device), tokens.to(self._device)
        feats = torch.cat([r for _, r in parts])
        if self.fused is not None:
            if not self.fused.reserve(st.blocks, st.rows + len(positions)):
                return None  # pool full: these positions stay missing from the head's cache
            g = self.fused.layer(tokens, feats, positions, st.blocks, st.rows)
            st.rows += len(positions)
        else:
            g, k_new, v_new = self.head.layer(
                tokens, feats, positions, cache=(st.keys[:, :st.rows], st.values[:, :st.rows]))
            self._append(st, k_new, v_new)
        st.done = nxt
        st.last = g[-1] if int(positions[-1]) == n - 1 else None
        return st.last if st.done == n else None

    def head_cache(self, request_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's keys and values over a sequence's committed rows, [kv_heads, rows, d]
        each (for tests and debugging)."""
        st = self._states[request_id]
        if self.fused is None:
            return st.keys[:, :st.rows], st.values[:, :st.rows]
        out = []
        for cache in (self.fused.k_cache, self.fused.v_cache):
            pages = cache.index_select(0, torch.tensor(st.blocks, dtype=torch.int64))
            out.append(pages.flatten(0, 1)[:st.rows].transpose(0, 1))
        return out[0], out[1]

    def _append(self, st: _EagleState, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        need = st.rows + k_new.shape[1]
        if need > st.keys.shape[1]:
            cap = max(need, 2 * st.keys.shape[1])
            for name in ("keys", "values"):
                old = getattr(st, name)
                new = old.new_empty(old.shape[0], cap, old.shape[2])
                new[:, :st.rows] = old[:, :st.rows]
                setattr(st, name, new)
        st.keys[:, st.rows:need] = k_new
        st.values[:, st.rows:need] = v_new
        st.rows = need

    def _state(self, seq: Sequence) -> _EagleState:
        st = self._states.get(seq.request_id)
        if st is None:
            cfg = self.head.cfg
            # the fused layer keeps rows in its pool; the torch path in these tensors
            start = 0 if self.fused is not None else _CACHE_START
            shape = (cfg.num_kv_heads, start, cfg.head_dim)
            st = self._states[seq.request_id] = _EagleState(
                torch.empty(shape, dtype=self._dtype, device=self._device),
                torch.empty(shape, dtype=self._dtype, device=self._device))
        return st

    def free(self, seq: Sequence) -> None:
        st = self._states.pop(seq.request_id, None)
        if st is not None and self.fused is not None:
            self.fused.release(st.blocks)
        if self.ngram is not None:
            self.ngram.free(seq)
