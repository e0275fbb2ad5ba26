"""RayReplicaHandle: the router's ReplicaHandle over a ReplicaActor.

One actor call per submit batch, abort batch or stats call, msgspec bytes both ways, and awaited
ObjectRefs: nothing here blocks the router's event loop. Polls go over the replica's delta
stream (cluster/delta_stream.py), one socket round trip per engine step instead of one actor
call; where the stream cannot be reached, polls fall back to actor calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import ray

from cluster.delta_stream import DeltaStreamClient, StreamAddress, StreamClosed
from protos.messages import PollResult, ReplicaStats, Request, encode
from router.replica import ReplicaHandle

log = logging.getLogger(__name__)

# No answer to a poll for this many poll timeouts (at least 30 s) means the replica is lost; it
# answers within one poll timeout, steps or not.
STALL_POLLS = 20


class ReplicaDead(RuntimeError):
    """The replica's actor died or its engine failed; the router moves its requests."""


class RayReplicaHandle(ReplicaHandle):
    def __init__(self, replica_id: str, actor: Any, *, poll_timeout_s: float = 0.05,
                 delta_stream: bool = True) -> None:
        """`delta_stream`: read poll results from the replica's delta stream (False: one actor
        call per poll)."""
        self.replica_id = replica_id
        self.actor = actor
        self.poll_timeout_s = poll_timeout_s
        self._poll_result = msgspec.msgpack.Decoder(PollResult)
        self._stats = msgspec.msgpack.Decoder(ReplicaStats)
        self._use_stream = delta_stream
        self._stream: DeltaStreamClient | None = None

    async def submit(self, requests: list[Request]) -> None:
        await self._call(self.actor.submit.remote(encode(requests)), "submit")

    async def connect(self) -> None:
        """Opens the delta stream before the first request needs it."""
        if self._use_stream and self._stream is None:
            self._stream = await self._open_stream()

    async def poll(self) -> PollResult:
        await self.connect()
        if self._stream is not None:
            try:
                result = await self._stream.next()
            except StreamClosed as exc:
                raise ReplicaDead(f"replica {self.replica_id}: its delta stream closed: "
                                  f"{exc}") from exc
        else:
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

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def _open_stream(self) -> DeltaStreamClient | None:
        """Connects to the replica's delta stream; None (and Ray polls from now on) if it cannot
        be reached. A dead actor raises ReplicaDead."""
        data = await self._call(self.actor.delta_stream.remote(), "delta_stream")
        address = msgspec.msgpack.decode(data, type=StreamAddress)
        try:
            return await DeltaStreamClient.connect(
                address, self.poll_timeout_s, stall_s=max(30.0, STALL_POLLS * self.poll_timeout_s))
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("replica %s: its delta stream at %s:%d cannot be reached (%r); polling "
                        "through actor calls instead", self.replica_id, address.host,
                        address.port, exc)
            self._use_stream = False
            return None

    async def _call(self, ref: Any, what: str) -> Any:
        try:
            return await ref
        except ray.exceptions.RayError as exc:
            # Actor died, unreachable, or the call raised (a failed engine refuses submits).
            raise ReplicaDead(f"replica {self.replica_id}: {what} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
