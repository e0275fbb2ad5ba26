"""Proposers: where speculative tokens come from.

A proposer guesses up to k next tokens for each sequence of a step; the target then scores all
guesses in one forward and keeps the longest acceptable prefix (worker/spec/verifier.py). Three
kinds share this interface:
- NgramProposer (here): prompt lookup, no model (Saxena 2023; "prompt lookup decoding").
- DraftModelProposer (draft_proposer.py): a small model in this process with its own paged KV.
- DraftPoolProposer (pool.py): draft-model Ray actors shared by all replicas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from worker.sequence import Sequence


class Proposal(NamedTuple):
    """Proposed token ids (target vocabulary) and the draft distribution q each was drawn from:
    float32 [len(token_ids), vocab], or None for a point mass at each token (greedy requests,
    n-gram lookup)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


NO_PROPOSAL = Proposal([])


class Proposer(ABC):
    """Contract:
    - propose(seqs, ks): one call per engine step for all sequences that speculate; ks[i] is the
      most tokens wanted for seqs[i]; fewer (even none) is always allowed. seq.token_ids holds
      the committed tokens only.
    - on_accept(seq, num_accepted): after verification, the first num_accepted proposed tokens
      were kept (the emitted token after them came from the target).
    - rollback(seq, num_tokens): only the first num_tokens tokens of seq are valid now; state
      beyond them (a draft's KV for rejected tokens) must be dropped before the next propose.
    - free(seq): the sequence finished or was aborted; forget it.
    A proposer must never raise for one sequence's sake: it returns no proposal instead.
    """

    name: str = "proposer"

    @abstractmethod
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]: ...

    def on_accept(self, seq: Sequence, num_accepted: int) -> None:  # noqa: B027 - optional hook
        pass

    def rollback(self, seq: Sequence, num_tokens: int) -> None:  # noqa: B027 - optional hook
        pass

    def free(self, seq: Sequence) -> None:  # noqa: B027 - optional hook
        pass

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    max_n down to min_n) in its own prompt and output, and propose what followed it. Free, and
    strong where the output copies or repeats its context (summaries, code edits, loops)."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        return [Proposal(self.lookup(seq.token_ids, k)) for seq, k in zip(seqs, ks)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        size = len(tokens)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            pattern = tokens[size - n:]
            first = pattern[0]
            # Latest start i < size - n with tokens[i:i+n] == pattern.
            for i in range(size - n - 1, -1, -1):
                if tokens[i] == first and tokens[i:i + n] == pattern:
                    return tokens[i + n:i + n + k]
        return []
