"""EagleProposer: drafts from the target's own last hidden states (worker/spec/eagle_head.py).

The target's forward already computes, for every position it scores, the feature EAGLE needs:
the engine hands each step's final hidden states to `observe`. Per sequence the proposer keeps
the head's KV cache over committed positions, each computed from the target's true feature; at
`propose` it first catches up on the positions committed since (at most k+1 after a verify, the
prompt after a prefill), then rolls out: each draft token's feature guess is fed back in for the
next, in a scratch extension of the cache that is never kept. So rollback and on_accept have
nothing to undo: the next catch-up starts from committed tokens and true features only.

Positions whose features the proposer never saw (a prefix-cache hit, steps too large to
speculate, at batch > 1 plain steps beyond what one catch-up call takes) are simply absent from
the head's cache: drafts get worse there, never wrong, since the target verifies every token.

A batch drafts in lockstep: one head call for all its catch-ups, then one per depth for every
sequence still drafting (the fused kernel takes rows of several sequences per call, and a call
costs about as much for one row as for eight).

With `tree_width` > 1 the draft is a token tree, as in EAGLE-2 (Li et al.
2024b): at each depth the `tree_width` most likely nodes so far (by the product of the head's
probabilities along their branch) are expanded in one call of the head, each into its
`tree_width` most likely next tokens. Growth stops where no leaf reaches `tree_min_prob`
(each depth costs a head call); the proposal is the k most likely nodes grown, leaving out
those less likely than `tree_keep_prob` (a node costs only a verify row). The head's attention
over its scratch rows is masked to each node's own ancestors, as the target's is when it
verifies the tree (worker/spec/tree.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from protos.messages import StepPlan
from worker.sequence import Sequence
from worker.spec.eagle_fused import FusedEagleLayer
from worker.spec.eagle_head import DraftRequest, EagleHead, TorchEagleLayer
from worker.spec.proposer import NO_PROPOSAL, NgramProposer, Proposal, Proposer
from worker.spec.tree import MAX_TREE_TOKENS

DraftLayer = FusedEagleLayer | TorchEagleLayer
# Rows a batch's catch-up may run per step, beyond each sequence's first (one fused call)
CATCH_UP_ROWS = 16


@dataclass
class Guess:
    """The head's output at one position: its feature guess, and the likeliest next tokens
    read from it (draft-vocabulary ids, best first) with their log-probabilities."""

    feature: torch.Tensor
    ids: list[int]
    logps: list[float]


@dataclass
class _EagleState:
    cache: Any  # the draft layer's per-sequence cache (DraftLayer.new_cache)
    rows: int = 0  # committed rows in the cache; rows after them are rollout scratch
    done: int = 0  # next position to process (all before it were processed or skipped)
    last: Guess | None = None  # the head's guess at position done-1
    # Observed target features not yet used: (position of the first row, rows).
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    pending_rows: int = 0  # rows in `pending`, counted as they come (it may hold thousands)


@dataclass
class _Node:
    """A token of a draft tree."""

    token: int  # target vocabulary
    parent: int  # index of the parent node, -1: the root (the last committed token)
    logp: float  # log probability of the branch from the root down to this token
    depth: int
    feat: torch.Tensor  # the feature guess this token was read from (its parent's output)
    row: int = -1  # its scratch row in the head's cache once expanded


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
                 ngram: NgramProposer | None = None, ngram_min_tokens: int = 3,
                 layer: DraftLayer | None = None, tree_width: int = 1,
                 tree_min_prob: float = 0.1, tree_keep_prob: float = 0.03) -> None:
        self.head = head.eval()
        self.feature_layers = head.cfg.feature_layers
        # the fused C layer over its own KV pool where it runs, else torch ops
        self.layer = layer if layer is not None else TorchEagleLayer(head)
        self.ngram = ngram
        self.ngram_min_tokens = ngram_min_tokens
        self.proposals = {"head": 0, "ngram": 0}  # non-empty proposals by source
        self.min_confidence = min_confidence
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.tree_width = tree_width
        self.tree_min_prob = tree_min_prob
        self.tree_keep_prob = tree_keep_prob
        p = next(iter(head.parameters()))
        self._dtype, self._device = p.dtype, p.device
        # on the head's device, as are the positions and tokens it is given (CUDA included)
        self._to_target = list(head.cfg.vocab)
        self._states: dict[str, _EagleState] = {}

    # -- features from the target -------------------------------------------------------------

    def observe(self, seqs: list[Sequence], plan: StepPlan, hidden: torch.Tensor) -> None:
        if len(seqs) > self.max_batch_size:
            return  # nothing speculates in such steps; the head skips these positions
        # into the head's feature space once per step, for all its rows (EAGLE-3 heads)
        hidden = self.head.project(hidden.to(self._dtype))
        qs = plan.query_start
        for i, seq in enumerate(seqs):
            a, b = qs[i], qs[i + 1]
            if b <= a:
                continue
            st = self._state(seq)
            st.pending.append((plan.positions[a], hidden[a:b]))
            st.pending_rows += b - a
            while st.pending_rows > self.max_pending:
                st.pending_rows -= len(st.pending.pop(0)[1])

    def on_tree_accept(self, seq: Sequence, path: list[int]) -> None:
        """A verified tree's rows were the root and then its tokens: keep the root's and the
        accepted branch's features, in position order, as a chain's would be."""
        st = self._states.get(seq.request_id)
        root = seq.num_tokens - 1
        if st is None:
            return
        for i, (first, rows) in enumerate(st.pending):
            if first == root:
                keep = torch.tensor([0] + [node + 1 for node in path], device=rows.device)
                st.pending[i] = (first, rows.index_select(0, keep))
                st.pending_rows += len(keep) - len(rows)
                return

    # -- proposals ---------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        """The batch drafts in lockstep: one head call for all catch-ups, then one per depth
        for all rollouts still going. A call streams the head's ~13 MB of weights whatever its
        rows (up to the kernel's row limit), so a batch of 8 costs about what one sequence
        does; each sequence's rows are computed exactly as if it drafted alone."""
        out = [NO_PROPOSAL] * len(seqs)
        heads: list[tuple[int, Sequence, _EagleState, int]] = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if self.ngram is not None and k > 0:
                tokens = self.ngram.model_for(seq).rollout(seq.token_ids, k)
                if len(tokens) >= self.ngram_min_tokens:
                    self.proposals["ngram"] += 1
                    out[i] = Proposal(tokens)
                    continue
            heads.append((i, seq, self._state(seq), k))
        # Past batch 1 a catch-up keeps the batch to about one head call: a sequence's first
        # (its prompt) runs whole, later ones their last CATCH_UP_ROWS // batch positions. Older
        # ones (tokens decoded while the gate ran plain steps) stay missing from the head's
        # cache: drafts get a little worse there, never wrong. Catching up on 16 plain steps
        # of a batch of 8 otherwise cost ~8 calls, and made every step that re-tried
        # speculation look far dearer than speculating is.
        cap = CATCH_UP_ROWS // len(seqs) if len(seqs) > 1 else None
        self._catch_up([(seq, st) for _, seq, st, _ in heads], cap)
        drafts: list[tuple[int, _Chain | _Tree]] = []
        for i, seq, st, k in heads:
            last = st.last if st.done == seq.num_tokens else None
            if last is None or k <= 0:
                continue
            tree = self.tree_width > 1
            # scratch rows for the rollout; a full pool drafts nothing
            if self.layer.reserve(st.cache, st.rows + (min(MAX_TREE_TOKENS, self.tree_width * k)
                                                       if tree else k)):
                drafts.append((i, _Tree(self, seq, st, last, k) if tree
                               else _Chain(self, seq, st, last, k)))
        self._run([d for _, d in drafts])
        for i, d in drafts:
            self.proposals["head"] += 1
            out[i] = d.proposal()
        return out

    def _run(self, drafts: list[_Chain | _Tree]) -> None:
        """Steps all drafts to their end, one batched head call per round."""
        going = [d for d in drafts if d.request is not None]
        while going:
            for d, result in zip(going, self.layer.draft_batch([d.request for d in going])):
                d.take(*result)
            going = [d for d in going if d.request is not None]

    def _catch_up(self, items: list[tuple[Sequence, _EagleState]],
                  cap: int | None = None) -> None:
        """Runs the head over the committed positions it has target features for (the last
        `cap` of them, but all on a sequence's first catch-up), for all `items` in batched
        calls; each state's `last` is then its guess at the last committed position if it
        reached it."""
        work: list[tuple[_EagleState, int, DraftRequest]] = []
        for seq, st in items:
            job = self._catch_up_request(seq, st, cap if st.rows else None)
            if job is not None:
                work.append((st, *job))
        if not work:
            return
        for (st, nxt, req), (g, ids, logps) in zip(
                work, self.layer.draft_batch([r for _, _, r in work])):
            st.rows += len(req.tokens)
            st.done = nxt
            st.last = Guess(g[-1], ids[0], logps[0]) if req.scored else None

    def _catch_up_request(self, seq: Sequence, st: _EagleState, cap: int | None = None,
                          ) -> tuple[int, DraftRequest] | None:
        """The rows a sequence's catch-up runs (the last `cap` if given) and the position after
        them, or None when there are none or they cannot run; its pending features are used
        up either way."""
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
        st.pending_rows = 0
        if not parts:
            return None
        positions = [q for p, r in parts for q in range(p, p + len(r))]
        feats = parts[0][1] if len(parts) == 1 else torch.cat([r for _, r in parts])
        if cap is not None and len(positions) > cap:
            positions, feats = positions[-cap:], feats[-cap:]
        if positions[-1] >= self.layer.max_position:
            return None
        if not self.layer.reserve(st.cache, st.rows + len(positions)):
            return None  # pool full: these positions stay missing from the head's cache
        return nxt, DraftRequest([seq.token_ids[q] for q in positions], feats, positions,
                                 st.cache, st.rows, scored=int(positions[-1] == n - 1),
                                 width=self.tree_width)

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


class _Chain:
    """A greedy rollout, one head call per token, while the product of the head's top
    probabilities stays above `min_confidence` (the first token is always proposed)."""

    def __init__(self, p: EagleProposer, seq: Sequence, st: _EagleState, last: Guess,
                 k: int) -> None:
        self.p, self.st, self.k = p, st, k
        self.out: list[int] = []
        self.chance = 1.0
        self.pos = seq.num_tokens - 1
        self.request: DraftRequest | None = None  # the next head call, None when done
        self._next(last.feature, last.ids[0], last.logps[0])

    def _next(self, feat: torch.Tensor, best: int, logp: float) -> None:
        self.request = None
        self.chance *= math.exp(logp)
        if self.chance < self.p.min_confidence and self.out:
            return
        token = self.p._to_target[best]
        self.out.append(token)
        if len(self.out) >= self.k or self.pos + 1 >= self.p.layer.max_position:
            return
        self.pos += 1  # a scratch row after the committed ones
        self.request = DraftRequest([token], feat.view(1, -1), [self.pos], self.st.cache,
                                    self.st.rows + len(self.out) - 1, scored=1, width=1)

    def take(self, g: torch.Tensor, ids: list[list[int]], logps: list[list[float]]) -> None:
        self._next(g[0], ids[0][0], logps[0][0])

    def proposal(self) -> Proposal:
        return Proposal(self.out)


class _Tree:
    """An EAGLE-2 token tree: each head call expands the `tree_width` likeliest leaves."""

    def __init__(self, p: EagleProposer, seq: Sequence, st: _EagleState, last: Guess,
                 k: int) -> None:
        self.p, self.st, self.k = p, st, k
        self.width = p.tree_width
        self.max_rows = min(MAX_TREE_TOKENS, self.width * k)
        self.root_pos = seq.num_tokens - 1
        self.nodes: list[_Node] = []
        self.used = 0  # scratch rows
        self.chosen: list[int] = []
        self.depth = 0
        self.request: DraftRequest | None = None
        self._plan(self._expand([-1], [last.feature], [last.ids], [last.logps], 1))

    def _plan(self, frontier: list[int]) -> None:
        """The next head call: the likeliest leaves, unless the tree is done."""
        self.request = None
        if not frontier:
            return
        nodes, width, k = self.nodes, self.width, self.k
        frontier.sort(key=lambda i: -nodes[i].logp)
        chosen = frontier[:width]
        best = nodes[chosen[0]].logp
        depth = nodes[chosen[0]].depth
        if (math.exp(best) < self.p.tree_min_prob or depth >= k
                or self.used + len(chosen) > self.max_rows
                or self.root_pos + depth >= self.p.layer.max_position):
            return
        if len(nodes) >= k and best <= sorted((n.logp for n in nodes), reverse=True)[k - 1]:
            return  # a child is never likelier than its parent: none would be among the k
        holes = []
        for j, i in enumerate(chosen):
            mine, a = set(), nodes[i].parent
            while a >= 0:
                mine.add(nodes[a].row)
                a = nodes[a].parent
            r = self.used + j
            holes.append(sum(1 << (r - q) for q in range(r) if q not in mine))
        self.chosen, self.depth = chosen, depth
        self.request = DraftRequest(
            [nodes[i].token for i in chosen], torch.stack([nodes[i].feat for i in chosen]),
            [self.root_pos + depth] * len(chosen), self.st.cache, self.st.rows + self.used,
            holes, scored=len(chosen), width=width)

    def take(self, g: torch.Tensor, ids: list[list[int]], logps: list[list[float]]) -> None:
        for j, i in enumerate(self.chosen):
            self.nodes[i].row = self.used + j
        self.used += len(self.chosen)
        self._plan(self._expand(self.chosen, list(g), ids, logps, self.depth + 1))

    def _expand(self, parents: list[int], feats: list[torch.Tensor], ids: list[list[int]],
                logps: list[list[float]], depth: int) -> list[int]:
        """Adds the tree_width likeliest next tokens under each parent (-1: the root): ids
        and logps were read off the feature guesses `feats` (one per parent); returns the new
        nodes."""
        new = []
        for j, parent in enumerate(parents):
            base = self.nodes[parent].logp if parent >= 0 else 0.0
            for lp, i in zip(logps[j][:self.width], ids[j][:self.width]):
                self.nodes.append(_Node(self.p._to_target[i], parent, base + lp, depth, feats[j]))
                new.append(len(self.nodes) - 1)
        return new

    def proposal(self) -> Proposal:
        # The k likeliest tokens grown, but none the head gives less than tree_keep_prob: a
        # verify row costs ~1.5% of a decode here, and a node of probability p is accepted
        # about p of the time (the head is calibrated), so a rarer one costs more than it
        # brings.
        nodes = self.nodes
        ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i].logp, i))[:self.k]
        floor = math.log(self.p.tree_keep_prob) if self.p.tree_keep_prob > 0 else -math.inf
        keep = sorted(ranked[:1] + [i for i in ranked[1:] if nodes[i].logp >= floor])
        index = {old: new for new, old in enumerate(keep)}
        return Proposal([nodes[i].token for i in keep],
                        parents=[index.get(nodes[i].parent, -1) for i in keep])
