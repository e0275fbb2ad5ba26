"""A request's state inside the engine."""

from __future__ import annotations

import enum
from typing import Any

import torch

from protos.messages import Request, SampledLogprobs, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "block_hashes",
        "block_table",
        "detokenizer",
        "finish_reason",
        "generator",
        "logprobs",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_emitted_tokens",
        "num_prompt_tokens",
        "num_registered_blocks",
        "params",
        "request",
        "request_id",
        "status",
        "stop_reason",
        "token_ids",
    )

    def __init__(self, request: Request, detokenizer: Any = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.params: SamplingParams = request.sampling
        self.token_ids: list[int] = list(request.prompt_token_ids) + list(
            request.prior_output_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        # Tokens already streamed before a re-submission are not emitted again.
        self.num_emitted_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.logprobs: list[SampledLogprobs] = []
        self.generator: torch.Generator | None = None
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
