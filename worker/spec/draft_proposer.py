"""Proposers backed by draft models: in this process (DraftModelProposer) or, through the same
client logic, in a pool of Ray actors (worker/spec/pool.py).

The client side remembers, per sequence, how many leading tokens the draft's copy still has
right (`synced`): after verification that is the committed length plus the accepted proposals.
Each query sends only the tokens after it, so a long prompt crosses once.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from worker.sequence import Sequence
from worker.spec.draft_worker import DraftWorker
from worker.spec.messages import DraftBatch, DraftProposal, DraftQuery
from worker.spec.proposer import NO_PROPOSAL, Proposal, Proposer


class DraftClient(Proposer):
    """Builds DraftQueries from sequences and turns DraftProposals back into Proposals."""

    def __init__(self, eos_token_ids: list[int], vocab_size: int) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self._synced: dict[str, int] = {}

    def query(self, seq: Sequence, k: int) -> DraftQuery:
        start = min(self._synced.get(seq.request_id, 0), seq.num_tokens)
        return DraftQuery(seq.request_id, start, seq.token_ids[start:], k,
                          seq.num_prompt_tokens, seq.params)

    def proposal(self, seq: Sequence, reply: DraftProposal) -> Proposal:
        if reply.resync:
            self._synced[seq.request_id] = 0
            return NO_PROPOSAL
        # The draft now holds the committed tokens and its proposals; nothing is confirmed
        # beyond the committed ones until on_accept.
        self._synced[seq.request_id] = seq.num_tokens
        if not reply.tokens:
            return NO_PROPOSAL
        probs = None
        if reply.probs:
            flat = np.frombuffer(reply.probs, dtype=np.float32)
            probs = torch.from_numpy(flat.copy()).view(len(reply.tokens), self.vocab_size)
        return Proposal(list(reply.tokens), probs)

    def on_accept(self, seq: Sequence, num_accepted: int) -> None:
        self._synced[seq.request_id] = seq.num_tokens + num_accepted

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        # The draft trims its KV lazily: the next query's prefix_len tells it where to cut.
        self._synced[seq.request_id] = min(self._synced.get(seq.request_id, 0), num_tokens)

    def free(self, seq: Sequence) -> None:
        self._synced.pop(seq.request_id, None)
        self._freed(seq.request_id)

    @abstractmethod
    def _freed(self, seq_id: str) -> None: ...


class DraftModelProposer(DraftClient):
    """A draft model in this process, with its own paged KV cache."""

    name = "draft"

    def __init__(self, worker: DraftWorker, eos_token_ids: list[int]) -> None:
        super().__init__(eos_token_ids, worker.target_vocab_size)
        self.worker = worker

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        batch = DraftBatch(queries=[self.query(s, k) for s, k in zip(seqs, ks)],
                           eos_token_ids=self.eos_token_ids)
        reply = self.worker.propose(batch)
        return [self.proposal(s, r) for s, r in zip(seqs, reply.proposals)]

    def _freed(self, seq_id: str) -> None:
        self.worker.forget(seq_id)  # in process: at once
