"""ReplicaPump: moves one replica's traffic without a remote call per token or per request.

Two loops per replica: a control loop that sends everything queued since its last call as one
`abort` and one `submit`, and a poll loop that long-polls the replica once per engine step and
hands the deltas of all its requests to the fleet in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from protos.messages import OutputDelta, ReplicaStats, Request
from router.dispatch import ReplicaLoad
from router.replica import ReplicaHandle

log = logging.getLogger(__name__)


class ReplicaPump:
    def __init__(self, handle: ReplicaHandle,
                 on_deltas: Callable[[ReplicaPump, list[OutputDelta]], None],
                 on_failure: Callable[[ReplicaPump, BaseException], None]) -> None:
        self.handle = handle
        self.replica_id = handle.replica_id
        self.accepting = True  # False once draining or failed: the dispatcher skips it
        self.failed = False
        self.last_stats: ReplicaStats | None = None
        # request id -> tokens it holds on the replica (prompt + output so far): the load.
        self._tokens: dict[str, int] = {}
        self._total_tokens = 0
        self._to_submit: dict[str, Request] = {}
        self._to_abort: list[str] = []
        self._control_wake = asyncio.Event()
        self._poll_wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_deltas = on_deltas
        self._on_failure = on_failure
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._control_loop(), name=f"replica-{self.replica_id}-control"),
            asyncio.create_task(self._poll_loop(), name=f"replica-{self.replica_id}-poll"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await self.handle.close()

    @property
    def load(self) -> ReplicaLoad:
        return ReplicaLoad(len(self._tokens), self._total_tokens)

    @property
    def request_ids(self) -> list[str]:
        return list(self._tokens)

    def add(self, request: Request) -> None:
        """Queues a request for the next submit batch."""
        n = len(request.prompt_token_ids) + len(request.prior_output_token_ids)
        self._tokens[request.request_id] = n
        self._total_tokens += n
        self._to_submit[request.request_id] = request
        self._idle.clear()
        self._control_wake.set()
        self._poll_wake.set()

    def add_tokens(self, request_id: str, n: int) -> None:
        if request_id in self._tokens:
            self._tokens[request_id] += n
            self._total_tokens += n

    def remove(self, request_id: str) -> None:
        """Forgets a request the replica finished (no call to the replica)."""
        self._total_tokens -= self._tokens.pop(request_id, 0)
        if not self._tokens:
            self._idle.set()

    def abort(self, request_id: str) -> None:
        """Forgets a request and, unless it never left the router, aborts it on the replica."""
        self.remove(request_id)
        if self._to_submit.pop(request_id, None) is None:
            self._to_abort.append(request_id)
            self._control_wake.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _control_loop(self) -> None:
        while True:
            await self._control_wake.wait()
            self._control_wake.clear()
            # Aborts go first and only name requests sent in earlier batches (aborts of queued
            # requests just drop them above), so a replica never sees an abort before its submit.
            aborts, self._to_abort = self._to_abort, []
            batch, self._to_submit = list(self._to_submit.values()), {}
            if aborts:
                try:
                    await self.handle.abort(aborts)
                except Exception as exc:
                    # Not fatal on its own: a dead replica also fails its next poll.
                    log.warning("replica %s: abort of %d requests failed: %r",
                                self.replica_id, len(aborts), exc)
            if batch:
                try:
                    await self.handle.submit(batch)
                except Exception as exc:
                    self._fail(exc)
                    return

    async def _poll_loop(self) -> None:
        try:
            await self.handle.connect()
        except Exception as exc:
            self._fail(exc)
            return
        while True:
            if not self._tokens:
                # Nothing in flight: sleep until a request arrives rather than poll an idle
                # replica.
                self._poll_wake.clear()
                await self._poll_wake.wait()
            try:
                result = await self.handle.poll()
            except Exception as exc:
                self._fail(exc)
                return
            self.last_stats = result.stats
            if result.deltas:
                self._on_deltas(self, result.deltas)

    def _fail(self, exc: BaseException) -> None:
        if self.failed:
            return
        self.failed = True
        self.accepting = False
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._on_failure(self, exc)
