"""Batched sampling: penalties, min_tokens, temperature, top-k, top-p, min-p, per-request seeds.

Work is only done for the rows that need it: a batch of greedy requests is one argmax, and the
top-k/top-p filter (a partial sort) runs only for rows that ask for it. Seeded requests draw
their random numbers from their own generator, so their tokens do not depend on what else is
in the batch.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.argmax import argmax_rows
from protos.messages import SampledLogprobs, SamplingParams, TokenLogprob
from worker.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """In place. Repetition penalty (CTRL, Keskar et al. 2019) over prompt and output;
    presence/frequency penalties (OpenAI) over the output only.

    All rows at once, on the tokens they have seen (keys row * vocab + token into the flat
    logits): per row and step, a full-vocabulary bincount and three passes over the row cost
    ~0.4 ms, 26 ms for a batch of 64."""
    vocab = logits.shape[-1]
    flat = logits.view(-1)

    def keys(which: list[int], ids: Callable[[Sequence], list[int]]) -> torch.Tensor:
        lists = [ids(seqs[r]) for r in which]
        tokens = torch.empty(0, dtype=torch.long)
        if any(lists):  # one C loop over all the ids: torch.tensor of a list costs 3x more
            tokens = torch.frombuffer(array("q", itertools.chain.from_iterable(lists)),
                                      dtype=torch.long)
        rows_of = torch.repeat_interleave(torch.tensor(which, dtype=torch.long),
                                          torch.tensor([len(t) for t in lists]))
        ok = tokens < vocab
        return (rows_of[ok] * vocab + tokens[ok]).to(logits.device)

    def per_row(which: list[int], value: Callable[[SamplingParams], float],
                at: torch.Tensor) -> torch.Tensor:
        table = torch.zeros(logits.shape[0], dtype=logits.dtype)
        table[which] = torch.tensor([value(seqs[r].params) for r in which], dtype=logits.dtype)
        return table.to(logits.device)[at // vocab]

    rep = [r for r in rows if seqs[r].params.repetition_penalty != 1.0]
    if rep:
        # A token seen twice is written twice with the same value, computed from the logit
        # before any write: no need to deduplicate.
        seen = keys(rep, lambda s: s.token_ids)
        pen = per_row(rep, lambda p: p.repetition_penalty, seen)
        vals = flat[seen]
        flat[seen] = torch.where(vals > 0, vals / pen, vals * pen)
    pf = [r for r in rows
          if seqs[r].params.presence_penalty != 0.0 or seqs[r].params.frequency_penalty != 0.0]
    if pf:
        seen, counts = keys(pf, lambda s: s.output_token_ids).unique(return_counts=True)
        if len(seen):
            freq = per_row(pf, lambda p: p.frequency_penalty, seen)
            pres = per_row(pf, lambda p: p.presence_penalty, seen)
            flat.index_add_(0, seen, -(counts.to(logits.dtype) * freq + pres))


# Tokens per block of draw_rows' two-level cumulative sum
DRAW_BLOCK = 256


def draw_rows(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token per row of `weights` [n, V] (non-negative, not necessarily normalized), drawn
    by inverting the row's cumulative sum at the uniforms u [n] in [0, 1).

    One random number per row: torch.multinomial and an exponential race over 49152 tokens cost
    ~1.1-1.2 ms a row on this CPU. The sum is taken in two levels, blocks of DRAW_BLOCK tokens
    and then within the block the target falls in (float64), so nothing of the row's size is
    allocated: a whole-row float64 cumsum of 64 rows took 19 ms in fresh pages. A token of
    weight 0 is never drawn: the search takes the first cumulative sum that exceeds the target,
    and rounding that would run past a row's last positive block or token stops there."""
    n, vocab = weights.shape
    pad = -vocab % DRAW_BLOCK
    w = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = w.view(n, -1, DRAW_BLOCK)
    cdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [n, blocks]
    target = u.to(torch.float64) * cdf[:, -1]
    last = (cdf < cdf[:, -1:]).sum(-1)  # the last block with weight
    b = torch.minimum(torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1),
                      last)
    rows = torch.arange(n)
    target = target - torch.where(b > 0, cdf[rows, (b - 1).clamp(min=0)], 0.0)
    inner = blocks[rows, b].to(torch.float64).cumsum(-1)  # [n, DRAW_BLOCK]
    last = (inner < inner[:, -1:]).sum(-1)  # the block's last token with weight
    i = torch.minimum(torch.searchsorted(inner, target.unsqueeze(-1), right=True).squeeze(-1),
                      last)
    return b * DRAW_BLOCK + i


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a row of non-negative weights [V] (see draw_rows)."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return int(draw_rows(weights.unsqueeze(0), u)[0])


# Tokens sorted first by top-k / top-p: a row's nucleus almost always lies among them
TOP_CANDIDATES = 256


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k, top-p and min-p exclude. top_k == 0 and top_p == 1 keep all.

    Sorting a whole 49k-token row costs ~5 ms on a CPU, about what a decode step of a 135M
    model does, and a speculative step filters k + 1 rows. So only the likeliest tokens are
    sorted (torch.topk): the largest top_k where every row has one, else TOP_CANDIDATES (or
    that top_k if larger), widened while a row's nucleus reaches past them, the whole row at
    worst. Tokens past the candidates are dropped only where top-k or top-p is sure to drop
    them, so the result is the full sort's."""
    vocab = logits.shape[-1]
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * min_p.unsqueeze(-1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    cut = k < vocab
    nucleus = top_p < 1
    rows = (cut | nucleus).nonzero().flatten()
    if len(rows) == 0:
        return logits
    if len(rows) < len(k):  # rows without a filter stay as they are
        out = logits.clone()
        out[rows] = apply_top_k_top_p_min_p(logits[rows], top_k[rows], top_p[rows],
                                            torch.zeros(len(rows)))
        return out
    # top-k alone needs its k likeliest tokens only; top-p starts from TOP_CANDIDATES
    kmax = int(k[cut].max()) if bool(cut.any()) else 0
    return _top_k_top_p(logits, k, top_p,
                        kmax if bool(cut.all()) else max(TOP_CANDIDATES, kmax))


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                 width: int) -> torch.Tensor:
    """Top-k (k: a rank per row, vocab for none) and top-p over the `width` likeliest tokens
    of each row; rows whose nucleus reaches past them go again, four times as wide."""
    vocab = logits.shape[-1]
    width = vocab if width * 2 > vocab else width
    cut, nucleus = k < vocab, top_p < 1
    vals, order = (logits.topk(width, dim=-1) if width < vocab
                   else logits.sort(dim=-1, descending=True))
    ranks = torch.arange(width, device=logits.device).unsqueeze(0)
    vals = vals.masked_fill(ranks >= k.unsqueeze(-1), float("-inf"))
    wider = None
    if bool(nucleus.any()):
        # top-p's probabilities are taken after top-k: over the top k where top-k cuts, else
        # over the whole row
        probs = vals.softmax(-1)
        if not bool(cut.all()):
            probs = torch.where(cut.unsqueeze(-1), probs, logits.softmax(-1).gather(-1, order))
        mass = probs.cumsum(-1)
        # by the mass of the strictly likelier tokens (rows with top_p 1 keep all: their
        # cumulative sums may round to 1 before the end)
        drop = (mass - probs >= top_p.unsqueeze(-1)) & nucleus.unsqueeze(-1)
        drop[:, 0] = False  # the most likely token is always kept, whatever top_p
        vals = vals.masked_fill(drop, float("-inf"))
        # Past the candidates every token has at least mass[:, -1] before it: top-p drops it
        # where that reaches top_p; elsewhere (and not cut by top-k inside the candidates)
        # the row goes again, wider.
        if width < vocab:
            wider = (nucleus & ~cut & (mass[:, -1] < top_p)).nonzero().flatten()
    out = torch.full_like(logits, float("-inf")).scatter_(-1, order, vals)
    if wider is not None and len(wider):
        out[wider] = _top_k_top_p(logits[wider], k[wider], top_p[wider], width * 4)
    return out


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int = 0) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits.float()
        n, vocab = logits.shape
        params = [s.params for s in seqs]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = logits.log_softmax(-1)

        # min_tokens: eos and stop tokens are impossible until enough tokens exist.
        for r, s in enumerate(seqs):
            p = s.params
            if p.min_tokens and s.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < vocab]
                if banned:
                    logits[r, banned] = float("-inf")
        pen_rows = [r for r, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            apply_penalties(logits, seqs, pen_rows)

        tokens = argmax_rows(logits)
        rand_rows = [r for r, p in enumerate(params) if not p.greedy]
        if rand_rows:
            idx = torch.tensor(rand_rows)
            sub = logits.index_select(0, idx)
            temps = torch.tensor([params[r].temperature for r in rand_rows])
            sub = sub / temps.unsqueeze(-1)
            sub = apply_top_k_top_p_min_p(
                sub,
                torch.tensor([params[r].top_k for r in rand_rows]),
                torch.tensor([params[r].top_p for r in rand_rows]),
                torch.tensor([params[r].min_p for r in rand_rows]),
            )
            # One uniform per row, from the row's own generator where it has one, so a seeded
            # request's tokens do not depend on the batch.
            u = torch.empty(len(rand_rows), dtype=torch.float64)
            shared = [i for i, r in enumerate(rand_rows) if seqs[r].generator is None]
            if shared:
                u[shared] = torch.rand(len(shared), generator=self.generator,
                                       dtype=torch.float64)
            for i, r in enumerate(rand_rows):
                g = seqs[r].generator
                if g is not None:
                    u[i] = torch.rand((), generator=g, dtype=torch.float64)
            tokens.index_copy_(0, idx, draw_rows(sub.softmax(-1), u))

        token_list = tokens.tolist()
        lps: list[SampledLogprobs | None] = [None] * n
        if raw_logprobs is not None:
            for r, p in enumerate(params):
                if p.logprobs is None:
                    continue
                row = raw_logprobs[r]
                tok = token_list[r]
                lp = float(row[tok])
                rank = int((row > row[tok]).sum()) + 1
                top: list[TokenLogprob] = []
                if p.logprobs > 0:
                    vals, ids = row.topk(p.logprobs)
                    top = [TokenLogprob(int(t), float(v), i + 1)
                           for i, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()))]
                lps[r] = SampledLogprobs(TokenLogprob(tok, lp, rank), top)
        return SamplerOutput(token_list, lps)
