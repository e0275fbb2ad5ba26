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
from typing import Any

import torch

from protos.messages import StepPlan
from worker.sequence import Sequence
from worker.spec.eagle_fused import FusedEagleLayer
from worker.spec.eagle_head import EagleHead, TorchEagleLayer
from worker.spec.proposer import NO_PROPOSAL, NgramProposer, Proposal, Proposer

DraftLayer = FusedEagleLayer | TorchEagleLayer


@dataclass
class _EagleState:
    cache: Any  # the draft layer's per-sequence cache (DraftLayer.new_cache)
    rows: int = 0  # committed rows in the cache; rows after them are rollout scratch
    done: int = 0  # next position to process (all before it were processed or skipped)
    last: torch.Tensor | None = None  # the head's feature guess at position done-1
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
                 layer: DraftLayer | None = None) -> None:
        self.head = head.eval()
        # the fused C layer over its own KV pool where it runs, else torch ops
        self.layer = layer if layer is not None else TorchEagleLayer(head)
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
        if not self.layer.reserve(st.cache, st.rows + k):
            return NO_PROPOSAL  # the head's KV pool is full: no scratch rows for a rollout
        feat, pos = last, seq.num_tokens - 1
        out: list[int] = []
        chance = 1.0
        while True:
            probs = torch.softmax(self.head.logits(feat).float(), dim=-1)
            conf, idx = probs.max(dim=-1)
            chance *= float(conf)
            if chance < self.min_confidence and out:
                break
            token = self._to_target[idx]
            out.append(int(token))
            if len(out) >= k or pos + 1 >= self.layer.max_position:
                break
            pos += 1  # a scratch row after the committed ones
            g = self.layer.layer(token.view(1), feat.view(1, -1),
                                 torch.tensor([pos], device=self._device), st.cache,
                                 st.rows + len(out) - 1)
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
        if int(positions[-1]) >= self.layer.max_position:
            return None
        tokens = torch.tensor(seq.token_ids, dtype=torch.int64).index_select(0, positions)
        positions, tokens = positions.to(self._device), tokens.to(self._device)
        feats = torch.cat([r for _, r in parts])
        if not self.layer.reserve(st.cache, st.rows + len(positions)):
            return None  # pool full: these positions stay missing from the head's cache
        g = self.layer.layer(tokens, feats, positions, st.cache, st.rows)
        st.rows += len(positions)
        st.done = nxt
        st.last = g[-1] if int(positions[-1]) == n - 1 else None
        return st.last if st.done == n else None

    def head_cache(self, request_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's keys and values over a sequence's committed rows, [kv_heads, rows, d]
        each (for tests and debugging)."""
        st = self._states[request_id]
        return self.layer.read(st.cache, st.rows)

    def _state(self, seq: Sequence) -> _EagleState:
        st = self._states.get(seq.request_id)
        if st is None:
            st = self._states[seq.request_id] = _EagleState(self.layer.new_cache())
        return st

    def free(self, seq: Sequence) -> None:
        st = self._states.pop(seq.request_id, None)
        if st is not None:
            self.layer.release(st.cache)
        if self.ngram is not None:
            self.ngram.free(seq)
