"""What crosses the boundary between a replica and a draft actor: msgspec Structs, never pickle.

One DraftBatch per actor per engine step carries every sequence that actor serves. A sequence is
sent incrementally: `prefix_len` says how many leading tokens the draft's copy still has right
(everything after is rolled back), `tokens` the target's tokens from there on.
"""

from __future__ import annotations

import msgspec

from protos.messages import SamplingParams


class DraftQuery(msgspec.Struct, frozen=True, array_like=True):
    seq_id: str
    prefix_len: int
    tokens: list[int]
    k: int
    num_prompt_tokens: int
    params: SamplingParams


class DraftBatch(msgspec.Struct, frozen=True, kw_only=True):
    queries: list[DraftQuery]
    freed: list[str] = []  # sequences that finished since the last batch
    eos_token_ids: list[int] = []


class DraftProposal(msgspec.Struct, frozen=True, array_like=True):
    """`probs`: float32 [len(tokens), vocab] draft distribution q, row-major (empty for greedy).
    `resync`: the draft lost this sequence (new actor, evicted): send it again from 0."""

    tokens: list[int]
    probs: bytes = b""
    resync: bool = False


class DraftReply(msgspec.Struct, frozen=True, kw_only=True):
    proposals: list[DraftProposal]
    seconds: float = 0.0
