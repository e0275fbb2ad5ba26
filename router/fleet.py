"""Fleet: the router's replicas and its in-flight requests.

It dispatches each request to a replica, fans the replicas' deltas out to one queue per request,
and when a replica fails re-submits its unfinished requests elsewhere, carrying the tokens the
client has already received so that the stream continues without loss or duplication.
Transport-agnostic: front doors (gRPC, HTTP) sit on top of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

import msgspec

from protos.messages import OutputDelta, ReplicaStats, Request
from router.dispatch import DispatchPolicy, ReplicaLoad
from router.pump import ReplicaPump
from router.replica import ReplicaHandle

log = logging.getLogger(__name__)


class NoReplicaError(Exception):
    """No replica accepts new requests right now."""


class StreamError(msgspec.Struct, frozen=True):
    """Ends a request's stream abnormally (queued after its last delta)."""

    code: Literal["unavailable", "internal"]
    message: str


class StreamFailed(Exception):
    def __init__(self, error: StreamError) -> None:
        super().__init__(error.message)
        self.code = error.code
        self.message = error.message


class _InFlight:
    __slots__ = ("orphan_timer", "output_token_ids", "queue", "replica_id", "request", "resubmits")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.queue: asyncio.Queue[OutputDelta | StreamError | _Deadline] = asyncio.Queue()
        self.replica_id: str | None = None
        # Every token handed to the stream so far: what a re-submission must not repeat.
        self.output_token_ids: list[int] = []
        self.resubmits = 0
        self.orphan_timer: asyncio.TimerHandle | None = None


class _Deadline:
    """Queued by a stream's deadline timer: the consumer's time is up."""


class RequestStream:
    """The consumer's end of one request."""

    def __init__(self, request_id: str, inflight: _InFlight) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[OutputDelta | StreamError | _Deadline] = inflight.queue
        self._error: StreamError | _Deadline | None = None
        self._timer: asyncio.TimerHandle | None = None

    def set_deadline(self, timeout: float | None) -> None:
        """From `timeout` seconds on, next() raises asyncio.TimeoutError. One timer for the
        whole stream: a wait_for per delta cost a task and a timer for every token."""
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(
                max(timeout, 0.0), self._queue.put_nowait, _Deadline())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next(self) -> list[OutputDelta]:
        """Waits for at least one delta and returns it with any already queued behind it, so that
        a slow reader gets fewer, larger messages. Raises asyncio.TimeoutError or StreamFailed."""
        if self._error is not None:
            self._raise(self._error)
        item = self._queue.get_nowait() if not self._queue.empty() else await self._queue.get()
        deltas: list[OutputDelta] = []
        while True:
            if not isinstance(item, OutputDelta):
                if not deltas:
                    self._raise(item)
                self._error = item  # hand over the deltas before it first
                return deltas
            deltas.append(item)
            if item.finished or self._queue.empty():
                return deltas
            item = self._queue.get_nowait()

    @staticmethod
    def _raise(item: StreamError | _Deadline) -> None:
        if isinstance(item, _Deadline):
            raise asyncio.TimeoutError
        raise StreamFailed(item)


class Fleet:
    def __init__(self, policy: DispatchPolicy, *, max_resubmits: int = 3,
                 orphan_timeout_s: float = 60.0,
                 on_change: Callable[[], None] | None = None,
                 on_replica_failed: Callable[[str, BaseException], None] | None = None) -> None:
        self._policy = policy
        self._max_resubmits = max_resubmits
        self._orphan_timeout_s = orphan_timeout_s
        self._on_change = on_change
        self._on_replica_failed = on_replica_failed
        self._pumps: dict[str, ReplicaPump] = {}
        self._inflight: dict[str, _InFlight] = {}
        # Requests whose replica failed while no other replica was there to take them.
        self._orphans: dict[str, _InFlight] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # Requests turned away for want of a replica: what wakes a deployment scaled to zero.
        self.refused_total = 0

    # -- replica set ------------------------------------------------------------------------

    @property
    def replica_ids(self) -> list[str]:
        """Replicas that take new requests."""
        return [rid for rid, pump in self._pumps.items() if pump.accepting]

    def add_replica(self, handle: ReplicaHandle) -> None:
        """Starts sending requests to a replica (e.g. one the controller (re)built)."""
        if handle.replica_id in self._pumps:
            raise ValueError(f"replica {handle.replica_id!r} is already in the router; remove it "
                             "first or give the new one another replica_id")
        pump = ReplicaPump(handle, self._deliver, self._replica_failed)
        self._pumps[handle.replica_id] = pump
        pump.start()
        for inflight in list(self._orphans.values()):
            self._unorphan(inflight)
            self._resubmit(inflight, "waiting for a replica")
        self._changed()

    async def remove_replica(self, replica_id: str, *, drain: bool = True,
                             timeout: float = 60.0) -> None:
        """Takes a replica out of the router. Unknown ids are ignored (removal is idempotent).

        drain=True: no new requests; those in flight finish there for up to `timeout` seconds,
        then whatever is left moves to other replicas. drain=False: move them at once.
        """
        pump = self._pumps.get(replica_id)
        if pump is None:
            return
        pump.accepting = False
        self._changed()
        if drain:
            await pump.wait_idle(timeout)
        if self._pumps.get(replica_id) is not pump:
            return  # it failed while draining; _replica_failed moved its requests
        del self._pumps[replica_id]
        self._policy.forget_replica(replica_id)
        moving = [rid for rid in pump.request_ids
                  if rid in self._inflight and self._inflight[rid].replica_id == replica_id]
        for rid in moving:
            self._resubmit(self._inflight[rid], f"replica {replica_id} was removed")
        await pump.stop()
        self._changed()
        if moving:
            # Free their KV cache there; best effort, since the replica may be on its way out.
            try:
                await asyncio.wait_for(pump.handle.abort(moving), timeout=5.0)
            except Exception as exc:
                log.warning("replica %s: abort of %d moved requests failed: %r",
                            replica_id, len(moving), exc)

    def replica_stats(self) -> dict[str, ReplicaStats | None]:
        """The stats each replica returned with its last poll."""
        return {rid: pump.last_stats for rid, pump in self._pumps.items()}

    # -- requests ---------------------------------------------------------------------------

    @property
    def num_outstanding(self) -> int:
        return len(self._inflight)

    def is_inflight(self, request_id: str) -> bool:
        return request_id in self._inflight

    def submit(self, request: Request) -> RequestStream:
        """Dispatches a request; its deltas come out of the returned stream."""
        if request.request_id in self._inflight:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        loads = self._loads()
        if not loads:
            self.refused_total += 1
            raise NoReplicaError("no model replica is available")
        target = self._policy.choose(request.prompt_token_ids, loads, request.cache_salt)
        inflight = _InFlight(request)
        self._inflight[request.request_id] = inflight
        self._idle.clear()
        self._send(inflight, target, request)
        return RequestStream(request.request_id, inflight)

    def abort(self, request_id: str) -> None:
        """Stops a request (client gone, deadline); no-op once it finished."""
        inflight = self._forget(request_id)
        if inflight is not None and inflight.replica_id in self._pumps:
            self._pumps[inflight.replica_id].abort(request_id)

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        """Fails whatever is in flight and stops every pump."""
        for rid in list(self._inflight):
            self._fail(rid, StreamError("unavailable", "the router is shutting down"))
        pumps, self._pumps = list(self._pumps.values()), {}
        for pump in pumps:
            await pump.stop()

    # -- internals --------------------------------------------------------------------------

    def _loads(self) -> dict[str, ReplicaLoad]:
        return {rid: pump.load for rid, pump in self._pumps.items() if pump.accepting}

    def _send(self, inflight: _InFlight, replica_id: str, request: Request) -> None:
        inflight.replica_id = replica_id
        self._pumps[replica_id].add(request)

    def _deliver(self, pump: ReplicaPump, deltas: list[OutputDelta]) -> None:
        for delta in deltas:
            inflight = self._inflight.get(delta.request_id)
            if inflight is None or inflight.replica_id != pump.replica_id:
                continue  # aborted, or moved away from this replica
            inflight.output_token_ids.extend(delta.token_ids)
            pump.add_tokens(delta.request_id, len(delta.token_ids))
            inflight.queue.put_nowait(delta)
            if delta.finished:
                pump.remove(delta.request_id)
                self._forget(delta.request_id)

    def _replica_failed(self, pump: ReplicaPump, exc: BaseException) -> None:
        log.warning("replica %s failed (%r); moving its %d unfinished requests",
                    pump.replica_id, exc, len(pump.request_ids))
        if self._pumps.get(pump.replica_id) is pump:
            del self._pumps[pump.replica_id]
        self._policy.forget_replica(pump.replica_id)
        for rid in pump.request_ids:
            inflight = self._inflight.get(rid)
            if inflight is not None and inflight.replica_id == pump.replica_id:
                self._resubmit(inflight, f"replica {pump.replica_id} failed: {exc!r}")
        asyncio.get_running_loop().create_task(pump.stop())
        self._changed()
        if self._on_replica_failed is not None:
            self._on_replica_failed(pump.replica_id, exc)

    def _resubmit(self, inflight: _InFlight, why: str) -> None:
        rid = inflight.request.request_id
        inflight.replica_id = None
        if inflight.resubmits >= self._max_resubmits:
            self._fail(rid, StreamError(
                "unavailable", f"request moved {inflight.resubmits} times and failed again "
                f"({why}); giving up"))
            return
        loads = self._loads()
        if not loads:
            loop = asyncio.get_running_loop()
            inflight.orphan_timer = loop.call_later(self._orphan_timeout_s,
                                                    self._orphan_expired, rid)
            self._orphans[rid] = inflight
            return
        inflight.resubmits += 1
        # The new replica re-computes prompt + streamed tokens and continues after them.
        request = msgspec.structs.replace(
            inflight.request,
            prior_output_token_ids=inflight.request.prior_output_token_ids
            + inflight.output_token_ids)
        target = self._policy.choose(request.prompt_token_ids, loads, request.cache_salt)
        self._send(inflight, target, request)

    def _orphan_expired(self, request_id: str) -> None:
        if request_id in self._orphans:
            self._fail(request_id, StreamError(
                "unavailable", f"no replica became available within {self._orphan_timeout_s:g} s "
                "to continue the request after its replica failed"))

    def _unorphan(self, inflight: _InFlight) -> None:
        self._orphans.pop(inflight.request.request_id, None)
        if inflight.orphan_timer is not None:
            inflight.orphan_timer.cancel()
            inflight.orphan_timer = None

    def _fail(self, request_id: str, error: StreamError) -> None:
        inflight = self._forget(request_id)
        if inflight is None:
            return
        if inflight.replica_id in self._pumps:
            self._pumps[inflight.replica_id].abort(request_id)
        inflight.queue.put_nowait(error)

    def _forget(self, request_id: str) -> _InFlight | None:
        inflight = self._inflight.pop(request_id, None)
        if inflight is not None:
            self._unorphan(inflight)
        if not self._inflight:
            self._idle.set()
        return inflight

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
