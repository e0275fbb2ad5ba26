"""RayReplicaHandle: the router's ReplicaHandle over a ReplicaActor.

One actor call per router call (a whole submit batch, one long-poll for all requests), msgspec
bytes both ways, and awaited ObjectRefs: nothing here blocks the router's event loop.
"""

from __future__ import annotations

from typing import Any

import msgspec
import ray

from protos.messages import PollResult, ReplicaStats, Request, encode
from router.replica import ReplicaHandle


class ReplicaDead(RuntimeError):
    """The replica's actor died or its engine failed; the router moves its requests."""


class RayReplicaHandle(ReplicaHandle):
    def __init__(self, replica_id: str, actor: Any, *, poll_timeout_s: float = 0.05) -> None:
        self.replica_id = replica_id
        self.actor = actor
        self.poll_timeout_s = poll_timeout_s
        self._poll_result = msgspec.msgpack.Decoder(PollResult)
        self._stats = msgspec.msgpack.Decoder(ReplicaStats)

    async def submit(self, requests: list[Request]) -> None:
        await self._call(self.actor.submit.remote(encode(requests)), "submit")

    async def poll(self) -> PollResult:
        data = await self._call(self.actor.poll.remote(self.poll_timeout_s), "poll")
        result = self._poll_result.decode(data)
        if not result.stats.healthy and not result.deltas:
            # The engine failed and its requests have had their error deltas: hand the replica
            # back to the router (and through it to the controller) as dead.
            raise ReplicaDead(f"replica {self.replica_id}: its engine failed")
        return result

    async def abort(self, request_ids: list[str]) -> None:
        await self._call(self.actor.abort.remote(encode(request_ids)), "abort")

    async def stats(self) -> ReplicaStats:
        return self._stats.decode(await self._call(self.actor.stats.remote(), "stats"))

    async def _call(self, ref: Any, what: str) -> Any:
        try:
            return await ref
        except ray.exceptions.RayError as exc:
            # Actor died, unreachable, or the call raised (a failed engine refuses submits).
            raise ReplicaDead(f"replica {self.replica_id}: {what} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
