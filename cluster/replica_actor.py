"""ReplicaActor: the Ray actor hosting one replica's engine (rank 0), and how to start one.

Everything crossing the actor boundary is msgspec-msgpack bytes (Requests, PollResults,
ReplicaStats, ModelCard): Ray never pickles client data. The actor is async with room for
several calls at once, so a long-poll waiting for the next step never holds up a submit or an
abort. In a tensor/pipeline-parallel replica this is rank 0; the other ranks are RankActors in
the same placement group (cluster/parallel_replica.py), fed each step's plan by broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import msgspec
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.delta_stream import DeltaStreamServer
from cluster.placement import (
    create_replica_group,
    remove_group,
    replica_bundles,
    wait_until_ready,
)
from cluster.serve_config import EngineSettings, ReplicaSettings
from protos.messages import ModelCard, Request, encode
from worker.config import EngineConfig

log = logging.getLogger(__name__)

# poll, submit, abort, stats and health may all be in flight together; the margin covers
# callers that retry after a timeout while an earlier call is still running.
MAX_CONCURRENCY = 32


class ReplicaActor:
    """Rank 0 of a replica: owns the AsyncEngine. Built with ray.remote in start_replica."""

    def __init__(self, replica_id: str, engine_config: bytes, model_name: str,
                 rank: int = 0, parallel: bytes | None = None,
                 peers: list[Any] | None = None) -> None:
        """`parallel`: a worker.distributed.ParallelSpec (msgpack) when the replica has other
        ranks; `peers`: their RankActor handles, checked by health()."""
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Imported here so that importing this module (router side) stays free of torch.
        from text.detokenizer import IncrementalDetokenizer
        from text.tokenizer import Tokenizer
        from worker.async_engine import AsyncEngine
        from worker.engine import Engine

        if rank != 0:
            raise ValueError("ReplicaActor is rank 0; other ranks are cluster.rank_actor.RankActor")
        config = msgspec.msgpack.decode(engine_config, type=EngineConfig)
        model_dir = Path(config.model)
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() \
            else None
        spec = None
        if parallel is not None:
            from worker.distributed import ParallelSpec

            spec = msgspec.msgpack.decode(parallel, type=ParallelSpec)
        self.peers = list(peers or [])
        draft_actors = None
        if config.speculative is not None and config.speculative.method == "pool":
            from worker.spec.draft_actor import find_draft_pool

            draft_actors = find_draft_pool(config.speculative)  # started by the router actor
        self.runner = None

        def build() -> Engine:
            # Runs on the engine's step thread: all of this process's torch work happens on
            # one thread (worker/async_engine.py says why).
            if spec is not None:
                from worker.rank_worker import build_parallel_runner

                self.runner = build_parallel_runner(config, spec, rank=0)
            return Engine(config, model_dir, tokenizer,
                          IncrementalDetokenizer if tokenizer is not None else None,
                          runner=self.runner, draft_actors=draft_actors)

        self.engine = AsyncEngine(build, replica_id=replica_id)
        engine = self.engine.engine
        self.replica_id = replica_id
        self.card = ModelCard(name=model_name, max_model_len=engine.max_model_len,
                              vocab_size=engine.model_config.vocab_size,
                              eos_token_ids=list(engine.eos_token_ids),
                              block_size=config.block_size)
        self._requests = msgspec.msgpack.Decoder(list[Request])
        self._ids = msgspec.msgpack.Decoder(list[str])
        self._stream = DeltaStreamServer(self.engine.poll)
        log.info("replica %s ready: %s, %d KV blocks", replica_id, model_name,
                 engine.kv.num_blocks)
        # GPU utilisation/memory/temperature/power as Ray metrics; None without GPU or NVML.
        from cluster.gpu_telemetry import GpuTelemetry

        self.telemetry = GpuTelemetry.start(ray.get_gpu_ids(),
                                            {"model": model_name, "replica": replica_id})

    async def ready(self) -> bytes:
        return encode(self.card)

    async def submit(self, requests: bytes) -> None:
        self.engine.submit(self._requests.decode(requests))

    async def poll(self, timeout_s: float) -> bytes:
        return encode(await self.engine.poll(timeout_s))

    async def delta_stream(self) -> bytes:
        """Where the router reads this replica's poll results from without a Ray call per
        step (cluster/delta_stream.py): a StreamAddress on this node, with its secret."""
        return encode(await self._stream.start(ray.util.get_node_ip_address()))

    async def delta_stream_connected(self) -> bool:
        """Whether the router reads poll results from the delta stream (False: it polls through
        actor calls, or has not polled yet)."""
        return self._stream.connected

    async def abort(self, request_ids: bytes) -> None:
        self.engine.abort(self._ids.decode(request_ids))

    async def stats(self) -> bytes:
        return encode(self.engine.stats())

    async def health(self) -> str | None:
        """None when healthy, else why not (the engine's failure, or a rank that is gone)."""
        if self.engine.error is not None or not self.peers:
            return self.engine.error
        # A rank that died while the replica was idle is noticed here, not only at the next step.
        answers = await asyncio.gather(*(p.health.remote() for p in self.peers),
                                       return_exceptions=True)
        for rank, answer in enumerate(answers, start=1):
            if isinstance(answer, BaseException):
                return f"rank {rank} is gone: {type(answer).__name__}"
            if answer is not None:
                return answer
        return None

    async def validate(self, request: bytes) -> str | None:
        """Why the engine would refuse this Request, or None (the offline API checks a whole
        batch before submitting any)."""
        try:
            self.engine.engine.validate(msgspec.msgpack.decode(request, type=Request))
        except ValueError as exc:
            return str(exc)
        return None

    async def rank_actors(self) -> list[Any]:
        """The other ranks' actor handles (rank 1 first); for tests and operators."""
        return list(self.peers)

    async def timings(self) -> list[bytes]:
        """Per-rank step timings (rank order) of a parallel replica; bench/parallel.py."""
        if self.runner is None:
            return []
        rest = await asyncio.gather(*(p.timings.remote() for p in self.peers))
        return [msgspec.msgpack.encode(self.runner.timings()), *rest]

    async def where(self) -> bytes:
        """The node and devices this replica (its rank 0) runs on, for `tandem status`."""
        from cluster.status import replica_placement

        return encode(replica_placement())

    async def shutdown(self) -> None:
        if self.telemetry is not None:
            self.telemetry.stop()
        await self._stream.close()
        self.engine.shutdown()
        if self.runner is not None and not self.engine._thread.is_alive():
            # The step thread is gone, so this thread may use the plan channel: let the other
            # ranks leave their loops (they are killed with the placement group anyway).
            with contextlib.suppress(Exception):
                self.runner.stop_peers()


class StartedReplica(msgspec.Struct, kw_only=True):
    """A running replica: its actor, its placement group and what it serves."""

    replica_id: str
    actor: Any  # ray.actor.ActorHandle
    placement_group: PlacementGroup
    card: ModelCard


def engine_config_for(settings: EngineSettings, replica: ReplicaSettings,
                      model_dir: str) -> EngineConfig:
    config = settings.engine_config(model_dir)
    if config.num_threads is None and not replica.num_gpus:
        # torch's threads match the CPUs reserved for the replica, not the whole machine.
        config = msgspec.structs.replace(config, num_threads=max(1, int(replica.num_cpus)))
    return config


async def start_replica(replica_id: str, config: EngineConfig, model_name: str,
                        replica: ReplicaSettings) -> StartedReplica:
    """Reserves a placement group, starts the actor in it and waits until the model is loaded.

    On any failure the group is removed and the actor killed before the error propagates.
    """
    if replica.tensor_parallel_size * replica.pipeline_parallel_size > 1:
        from cluster.parallel_replica import start_parallel_replica

        return await start_parallel_replica(replica_id, config, model_name, replica)
    bundles = replica_bundles(replica.num_cpus, replica.num_gpus, replica.tensor_parallel_size,
                              replica.pipeline_parallel_size, replica.resources)
    pg = create_replica_group(f"tandem-{replica_id}", bundles)
    actor = None
    try:
        await wait_until_ready(pg, bundles, replica.start_timeout_s)
        actor_class = ray.remote(ReplicaActor)
        actor = actor_class.options(
            name=None,  # not a named actor: the controller that made it holds the only handle
            num_cpus=bundles[0]["CPU"],
            num_gpus=bundles[0].get("GPU", 0),
            max_concurrency=MAX_CONCURRENCY,
            max_restarts=0,  # the controller replaces a dead replica with a fresh one
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0,
                placement_group_capture_child_tasks=True),
        ).remote(replica_id, encode(config), model_name)
        card_bytes = await _with_timeout(actor.ready.remote(), replica.start_timeout_s,
                                         f"replica {replica_id} did not load the model")
        card = msgspec.msgpack.decode(card_bytes, type=ModelCard)
    except BaseException:
        if actor is not None:
            ray.kill(actor, no_restart=True)
        remove_group(pg)
        raise
    return StartedReplica(replica_id=replica_id, actor=actor, placement_group=pg, card=card)


async def _with_timeout(ref: Any, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what} within {timeout_s:g} s") from None
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"{what}: the actor died while starting: {exc}") from None
