"""RemoteEngine: what the offline LLM uses of an Engine, over a parallel replica's rank 0 actor.

A tensor/pipeline-parallel replica cannot live in the caller's process: each rank is an actor
in its own placement-group bundle (devices set by Ray). The offline API therefore starts the
same replica `tandem serve` would (cluster/parallel_replica.py) and drives it the way the router
does: one submit per batch, one long-poll per engine step, msgspec bytes both ways.

Driver-side, synchronous code: the blocking ray.get calls here never run on an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgspec
import ray

from cluster.placement import remove_group
from cluster.replica_actor import StartedReplica, start_replica
from cluster.serve_config import ReplicaSettings
from protos.messages import OutputDelta, PollResult, ReplicaStats, Request, encode
from worker.config import EngineConfig
from worker.engine import RequestError


class RemoteEngine:
    def __init__(self, config: EngineConfig, replica: ReplicaSettings, model_name: str) -> None:
        world = replica.tensor_parallel_size * replica.pipeline_parallel_size
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Logical CPUs: a laptop may run more ranks than cores (slowly, but correctly).
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, int(world * replica.num_cpus + 0.999)))
        self.replica: StartedReplica = asyncio.run(start_replica("offline", config, model_name,
                                                                 replica))
        self.card = self.replica.card
        self.max_model_len = self.card.max_model_len
        self.eos_token_ids = list(self.card.eos_token_ids)
        self._actor = self.replica.actor
        self._open: set[str] = set()
        self._queued: list[Request] = []  # submitted together with the next step's poll
        self._stats = ReplicaStats()
        self._poll = msgspec.msgpack.Decoder(PollResult)

    def validate(self, request: Request) -> None:
        error = ray.get(self._actor.validate.remote(encode(request)))
        if error is not None:
            raise RequestError(error)

    def add_request(self, request: Request) -> None:
        self._queued.append(request)
        self._open.add(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        ray.get(self._actor.abort.remote(encode(request_ids)))

    def has_unfinished(self) -> bool:
        return bool(self._open)

    def step(self) -> list[OutputDelta]:
        """The deltas of the next engine step(s): one long-poll."""
        if self._queued:
            queued, self._queued = self._queued, []
            ray.get(self._actor.submit.remote(encode(queued)))
        result = self._poll.decode(ray.get(self._actor.poll.remote(1.0)))
        if not result.stats.healthy and not result.deltas:
            error = ray.get(self._actor.health.remote())
            raise RuntimeError(f"the parallel replica failed: {error}")
        self._stats = result.stats
        for d in result.deltas:
            if d.finished:
                self._open.discard(d.request_id)
        return result.deltas

    def stats(self) -> ReplicaStats:
        """As of the last step."""
        return self._stats

    def timings(self) -> list[dict[str, float]]:
        return [msgspec.msgpack.decode(b) for b in ray.get(self._actor.timings.remote())]

    def shutdown(self) -> None:
        # Already dead is fine: removing the group below is what counts.
        with contextlib.suppress(Exception):
            ray.get(self._actor.shutdown.remote(), timeout=10)
        ray.kill(self._actor, no_restart=True)
        remove_group(self.replica.placement_group)
        if self._owns_ray:
            ray.shutdown()
