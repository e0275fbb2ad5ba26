"""SpecDecoder: the engine's speculative step — choose k, propose, score k+1 positions, verify.

The engine asks three things of it each step (worker/engine.py):
1. num_lookahead(scheduler): the k to reserve KV slots for (0: no speculation this step).
2. build_plan(runner, step_id, sched): proposals are appended to each decoding sequence as
   extra input tokens (positions L-1 .. L-1+m in one forward) and logits are requested at all
   m+1 of them. The plan is complete on rank 0, so tensor-parallel ranks need nothing more than
   the broadcast StepPlan: that is the TP hook.
3. sample(logits, batch, sampler): verification (verifier.py) for sequences with a proposal, the
   ordinary sampler for the rest; returns the tokens each sequence emits this step.

Token trees (worker/spec/tree.py): a proposal with parents is scored in the same forward, each
token at position root + depth under a tree mask (StepPlan.attn_holes). Verification walks the
tree, greedy or by rejection sampling, each row processed (penalties, min_tokens) with the
history of its own branch; the accepted branch's K/V then move into the chain's slots
(`move_kv`, the runner's). Engines whose runner cannot move K/V (tensor or pipeline parallel),
and proposals with a draft distribution, verify the tree's first branch as a chain.

k per sequence follows an EMA of its acceptance rate alpha: the j-th proposed token is only used
if the j before it were accepted (probability alpha^j, Leviathan et al. 2023, eq. 1), so k is
the largest j with alpha^j >= min_acceptance. Below min_acceptance a sequence stops proposing
and probes with k=1 every `probe_every` steps. Above `max_batch_size` running sequences the
whole step runs without speculation; below it, k is also cut so that the step scores at most
`max_step_tokens` tokens, the size up to which a step costs about one decode. And with
`measure_gate` (the default) a batch size only speculates while its speculative steps are
measured to cost less time per emitted token than plain ones (worker/spec/gate.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch

from kernels.argmax import argmax_rows
from protos.messages import SampledLogprobs, StepPlan, TokenLogprob
from worker.sampler import Sampler
from worker.scheduler import Scheduler, SchedulerOutput
from worker.sequence import Sequence
from worker.spec.config import GATED_MIN_ACCEPTANCE, SpeculativeConfig
from worker.spec.gate import SpecGate
from worker.spec.processing import RowContext, RowProbabilities, penalized
from worker.spec.proposer import NO_PROPOSAL, Proposal, Proposer
from worker.spec.tree import (
    branch,
    depths,
    first_branch,
    is_chain,
    tree_holes,
    walk_greedy,
    walk_sampled,
)
from worker.spec.verifier import verify_greedy, verify_sampled

_PRIOR_ACCEPTANCE = 0.6  # a new sequence starts here (k=2 where min_acceptance is 0.3)


@dataclass
class SpecMetrics:
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verifications: int = 0  # (sequence, step) pairs that verified a non-empty proposal
    emitted_tokens: int = 0  # tokens emitted by those verifications (accepted + 1 each)
    proposer_seconds: float = 0.0
    spec_steps: int = 0
    skipped_steps: int = 0  # steps that did not speculate because the batch was too large
    gated_steps: int = 0  # steps that did not speculate because the gate measured it to lose

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification (1 = nothing accepted)."""
        return self.emitted_tokens / self.verifications if self.verifications else 0.0


@dataclass
class _SeqState:
    ema: float = _PRIOR_ACCEPTANCE
    idle: int = 0


@dataclass
class _Row:
    seq: Sequence
    first: int  # first logits row of this sequence
    proposal: Proposal


@dataclass
class SpecBatch:
    rows: list[_Row] = field(default_factory=list)


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, eos_token_ids: list[int],
                 max_model_len: int, vocab_size: int, *,
                 move_kv: Callable[[list[int], list[int]], None] | None = None,
                 block_size: int = 16) -> None:
        if config.min_acceptance is None:  # unresolved (worker/spec/factory.py resolves it)
            config = msgspec.structs.replace(config, min_acceptance=GATED_MIN_ACCEPTANCE)
        self.config = config
        self.proposer = proposer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = SpecMetrics()
        # Copies K/V between cache slots in every layer (ModelRunner.move_kv); None: no trees.
        self.move_kv = move_kv
        self.block_size = block_size
        self._state: dict[str, _SeqState] = {}
        self._ks: dict[str, int] = {}
        self.gate = SpecGate() if config.measure_gate else None
        self._measured_batch: int | None = None  # this step's batch size, if it only decodes

    # -- 1. how many slots ------------------------------------------------------------------

    def num_lookahead(self, scheduler: Scheduler) -> int:
        self._ks = {}
        self._measured_batch = None
        batch = len(scheduler.running) + len(scheduler.waiting)
        if not scheduler.running:
            return 0
        if batch > self.config.max_batch_size:
            self.metrics.skipped_steps += 1
            return 0
        decoding = [s for s in scheduler.running if s.num_computed_tokens + 1 == s.num_tokens]
        # Each decoding sequence gets an equal share of the step's token budget (None: no cap),
        # counted over all of them even where the gate leaves only seeded ones speculating, so
        # that their k does not depend on the gate either.
        budget = self.config.max_step_tokens
        share = budget // max(1, len(decoding)) - 1 if budget else self.config.num_speculative_tokens
        if self.gate is not None and decoding:
            if len(decoding) == batch:  # a prefill in the step would swamp the comparison
                self._measured_batch = batch
            if not self.gate.speculate(len(decoding)):
                self.metrics.gated_steps += 1
                # A seeded sampled request speculates whatever the gate says: rejection sampling
                # draws differently from plain sampling, and the gate's choice depends on
                # timing, so its answer would otherwise not repeat. Such a step measures neither
                # arm.
                decoding = [s for s in decoding if s.generator is not None and not s.params.greedy]
                if not decoding:
                    return 0
                self._measured_batch = None
        for seq in decoding:
            k = min(self._k_for(seq), share)
            if k > 0:
                self._ks[seq.request_id] = k
        return max(self._ks.values(), default=0)

    def end_step(self, seconds: float, emitted_tokens: int) -> None:
        """The engine's report of the step just run: its wall time and the tokens it emitted."""
        if self.gate is not None and self._measured_batch is not None:
            self.gate.record(self._measured_batch, bool(self._ks), seconds, emitted_tokens)
        self._measured_batch = None

    def _k_for(self, seq: Sequence) -> int:
        cfg = self.config
        st = self._state.setdefault(seq.request_id, _SeqState())
        if st.ema < cfg.min_acceptance:
            st.idle += 1
            k = 1 if st.idle % cfg.probe_every == 0 else 0
        elif st.ema >= 0.999 or cfg.min_acceptance == 0:
            k = cfg.num_speculative_tokens
        else:
            k = int(math.log(cfg.min_acceptance) / math.log(st.ema))
        # Never propose past max_tokens or max_model_len (one token comes from the target).
        if seq.params.max_tokens is not None:
            k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
        k = min(k, self.max_model_len - seq.num_tokens - 1)
        return max(0, min(k, cfg.num_speculative_tokens))

    # -- 2. the plan ------------------------------------------------------------------------

    def build_plan(self, runner, step_id: int, sched: SchedulerOutput) -> tuple[StepPlan, SpecBatch]:
        """`runner` is a ModelRunner (anything with build_plan(step_id, SchedulerOutput))."""
        cands: list[Sequence] = []
        ks: list[int] = []
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            k = self._ks.get(seq.request_id, 0)
            if k and n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens:
                cands.append(seq)
                ks.append(k)
        props: dict[int, Proposal] = {}
        if cands:
            t0 = time.perf_counter()
            for seq, k, prop in zip(cands, ks, self.proposer.propose(cands, ks)):
                tokens, parents = prop.token_ids[:k], prop.parents
                if parents is not None:
                    parents = parents[:len(tokens)]
                    if is_chain(parents):
                        parents = None
                    elif self.move_kv is None or prop.probs is not None:
                        tokens, parents = first_branch(tokens, parents), None
                if tokens and all(0 <= t < self.vocab_size for t in tokens):
                    probs = prop.probs[:len(tokens)] if prop.probs is not None else None
                    props[id(seq)] = Proposal(list(tokens), probs, parents)
            self.metrics.proposer_seconds += time.perf_counter() - t0
            self.metrics.spec_steps += 1

        counts = list(sched.num_new_tokens)
        appended: list[tuple[Sequence, int]] = []
        try:
            for i, seq in enumerate(sched.seqs):
                prop = props.get(id(seq))
                if prop is not None:
                    seq.token_ids.extend(prop.token_ids)
                    counts[i] += len(prop.token_ids)
                    appended.append((seq, len(prop.token_ids)))
            plan = runner.build_plan(step_id, SchedulerOutput(sched.seqs, counts, sched.preempted))
        finally:
            for seq, m in appended:  # proposals are input only; committed tokens stay as they were
                del seq.token_ids[-m:]

        if any(p.parents is not None for p in props.values()):
            plan = self._tree_layout(plan, sched, props)
        batch = SpecBatch()
        rows: list[int] = []
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            if seq.num_computed_tokens + n != seq.num_tokens:
                continue  # a prefill chunk: nothing to sample
            prop = props.get(id(seq), NO_PROPOSAL)
            end = plan.query_start[i + 1]
            batch.rows.append(_Row(seq, len(rows), prop))
            rows.extend(range(end - 1 - len(prop.token_ids), end))
        return msgspec.structs.replace(plan, sample_indices=rows), batch

    @staticmethod
    def _tree_layout(plan: StepPlan, sched: SchedulerOutput,
                     props: dict[int, Proposal]) -> StepPlan:
        """Tree tokens sit at position root + depth and see only their ancestors."""
        positions = list(plan.positions)
        holes = [0] * len(positions)
        for i, seq in enumerate(sched.seqs):
            prop = props.get(id(seq))
            if prop is None or prop.parents is None:
                continue
            root = plan.query_start[i + 1] - 1 - len(prop.token_ids)
            for j, d in enumerate(depths(prop.parents)):
                positions[root + 1 + j] = positions[root] + d
            holes[root:root + 1 + len(prop.parents)] = tree_holes(prop.parents)
        return msgspec.structs.replace(plan, positions=positions, attn_holes=holes)

    # -- 3. verification --------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, batch: SpecBatch, sampler: Sampler
               ) -> tuple[list[list[int]], list[list[SampledLogprobs | None]]]:
        n = len(batch.rows)
        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[SampledLogprobs | None]] = [[] for _ in range(n)]
        plain = [i for i, r in enumerate(batch.rows) if not r.proposal.token_ids]
        if plain:
            idx = torch.tensor([batch.rows[i].first for i in plain])
            out = sampler(logits.index_select(0, idx), [batch.rows[i].seq for i in plain])
            for j, i in enumerate(plain):
                tokens[i] = [out.token_ids[j]]
                lps[i] = [out.logprobs[j]]
        for i, row in enumerate(batch.rows):
            if row.proposal.token_ids:
                tokens[i], lps[i] = self._verify(logits, row, sampler)
        return tokens, lps

    def _verify(self, logits: torch.Tensor, row: _Row,
                sampler: Sampler) -> tuple[list[int], list[SampledLogprobs | None]]:
        seq, drafts = row.seq, row.proposal.token_ids
        m = len(drafts)
        params, parents = seq.params, row.proposal.parents
        edit = bool(params.has_penalties or params.min_tokens)
        # fp32; a copy only where penalties edit it in place (a 9-row block is 1.8 MB)
        block = logits[row.first:row.first + m + 1].to(torch.float32, copy=edit)
        raw = (block.clone() if edit else block) if params.logprobs is not None else None
        if edit:
            # row 0 is the root's; row j + 1 follows draft j, after its branch (a chain's
            # branch of j is drafts[:j + 1])
            tree = parents if parents is not None else list(range(-1, m - 1))
            ctxs = [RowContext(params, seq.token_ids + branch(drafts, tree, node),
                               seq.num_prompt_tokens) for node in range(-1, m)]
            penalized(block, ctxs, self.eos_token_ids)
        if parents is not None:
            return self._verify_tree(block, raw, row, sampler)
        if params.greedy:
            emitted = verify_greedy(block, drafts)
        else:
            gen = seq.generator if seq.generator is not None else sampler.generator
            emitted = verify_sampled(RowProbabilities(block, params), row.proposal.probs,
                                     drafts, gen)
        accepted = len(emitted) - 1
        self._record(seq, m, accepted)
        self.proposer.on_accept(seq, accepted)
        if accepted < m:
            self.proposer.rollback(seq, seq.num_tokens + accepted)
        if raw is None:
            return emitted, [None] * len(emitted)
        logp = raw.log_softmax(-1)
        return emitted, [_logprob(logp[j], t, params.logprobs) for j, t in enumerate(emitted)]

    def _verify_tree(self, block: torch.Tensor, raw: torch.Tensor | None, row: _Row,
                     sampler: Sampler) -> tuple[list[int], list[SampledLogprobs | None]]:
        seq, drafts, parents = row.seq, row.proposal.token_ids, row.proposal.parents
        assert parents is not None and self.move_kv is not None
        if seq.params.greedy:
            emitted, path = walk_greedy(argmax_rows(block).tolist(), drafts, parents)
        else:
            gen = seq.generator if seq.generator is not None else sampler.generator
            emitted, path = walk_sampled(RowProbabilities(block, seq.params), drafts, parents,
                                         gen)
        # The accepted branch's K/V move to the slots a chain would have used: the root is
        # the sequence's last committed token, at index n - 1.
        n, bs, table = seq.num_tokens, self.block_size, seq.block_table
        moves = [(n + node, n + j) for j, node in enumerate(path) if node != j]
        if moves:
            self.move_kv([table[s // bs] * bs + s % bs for s, _ in moves],
                         [table[d // bs] * bs + d % bs for _, d in moves])
        # Acceptance per tree is measured against its depth, the chain it stands in for.
        self._record(seq, len(drafts), len(path), max(depths(parents)))
        self.proposer.on_tree_accept(seq, path)
        self.proposer.on_accept(seq, len(path))
        if raw is None:
            return emitted, [None] * len(emitted)
        logp = raw.log_softmax(-1)
        scored = [0] + [node + 1 for node in path]  # the verify row each emitted token is from
        lps: list[SampledLogprobs | None] = [
            _logprob(logp[r], t, seq.params.logprobs) for r, t in zip(scored, emitted)]
        return emitted, lps

    def _record(self, seq: Sequence, proposed: int, accepted: int,
                depth: int | None = None) -> None:
        m = self.metrics
        m.proposed_tokens += proposed
        m.accepted_tokens += accepted
        m.verifications += 1
        m.emitted_tokens += accepted + 1
        st = self._state.setdefault(seq.request_id, _SeqState())
        d = self.config.ema_decay
        st.ema = d * st.ema + (1 - d) * accepted / (depth or proposed)
        if st.ema >= self.config.min_acceptance:
            st.idle = 0

    # -- lifecycle --------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        self._state.pop(seq.request_id, None)
        self.proposer.free(seq)

    def shutdown(self) -> None:
        self.proposer.shutdown()

    def stats_fields(self) -> dict[str, int | float]:
        """The ReplicaStats fields this decoder fills."""
        m = self.metrics
        return {"spec_proposed_tokens_total": m.proposed_tokens,
                "spec_accepted_tokens_total": m.accepted_tokens,
                "spec_verifications_total": m.verifications,
                "spec_emitted_tokens_total": m.emitted_tokens,
                "spec_proposer_seconds_total": m.proposer_seconds,
                "spec_gated_steps_total": m.gated_steps}


def _logprob(row: torch.Tensor, tok: int, top_n: int | None) -> SampledLogprobs:
    """As worker.sampler.Sampler reports it: from the raw (unprocessed) logits."""
    rank = int((row > row[tok]).sum()) + 1
    top: list[TokenLogprob] = []
    if top_n:
        vals, ids = row.topk(top_n)
        top = [TokenLogprob(int(t), float(v), i + 1)
               for i, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()))]
    return SampledLogprobs(TokenLogprob(tok, float(row[tok]), rank), top)
