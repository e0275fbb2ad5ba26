"""SelfDraftProposer: the target's own weights, quantized, drafting over the target's KV cache.

A draft trained apart agreed with SmolLM2 too rarely (bench/train_draft.py), but the target's
own weights in w4a8 (int4 by integer dot products: kernels/cpu_w4a8.py; the LM head in 4 bits
with its best candidates rescored: rescored_head.py) propose its greedy token ~85-100% of the
time at about a third of a bf16 decode's cost here.

It needs no KV cache of its own, and so no catch-up over the prompt or over what the target
accepted: its layers are bound to the target's cache tensors and read the target's K/V for
every committed position, which is also closer to what the target will compute than a copy the
draft made itself. A proposal for a sequence with n committed tokens runs k steps at
positions n-1 .. n+k-2, writing K/V into slots the scheduler reserved for the verify, which
then overwrites all of them with the target's own. Nothing is left to roll back.

The sequences of a step draft in lockstep: one forward per proposed position for all rows.
With `draft_ngram_min_tokens`, the n-gram lookup is asked first, as EAGLE does; off by
default: the draft is right more often than a match, even a long one (docs/speculative.md).
Tensor and pipeline parallel engines have no cache in this process to share: `draft` there
uses a DraftWorker with the same weights and a cache of its own (worker/spec/factory.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kernels import cpu_w4a8
from protos.messages import StepPlan
from worker.config import EngineConfig
from worker.model_runner import ModelRunner
from worker.sequence import Sequence
from worker.spec.processing import RowContext, draft_choice, draft_generator
from worker.spec.proposer import NO_PROPOSAL, NgramProposer, Proposal, Proposer
from worker.spec.rescored_head import CANDIDATES, RescoredHead, float_head_rows

log = logging.getLogger(__name__)


class SelfDraftProposer(Proposer):
    name = "draft"

    def __init__(self, target: ModelRunner, quantization: str, eos_token_ids: list[int], *,
                 seed: int = 0, ngram: NgramProposer | None = None,
                 ngram_min_tokens: int = 0, head_candidates: int = CANDIDATES) -> None:
        tc = target.config
        # The warm-up of a runner prefills max_num_batched_tokens tokens; a draft only ever
        # runs a few rows, so it warms up on a handful and gets a one-block cache, rebound below.
        config = EngineConfig(model=tc.model, dtype=str(target.dtype).removeprefix("torch."),
                              device=tc.device, block_size=tc.block_size,
                              kv_cache_bytes=target.block_bytes, enable_prefix_caching=False,
                              max_num_batched_tokens=16, num_threads=tc.num_threads,
                              quantization=quantization, quant_group_size=tc.quant_group_size)
        self.runner = ModelRunner(config, target.model_config, Path(tc.model))
        for mine, theirs in zip(self.runner.attn_layers, target.attn_layers, strict=True):
            mine.bind_cache(theirs.k_cache, theirs.v_cache)
        _share_embedding(self.runner.model, target.model)
        rows = float_head_rows(target.model)
        if (head_candidates and quantization == "w4a8" and rows is not None
                and rows.device.type == "cpu" and cpu_w4a8.available()):
            self.runner.model.lm_head = RescoredHead(rows, target.model_config.vocab_size,
                                                     head_candidates)
        self.block_size = tc.block_size
        self.eos_token_ids = list(eos_token_ids)
        self.generator = draft_generator(seed)
        self.ngram = ngram
        self.ngram_min_tokens = ngram_min_tokens
        self.proposals = {"draft": 0, "ngram": 0}  # non-empty proposals by source
        self._step = 0
        shared = self.runner.model.model.embed_tokens.weight
        own = self.runner.weight_bytes() - shared.numel() * shared.element_size()
        log.info("speculative draft: the target's own weights, %s, %.1f MiB of its own; KV "
                 "cache and embedding shared with the target", self.weight_format, own / 2**20)

    @property
    def weight_format(self) -> str:
        head = self.runner.model.lm_head
        if isinstance(head, RescoredHead):
            return (f"{self.runner.weight_format}; its LM head replaced by int4 with "
                    f"{head.candidates} candidates rescored from the target's")
        return self.runner.weight_format

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        out: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        found: dict[int, Proposal] = {}
        live = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0 or seq.num_computed_tokens + 1 != seq.num_tokens:
                continue
            if self.ngram is not None:
                tokens = self.ngram.model_for(seq).rollout(seq.token_ids, k)
                if len(tokens) >= self.ngram_min_tokens:
                    found[i] = Proposal(tokens)
                    continue
            live.append(i)
        self.proposals["ngram"] += len(found)
        self.proposals["draft"] += len(live)
        for r in range(max((ks[i] for i in live), default=0)):
            rows = [i for i in live if ks[i] > r]
            if not rows:
                break
            logits = self.runner.execute(self._plan(seqs, out, rows))
            for j, i in enumerate(rows):
                token, q = self._choose(logits[j], seqs[i], out[i])
                out[i].append(token)
                if q is not None:
                    probs[i].append(q)
            # a draft that ended its text stops there (the verify checks the end itself)
            live = [i for i in rows if seqs[i].params.ignore_eos
                    or out[i][-1] not in self.eos_token_ids]
        return [found[i] if i in found else
                Proposal(tokens, torch.stack(probs[i]) if probs[i] else None) if tokens
                else NO_PROPOSAL for i, tokens in enumerate(out)]

    def free(self, seq: Sequence) -> None:
        if self.ngram is not None:
            self.ngram.free(seq)

    def _plan(self, seqs: list[Sequence], out: list[list[int]], rows: list[int]) -> StepPlan:
        """One token per row: the last committed token, then each proposal in turn, at its
        position, with its slot in the sequence's (lookahead-reserved) blocks."""
        bs = self.block_size
        ids, positions, slots, lens, tables = [], [], [], [], []
        for i in rows:
            seq = seqs[i]
            pos = seq.num_tokens - 1 + len(out[i])
            ids.append(out[i][-1] if out[i] else seq.token_ids[-1])
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            tables.append(seq.block_table)
        self._step += 1
        n = len(rows)
        return StepPlan(self._step, ids, positions, slots, list(range(n + 1)), lens, tables,
                        list(range(n)))

    def _choose(self, row: torch.Tensor, seq: Sequence,
                drafted: list[int]) -> tuple[int, torch.Tensor | None]:
        """The next proposal and, for sampled requests, the distribution it was drawn from,
        processed as the target's will be (penalties over the text so far included)."""
        p = seq.params
        if p.greedy and not (p.has_penalties or p.min_tokens):
            return int(row.argmax()), None
        return draft_choice(row.float().unsqueeze(0),
                            RowContext(p, seq.token_ids + drafted, seq.num_prompt_tokens),
                            self.eos_token_ids, self.generator)


def _share_embedding(draft: torch.nn.Module, target: torch.nn.Module) -> None:
    """The draft's float embedding is the target's: one copy of 49152 x 576 is enough (its LM
    head, quantized, is its own)."""
    mine = draft.model.embed_tokens
    theirs = target.model.embed_tokens
    if mine.weight.shape == theirs.weight.shape and mine.weight.dtype == theirs.weight.dtype:
        mine.weight = theirs.weight
