"""Contracts between Tandem's parts, as msgspec Structs.

These are the only types that cross a process boundary inside Tandem (router <-> replica,
rank 0 <-> other ranks). They are encoded with msgspec (msgpack), never pickled. The public
edge (gRPC) is protobuf; the router translates between the two.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]


def _check(ok: bool, field: str, allowed: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed} (got {got!r})")


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to pick tokens and when to stop. Validated on construction and on decode."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) turns top-k off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per sampled token; 0: only the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               "a finite number >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k >= -1, "top_k", ">= 0 (0 or -1 disables it)", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", "> 0 (1 disables it)", self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]",
               self.frequency_penalty)
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", "in [0, 2**63)", self.seed)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1",
               self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "a list of non-empty strings", self.stop)
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "non-negative token ids", self.stop_token_ids)
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "in [0, 20]",
               self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request as a replica sees it: already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    # Tokens already generated (and already streamed to the client) before this request was
    # re-submitted, e.g. after its replica died. They count as output for max_tokens and
    # penalties but are not streamed again.
    prior_output_token_ids: list[int] = []
    # Mixed into prefix-cache block hashes: requests with different salts never share blocks.
    cache_salt: str | None = None
    arrival_time: float = 0.0


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float
    rank: int  # 1 = most likely


class SampledLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """The sampled token's logprob and the top-n alternatives at that position."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


class OutputDelta(msgspec.Struct, frozen=True, kw_only=True):
    """What one engine step added to one request."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list[SampledLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # all output tokens so far, this delta included
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput(msgspec.Struct, kw_only=True):
    """A finished request, assembled from its deltas (offline API)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[SampledLogprobs] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class StepPlan(msgspec.Struct, frozen=True, array_like=True):
    """One engine step, flattened: what rank 0 broadcasts so that every rank runs the same forward.

    Tokens of all scheduled sequences are concatenated (no padding). Sequence i owns tokens
    [query_start[i], query_start[i+1]) and, after this step, holds seq_lens[i] tokens of KV.
    """

    step_id: int
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start: list[int]  # len = num_seqs + 1
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_indices: list[int]  # flat token indices whose logits are needed
    # Tree attention (kernels/paged_attention.py): per token, keys hidden from it; empty: causal.
    attn_holes: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class ReplicaStats(msgspec.Struct, kw_only=True):
    replica_id: str = ""
    num_running: int = 0
    num_waiting: int = 0
    num_preempted_total: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits_total: int = 0  # of which found
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    healthy: bool = True
    # Speculative decoding (zero without it): proposed/accepted tokens, verifications of a
    # non-empty proposal, tokens those emitted (accepted + 1 each), time spent proposing.
    spec_proposed_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_verifications_total: int = 0
    spec_emitted_tokens_total: int = 0
    spec_proposer_seconds_total: float = 0.0
    spec_gated_steps_total: int = 0  # steps the measured gate ran plain (worker/spec/gate.py)

    @property
    def kv_usage(self) -> float:
        if self.kv_blocks_total == 0:
            return 0.0
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits_total / self.prefix_queries_total if self.prefix_queries_total else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        p = self.spec_proposed_tokens_total
        return self.spec_accepted_tokens_total / p if p else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        v = self.spec_verifications_total
        return self.spec_emitted_tokens_total / v if v else 0.0


class PollResult(msgspec.Struct, kw_only=True):
    """The answer to one long-poll of a replica: the deltas of every request since the last poll."""

    deltas: list[OutputDelta]
    stats: ReplicaStats


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """What the router needs to know about the served model, without importing the worker."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int


_ENCODER = msgspec.msgpack.Encoder()


def encode(obj: msgspec.Struct | list) -> bytes:
    return _ENCODER.encode(obj)


def decoder(tp: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(tp)
