"""SpeculativeConfig: which proposer, how many tokens, and when speculation stands down."""

from __future__ import annotations

from typing import Literal

import msgspec

Method = Literal["ngram", "eagle", "draft", "pool"]
# The weight formats a draft may run in (worker/config.py: Quantization; gguf needs a .gguf)
DraftQuantization = Literal["int8", "int4", "w4a8"]


GATED_MIN_ACCEPTANCE = 0.3  # min_acceptance where verifying costs more than a decode


class SpeculativeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Speculative decoding settings of one engine (EngineConfig.speculative; None: off).

    k adapts per sequence between 1 and `num_speculative_tokens` from an EMA of its acceptance
    rate; a step with more running sequences than `max_batch_size` does not speculate (a batched
    forward is no longer bound by reading the weights, so extra positions cost real compute).
    """

    method: Method = "ngram"
    num_speculative_tokens: int = 8  # the most tokens proposed per sequence and step (k)
    # draft/pool: HF folder (None: the target's own weights, in draft_quantization); eagle: a
    # head folder from bench/train_eagle.py (None: the head shipped for the default model)
    draft_model: str | None = None
    # draft/pool: the draft's weight format. None: w4a8 for the target's own weights (int4 by
    # integer dot products, int8 LM head: ~4x cheaper per token than bf16 here and agreeing
    # with the target ~96% of the time), the checkpoint's own for a draft model
    draft_quantization: DraftQuantization | None = None
    draft_replicas: int = 1  # pool: number of draft actors, shared by all replicas
    draft_dtype: str = "auto"
    draft_kv_cache_bytes: int = 64 << 20  # each draft's own paged KV cache
    draft_num_cpus: float = 1.0  # pool: CPUs reserved per draft actor
    draft_num_gpus: float = 0.0  # pool: GPU share per draft actor (0: the draft runs on CPU)
    pool_name: str | None = None  # pool: actor name prefix, set by whoever starts the pool
    ngram_max: int = 4  # n-gram: longest suffix matched
    ngram_min: int = 1  # n-gram: shortest suffix matched (1-token suffixes need 2 sightings)
    # eagle: a rollout stops when the product of the head's top probabilities drops below this
    eagle_min_confidence: float = 0.3
    # eagle: the n-gram lookup's proposal wins where it runs to at least this many tokens
    # (copying and loops); 0: the head alone. 3: a 2-token match is right less often than the
    # head's tree (docs/speculative.md)
    eagle_ngram_min_tokens: int = 3
    # draft, the target's own weights: the same before the self-draft drafts; 0 (the default):
    # never. The draft agrees with the target on ~95% of chat tokens and a match far less
    # often: paired, chat mean 2.16x without the lookup, 2.03x at 8 tokens, 1.93x at 6 (which
    # gained on copying: the copy task 1.81x -> 2.15x, Austen 2.01x -> 2.23x)
    draft_ngram_min_tokens: int = 0
    # draft, the target's own weights in w4a8: its LM head in 4 bits with this many best
    # candidates rescored from the target's float head (worker/spec/rescored_head.py); 0: the
    # 8-bit head w4a8 gives any model
    draft_head_candidates: int = 16
    # eagle: draft a token tree this wide (each node's likeliest next tokens), verified in one
    # forward (worker/spec/tree.py); 1: a chain. Sampled requests walk it by rejection
    # sampling; tensor or pipeline parallel engines verify its first branch.
    # 2: on a Zen 5 CPU it beat chains on chat in three runs out of three (docs/speculative.md).
    eagle_tree_width: int = 2
    # eagle trees: stop growing when the likeliest unexpanded branch is less likely than this
    # (each depth is one more call of the head)
    eagle_tree_min_prob: float = 0.1
    # eagle trees: of the nodes grown, verify those the head gives at least this probability.
    # A node costs a verify row (~0.3 ms on the AMX Xeon, 1.5% of a step) and the head's
    # probabilities are calibrated (a node of probability p is accepted about p of the time),
    # so nodes well under tree_min_prob still pay (docs/speculative.md)
    eagle_tree_keep_prob: float = 0.03
    max_batch_size: int = 8  # more running sequences than this: no speculation this step
    # The most tokens a speculative step scores, proposals included: k per sequence is cut to
    # this // (decoding sequences) - 1. None: resolved where the engine is built
    # (worker/spec/factory.py) to the step size that still costs about one decode.
    max_step_tokens: int | None = None
    # A sequence whose acceptance EMA falls below this stops proposing, and k shrinks as the EMA
    # nears it. None: 0 for n-gram lookup and EAGLE, which bound their own proposals, where the
    # measured gate judges the cost (the default) or scoring extra positions is nearly free
    # (bf16 on AMX, CUDA); else 0.3 (worker/spec/factory.py).
    min_acceptance: float | None = None
    ema_decay: float = 0.7  # weight of the past in the acceptance EMA
    probe_every: int = 8  # a sequence that stopped proposing tries k=1 every this many steps
    # Per batch size, speculate only while speculative steps are measured to cost less wall
    # time per emitted token than plain steps (worker/spec/gate.py). False: always speculate
    # below max_batch_size.
    measure_gate: bool = True
    draft_timeout_s: float = 5.0  # pool: a draft actor slower than this counts as dead

    @property
    def draft_format(self) -> DraftQuantization | None:
        """The draft's weight format once defaults are applied."""
        if self.draft_quantization is None and self.draft_model is None:
            return "w4a8"
        return self.draft_quantization

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"speculative: {msg}")

        need(1 <= self.num_speculative_tokens <= 16,
             f"num_speculative_tokens must be in [1, 16] (got {self.num_speculative_tokens})")
        need(self.draft_replicas >= 1, f"draft_replicas must be >= 1 (got {self.draft_replicas})")
        need(1 <= self.ngram_min <= self.ngram_max,
             f"need 1 <= ngram_min <= ngram_max (got {self.ngram_min}, {self.ngram_max})")
        need(self.max_batch_size >= 1, f"max_batch_size must be >= 1 (got {self.max_batch_size})")
        need(self.max_step_tokens is None or self.max_step_tokens >= 2,
             f"max_step_tokens must be >= 2 (got {self.max_step_tokens})")
        need(self.min_acceptance is None or 0 <= self.min_acceptance < 1,
             "min_acceptance must be in [0, 1)")
        need(0 <= self.eagle_min_confidence < 1, "eagle_min_confidence must be in [0, 1)")
        need(1 <= self.eagle_tree_width <= 8,
             f"eagle_tree_width must be in [1, 8] (got {self.eagle_tree_width})")
        need(0 <= self.eagle_tree_min_prob < 1, "eagle_tree_min_prob must be in [0, 1)")
        need(0 <= self.eagle_tree_keep_prob < 1, "eagle_tree_keep_prob must be in [0, 1)")
        need(self.draft_head_candidates >= 0,
             f"draft_head_candidates must be >= 0 (got {self.draft_head_candidates})")
        need(self.eagle_ngram_min_tokens >= 0 and self.draft_ngram_min_tokens >= 0,
             "eagle_ngram_min_tokens and draft_ngram_min_tokens must be >= 0 (got "
             f"{self.eagle_ngram_min_tokens}, {self.draft_ngram_min_tokens})")
        need(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        need(self.draft_kv_cache_bytes > 0, "draft_kv_cache_bytes must be > 0")
        need(self.draft_timeout_s > 0, "draft_timeout_s must be > 0")
        need(self.draft_num_cpus > 0 and self.draft_num_gpus >= 0,
             "draft_num_cpus must be > 0 and draft_num_gpus >= 0")
