"""DraftActor: one draft model with its own paged KV, as a Ray actor serving every replica.

Bytes in, bytes out (msgspec DraftBatch -> DraftReply): Ray never pickles client data.
`start_draft_pool` creates the pool (named `{prefix}-{i}` when a prefix is given, so that
replicas started later find the actors by name) and waits until every draft is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import ray

from protos.messages import encode
from worker.spec.config import SpeculativeConfig

log = logging.getLogger(__name__)


class DraftActor:
    def __init__(self, model_dir: str, spec: bytes, target_vocab_size: int, seed: int,
                 num_threads: int) -> None:
        from worker.spec.draft_worker import DraftWorker
        from worker.spec.messages import DraftBatch

        config = msgspec.msgpack.decode(spec, type=SpeculativeConfig)
        device = "cuda" if config.draft_num_gpus > 0 else "cpu"
        self.worker = DraftWorker(model_dir, config, target_vocab_size=target_vocab_size,
                                  device=device, seed=seed, num_threads=num_threads)
        self._batch = msgspec.msgpack.Decoder(DraftBatch)

    def ready(self) -> int:
        return self.worker.kv.num_blocks

    def propose(self, batch: bytes) -> bytes:
        return encode(self.worker.propose(self._batch.decode(batch)))


def pool_actor_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i}"


def create_draft_pool(spec: SpeculativeConfig, draft_dir: str | Path, target_vocab_size: int, *,
                      seed: int = 0, name_prefix: str | None = None) -> list[Any]:
    """Creates spec.draft_replicas DraftActors without waiting for them (await `ready`)."""
    cls = ray.remote(DraftActor)
    threads = max(1, int(spec.draft_num_cpus))
    actors = []
    for i in range(spec.draft_replicas):
        opts: dict[str, Any] = {"num_cpus": spec.draft_num_cpus,
                                "num_gpus": spec.draft_num_gpus, "max_restarts": 0}
        if name_prefix is not None:
            opts["name"] = pool_actor_name(name_prefix, i)
        actors.append(cls.options(**opts).remote(str(draft_dir), encode(spec),
                                                 target_vocab_size, seed + i, threads))
    return actors


def start_draft_pool(spec: SpeculativeConfig, draft_dir: str | Path, target_vocab_size: int, *,
                     seed: int = 0, name_prefix: str | None = None,
                     timeout_s: float = 600.0) -> list[Any]:
    """Starts the pool on the current Ray cluster and waits until every draft is loaded
    (blocking: not for async code, which awaits `ready` of create_draft_pool's actors)."""
    actors = create_draft_pool(spec, draft_dir, target_vocab_size, seed=seed,
                               name_prefix=name_prefix)
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
    except BaseException:
        stop_draft_pool(actors)
        raise
    log.info("draft pool: %d actors on %s", len(actors), draft_dir)
    return actors


def find_draft_pool(spec: SpeculativeConfig) -> list[Any]:
    """The handles of a pool started with name_prefix=spec.pool_name."""
    if spec.pool_name is None:
        raise ValueError("speculative.pool_name is not set: the pool was started without names")
    return [ray.get_actor(pool_actor_name(spec.pool_name, i))
            for i in range(spec.draft_replicas)]


def stop_draft_pool(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("draft actor kill: %s", exc)
