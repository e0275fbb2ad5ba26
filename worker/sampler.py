"""Batched sampling: penalties, min_tokens, temperature, top-k, top-p, min-p, per-request seeds.

Work is only done for the rows that need it: a batch of greedy requests is one argmax, and the
sort for top-k/top-p runs only if some row asks for it. Seeded requests draw their noise from
their own generator, so their tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.argmax import argmax_rows
from protos.messages import SampledLogprobs, TokenLogprob
from worker.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """In place. Repetition penalty (CTRL, Keskar et al. 2019) over prompt and output;
    presence/frequency penalties (OpenAI) over the output only."""
    vocab = logits.shape[-1]
    for r in rows:
        p = seqs[r].params
        seq = seqs[r]
        row = logits[r]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device)
            seen = seen[seen < vocab].unique()
            vals = row.index_select(0, seen)
            vals = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            row.index_copy_(0, seen, vals)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k, top-p and min-p exclude. top_k == 0 and top_p == 1 keep all."""
    vocab = logits.shape[-1]
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * min_p.unsqueeze(-1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    need_k = bool((top_k > 0).any())
    need_p = bool((top_p < 1).any())
    if not (need_k or need_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if need_k:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(-1), float("-inf"))
    if need_p:
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        # The most likely token is always kept, whatever top_p.
        drop = before >= top_p.unsqueeze(-1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


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
            probs = sub.softmax(-1)
            # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) is a draw
            # from p, and lets each row use its own generator.
            noise = torch.empty_like(probs)
            shared = [i for i, r in enumerate(rand_rows) if seqs[r].generator is None]
            if shared:
                noise[shared] = torch.empty(len(shared), vocab).exponential_(
                    generator=self.generator)
            for i, r in enumerate(rand_rows):
                g = seqs[r].generator
                if g is not None:
                    noise[i].exponential_(generator=g)
            tokens.index_copy_(0, idx, argmax_rows(probs / noise))

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
