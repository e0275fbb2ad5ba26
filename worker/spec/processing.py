"""The sampler's logit processing, row by row, for a target or a draft with a given history.

Lossless speculation needs p (target) and q (draft) processed alike (Leviathan et al. 2023,
sec. 2.3): the same min_tokens bans, repetition/presence/frequency penalties, temperature,
top-k, top-p and min-p, each row seeing the history it would have had without speculation
(the committed tokens plus the proposed tokens before it). This mirrors worker.sampler.Sampler.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from protos.messages import SamplingParams
from worker.sampler import apply_penalties, apply_top_k_top_p_min_p, draw


class RowContext:
    """The history one logits row is conditioned on (duck-types what apply_penalties reads)."""

    __slots__ = ("num_prompt_tokens", "params", "token_ids")

    def __init__(self, params: SamplingParams, token_ids: list[int],
                 num_prompt_tokens: int) -> None:
        self.params = params
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def penalized(logits: torch.Tensor, rows: Seq[RowContext], eos_token_ids: Seq[int]) -> torch.Tensor:
    """min_tokens bans and penalties, in place on fp32 logits [R, V]; greedy takes the argmax."""
    vocab = logits.shape[-1]
    for r, ctx in enumerate(rows):
        p = ctx.params
        if p.min_tokens and ctx.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            banned = [t for t in banned if t < vocab]
            if banned:
                logits[r, banned] = float("-inf")
    pen = [r for r, ctx in enumerate(rows) if ctx.params.has_penalties]
    if pen:
        apply_penalties(logits, list(rows), pen)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p and softmax of penalized logits [R, V] of one request."""
    n = logits.shape[0]
    x = logits / params.temperature
    x = apply_top_k_top_p_min_p(x, torch.full((n,), params.top_k), torch.full((n,), params.top_p),
                                torch.full((n,), params.min_p))
    return x.softmax(-1)


class RowProbabilities:
    """`probabilities` of a verify block [R, V], one row at a time when first read: rejection
    sampling reads the rows down to its first rejection only, and filtering a row for top-p
    costs ~0.5-1.8 ms, so rows past the rejection are never processed. Rows are independent,
    so a row comes out as it would from the whole block."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams) -> None:
        self.logits = logits
        self.params = params
        self._rows: dict[int, torch.Tensor] = {}

    def __getitem__(self, r: int) -> torch.Tensor:
        row = self._rows.get(r)
        if row is None:
            row = self._rows[r] = probabilities(self.logits[r:r + 1], self.params)[0]
        return row


def draft_choice(logits: torch.Tensor, ctx: RowContext, eos_token_ids: Seq[int],
                 generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """A draft model's next proposal from its fp32 logits [1, V] over the target's vocabulary
    (edited in place), processed as the target's row will be: the token and, for sampled
    requests, the distribution q it was drawn from (None for greedy ones)."""
    penalized(logits, [ctx], eos_token_ids)
    if ctx.params.greedy:
        return int(logits.argmax()), None
    dist = probabilities(logits, ctx.params)[0]
    return draw(dist, generator), dist


# Added to the engine's seed for a draft's own generator (see draft_generator).
DRAFT_SEED_OFFSET = 0x5EED_D4AF


def draft_generator(seed: int) -> torch.Generator:
    """The generator a draft model samples its proposals with. Not the sampler's: seeded alike,
    the two streams ran in step, so the verifier's uniform for a token was the very number the
    draft had drawn it with; acceptance then depended on the draw, and sampled outputs of a
    draft model left the target's distribution (tests/spec/test_self_draft.py)."""
    return torch.Generator().manual_seed(seed + DRAFT_SEED_OFFSET)
