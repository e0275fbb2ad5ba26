"""Speculative decoding at the composition root: flags -> SpeculativeConfig, draft pool bring-up.

The draft pool is started once per deployment (by `LLM` or the serve router actor) and shared
by all replicas; replicas find its actors by name (SpeculativeConfig.pool_name).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import msgspec

from protos.messages import ReplicaStats
from worker.config import EngineConfig
from worker.spec.config import SpeculativeConfig


def speculative_config(method: str | None, *, draft_model: str | None = None,
                       num_speculative_tokens: int | None = None,
                       draft_replicas: int | None = None,
                       options: dict[str, Any] | None = None) -> SpeculativeConfig | None:
    """From the `--speculative`, `--draft-model`, `--num-speculative-tokens` and
    `--draft-replicas` flags, and any other SpeculativeConfig fields in `options` (as a serve
    YAML's engine.speculative takes them); None when speculation is off."""
    if method is None:
        if draft_model is not None or draft_replicas is not None or options:
            raise ValueError("--draft-model/--draft-replicas and speculative options need "
                             "--speculative ngram, eagle, draft or pool")
        return None
    fields: dict[str, Any] = {"method": method, **(options or {})}
    if draft_model is not None:
        fields["draft_model"] = draft_model
    if num_speculative_tokens is not None:
        fields["num_speculative_tokens"] = num_speculative_tokens
    if draft_replicas is not None:
        fields["draft_replicas"] = draft_replicas
    try:
        return msgspec.convert(fields, SpeculativeConfig)
    except msgspec.ValidationError as e:
        known = ", ".join(SpeculativeConfig.__struct_fields__)
        raise ValueError(f"speculative options: {e} (the fields are: {known})") from e


def speculation_summary(method: str, stats: ReplicaStats) -> str:
    """One line on how speculation went, for `tandem generate` (stderr): whether it paid shows
    in tokens per verification against the cost of a step, and a low rate says which prompts
    or proposer to look at. The same counters reach Prometheus under `tandem serve`."""
    v = stats.spec_verifications_total
    gated = (f"; {stats.spec_gated_steps_total} steps ran plain (the measured gate)"
             if stats.spec_gated_steps_total else "")
    if v == 0:
        return f"speculative decoding ({method}): no step verified a proposal{gated}"
    return (f"speculative decoding ({method}): {v} verifications, "
            f"{stats.spec_mean_accepted_length:.2f} tokens each; "
            f"{stats.spec_accepted_tokens_total} of {stats.spec_proposed_tokens_total} proposed "
            f"tokens accepted ({stats.spec_acceptance_rate:.0%}); proposer "
            f"{1e3 * stats.spec_proposer_seconds_total / v:.2f} ms per verification{gated}")


def _pool_args(config: EngineConfig) -> tuple[SpeculativeConfig, Path, int]:
    from worker.config import ModelConfig
    from worker.spec.factory import resolve_draft_model

    spec = config.speculative
    assert spec is not None and spec.method == "pool"
    vocab = ModelConfig.from_hf_dir(config.model).vocab_size
    return spec, resolve_draft_model(spec, config.model), vocab


def start_pool(config: EngineConfig) -> list[Any]:
    """For `LLM`: starts the pool (a local Ray first, if none is connected)."""
    import ray

    from worker.spec.draft_actor import start_draft_pool

    spec, draft, vocab = _pool_args(config)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return start_draft_pool(spec, draft, vocab, seed=config.seed)


async def start_pool_for_serve(config: EngineConfig) -> tuple[EngineConfig, list[Any]]:
    """For `tandem serve` (inside the router actor's event loop): starts named draft actors and
    returns the engine config that lets replicas find them."""
    from worker.spec.draft_actor import create_draft_pool, stop_draft_pool

    spec, draft, vocab = _pool_args(config)
    spec = msgspec.structs.replace(spec, pool_name=f"tandem-draft-{uuid.uuid4().hex[:8]}")
    actors = create_draft_pool(spec, draft, vocab, seed=config.seed, name_prefix=spec.pool_name)
    try:
        await asyncio.gather(*(a.ready.remote() for a in actors))
    except BaseException:
        stop_draft_pool(actors)
        raise
    return msgspec.structs.replace(config, speculative=spec), actors
