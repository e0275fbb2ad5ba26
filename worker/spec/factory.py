"""Builds an engine's SpecDecoder from its SpeculativeConfig (the registry of proposers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import torch

from kernels.cpu_decode_layer import MAX_ROWS
from kernels.linear import multi_row_matmul_is_flat
from worker.config import ConfigError
from worker.spec.config import GATED_MIN_ACCEPTANCE, SpeculativeConfig
from worker.spec.decoder import SpecDecoder
from worker.spec.proposer import NgramProposer, Proposer

# Tokens a speculative step scores on CPU with bf16 on AMX, unless set: batch 1 gets k = 8,
# batch 2 k = 7, batch 8 k = 1. The fused layer takes more, but each verify row costs ~0.07 ms
# plus its own pass over the context (~0.2 ms at 220 tokens; docs/speculative.md), which deeper
# drafts at batch 4-8 do not win back: 32 measured 1.19x against 1.29x at batch 4.
SPEC_STEP_TOKENS_AMX = 16


def resolve_draft_model(config: SpeculativeConfig, target_dir: str | Path) -> Path:
    """The draft's folder: --draft-model, else the target's own (a self-draft, which runs in
    config.draft_format: w4a8 unless set). A separately trained small draft lost to n-gram
    lookup here (bench/train_draft.py); the target's own weights in w4a8 agree with it ~96% of
    the time at a quarter of its cost per token (docs/speculative.md)."""
    return Path(config.draft_model) if config.draft_model else Path(target_dir)


def build_eagle(config: SpeculativeConfig, engine: Any) -> Proposer:
    from worker.parallel_runner import ParallelRunner
    from worker.spec.eagle_fused import FusedEagleLayer
    from worker.spec.eagle_head import check_feature_layers, load_eagle_head, shipped_head
    from worker.spec.eagle_proposer import EagleProposer

    runner = engine.runner
    if isinstance(runner, ParallelRunner):
        raise ConfigError("speculative method 'eagle' reads the target's hidden states in this "
                          "process: it needs tensor_parallel_size=1 and "
                          "pipeline_parallel_size=1 (use 'ngram' with parallelism)")
    folder = Path(config.draft_model) if config.draft_model else shipped_head(engine.config.model)
    if folder is None:
        raise ConfigError(f"speculative method 'eagle' has no head shipped for "
                          f"{Path(engine.config.model).name}: give --draft-model DIR "
                          "(bench/train_eagle.py trains one)")
    model = runner.model
    embed = model.model.embed_tokens.weight
    lm_head = getattr(model.lm_head, "weight", None)
    if lm_head is None or not lm_head.is_floating_point():  # an LM head run from int blocks
        if not model.config.tie_word_embeddings:
            raise ConfigError("speculative method 'eagle' needs the LM head in floats: this "
                              "model's runs from quantized blocks (--quantization gguf); use "
                              "another --quantization or none")
        lm_head = embed
    head = load_eagle_head(folder, embed, lm_head, runner.dtype)
    try:
        check_feature_layers(head.cfg.feature_layers, engine.model_config.num_layers)
    except ConfigError as e:
        raise ConfigError(f"the EAGLE head in {folder} does not fit this model: {e}; train one "
                          "for it with bench/train_eagle.py") from e
    ngram = NgramProposer(config.ngram_min, config.ngram_max) \
        if config.eagle_ngram_min_tokens else None
    layer = FusedEagleLayer(head, config.draft_kv_cache_bytes, engine.max_model_len) \
        if FusedEagleLayer.supported(head) else None
    return EagleProposer(head, min_confidence=config.eagle_min_confidence,
                         max_batch_size=config.max_batch_size, ngram=ngram,
                         ngram_min_tokens=config.eagle_ngram_min_tokens, layer=layer,
                         tree_width=config.eagle_tree_width,
                         tree_min_prob=config.eagle_tree_min_prob,
                         tree_keep_prob=config.eagle_tree_keep_prob)


def build_proposer(config: SpeculativeConfig, engine: Any,
                   draft_actors: list[Any] | None = None) -> Proposer:
    """`engine`: the worker.engine.Engine being built (its config, model config and eos ids)."""
    if config.method == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.method == "eagle":
        return build_eagle(config, engine)
    if config.method == "draft":
        from worker.parallel_runner import ParallelRunner
        from worker.spec.draft_proposer import DraftModelProposer
        from worker.spec.draft_worker import DraftWorker
        from worker.spec.self_draft import SelfDraftProposer

        if config.draft_model is None and not isinstance(engine.runner, ParallelRunner):
            ngram = NgramProposer(config.ngram_min, config.ngram_max) \
                if config.draft_ngram_min_tokens else None
            return SelfDraftProposer(engine.runner, config.draft_format, engine.eos_token_ids,
                                     seed=engine.config.seed, ngram=ngram,
                                     ngram_min_tokens=config.draft_ngram_min_tokens,
                                     head_candidates=config.draft_head_candidates)

        worker = DraftWorker(resolve_draft_model(config, engine.config.model), config,
                             target_vocab_size=engine.model_config.vocab_size,
                             device=engine.config.device, seed=engine.config.seed)
        return DraftModelProposer(worker, engine.eos_token_ids)
    if config.method == "pool":
        from worker.spec.pool import DraftPoolProposer

        if not draft_actors:
            raise ConfigError("speculative method 'pool' needs draft actors: start them with "
                              "worker.spec.draft_actor.start_draft_pool and pass draft_actors")
        return DraftPoolProposer(draft_actors, engine.eos_token_ids,
                                 engine.model_config.vocab_size, timeout_s=config.draft_timeout_s)
    raise ConfigError(f"unknown speculative method {config.method!r}")


def resolve_min_acceptance(config: SpeculativeConfig, device: torch.device,
                           dtype: torch.dtype) -> SpeculativeConfig:
    """Fills in min_acceptance when the user left it unset.

    n-gram lookup and EAGLE bound their own proposals (the rollout stops where its estimated
    chance of acceptance drops), so a low acceptance rate per proposed token does not mean a
    loss: on a Zen 5 CPU without AMX, EAGLE's tea answer ran at 1.64x with 38% of its drafted
    tokens accepted, and at 1.23x when the 0.3 threshold cut it to k=1 and switched it off.
    Where the measured gate runs (the default) it is the judge of whether speculating pays,
    so these proposers go ungated. Without the gate they are gated at 0.3 unless a verify costs
    about a decode (bf16 on AMX, CUDA): with AMX a 7-row verify cost 1.15 decodes, against 1.9
    with AVX-512 alone on the same Xeon. A draft model's proposals cost draft forwards, so low
    acceptance still stops them."""
    if config.min_acceptance is not None:
        return config
    self_limiting = config.method in ("ngram", "eagle")
    cheap = self_limiting and (config.measure_gate or multi_row_matmul_is_flat(device, dtype))
    return msgspec.structs.replace(config,
                                   min_acceptance=0.0 if cheap else GATED_MIN_ACCEPTANCE)


def resolve_max_step_tokens(config: SpeculativeConfig, device: torch.device,
                            dtype: torch.dtype) -> SpeculativeConfig:
    """Fills in max_step_tokens when the user left it unset. On CPU, a step of up to 16 tokens
    (bf16 on AMX: SPEC_STEP_TOKENS_AMX; 8 otherwise, the fused decode layer's limit there)
    costs 1-1.4 decodes; without AMX a bigger one falls to torch's GEMMs and costs several, so
    batch 2 at k=8 would lose what batch 1 at k=8 wins. On CUDA a verify is cheap at any batch
    speculation runs at."""
    if config.max_step_tokens is not None:
        return config
    if device.type == "cpu":
        limit = SPEC_STEP_TOKENS_AMX if multi_row_matmul_is_flat(device, dtype) else MAX_ROWS
    else:
        limit = config.max_batch_size * (config.num_speculative_tokens + 1)
    return msgspec.structs.replace(config, max_step_tokens=limit)


def build_spec_decoder(config: SpeculativeConfig, engine: Any,
                       draft_actors: list[Any] | None = None) -> SpecDecoder:
    config = resolve_min_acceptance(config, engine.runner.device, engine.runner.dtype)
    config = resolve_max_step_tokens(config, engine.runner.device, engine.runner.dtype)
    proposer = build_proposer(config, engine, draft_actors)
    engine.runner.keep_hidden = proposer.wants_features
    engine.runner.hidden_layers = proposer.feature_layers
    # Token trees need the accepted branch's K/V moved in every layer: one process holds them
    # all only without parallelism (ModelRunner.move_kv; ParallelRunner has none).
    return SpecDecoder(config, proposer, engine.eos_token_ids, engine.max_model_len,
                       engine.model_config.vocab_size,
                       move_kv=getattr(engine.runner, "move_kv", None),
                       block_size=engine.config.block_size)
