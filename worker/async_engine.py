"""AsyncEngine: an Engine stepping in a background thread, fed and drained from asyncio.

The replica's Ray actor runs an event loop for its calls (submit, poll, abort, stats) while the
model runs here, on a thread of its own: torch releases the GIL inside its kernels, so calls
keep being answered during a forward pass. The engine itself is only ever touched by the step
thread; other threads hand it work through locked queues.

The step thread also builds the engine (worker/compute_thread.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import msgspec

from protos.messages import OutputDelta, PollResult, ReplicaStats, Request
from worker.compute_thread import start_compute_thread
from worker.distributed import PeerLostError
from worker.engine import Engine

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped after an engine failure; the replica must be replaced."""


class AsyncEngine:
    def __init__(self, build: Callable[[], Engine], *, replica_id: str = "",
                 idle_wait_s: float = 1.0) -> None:
        """`build` makes the Engine; it runs on the step thread and its error, if any, is
        raised here."""
        self.engine: Engine
        self.replica_id = replica_id
        self._idle_wait_s = idle_wait_s  # only bounds how late a shutdown is noticed when idle
        self._lock = threading.Lock()  # guards everything below that both sides touch
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._outbox: list[OutputDelta] = []
        self._stats: ReplicaStats
        self._error: str | None = None  # set once the engine failed
        self._stopping = False
        # The one poll waiting for deltas, as (its loop, its event): set from the step thread.
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._wake = threading.Event()

        def build_and_snapshot() -> Engine:
            self.engine = build()
            self._stats = self._snapshot()
            return self.engine

        self._thread, _ = start_compute_thread(f"engine-{replica_id or 'loop'}",
                                               build_and_snapshot, lambda _: self._run())

    # -- calls from the actor's event loop (any thread) ------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    def submit(self, requests: list[Request]) -> None:
        """Queues requests for the next step. Raises EngineDeadError once the engine failed, so
        that the router sends them to another replica instead."""
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(f"replica {self.replica_id}: engine failed: {self._error}")
            if self._stopping:
                raise EngineDeadError(f"replica {self.replica_id} is shutting down")
            self._inbox.extend(requests)
        self._wake.set()

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            self._aborts.extend(request_ids)
        self._wake.set()

    def stats(self) -> ReplicaStats:
        with self._lock:
            return self._stats

    async def poll(self, timeout_s: float) -> PollResult:
        """Every delta produced since the last poll: returns as soon as there is at least one, or
        after timeout_s with none. A failed engine answers at once (with healthy=False)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if not self._outbox and self._error is None and not self._stopping:
                self._waiter = (loop, event)
            else:
                event.set()
        if not event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        with self._lock:
            if self._waiter is not None and self._waiter[1] is event:
                self._waiter = None
            deltas, self._outbox = self._outbox, []
            return PollResult(deltas=deltas, stats=self._stats)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stops the step loop (requests still running are dropped) and waits for the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # -- the step thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Clear before draining the queues: a submit that lands after the drain sets it
            # again, so the wait below never sleeps on queued work.
            self._wake.clear()
            with self._lock:
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            rejected = [self._admit(r) for r in inbox]
            if aborts:
                self.engine.abort(aborts)
            deltas = [d for d in rejected if d is not None]
            if self.engine.has_unfinished():
                try:
                    deltas += self.engine.step()
                except PeerLostError as exc:
                    # Another rank of this replica died: the requests did nothing wrong, so
                    # they are not failed; the router moves them once it sees healthy=False.
                    log.error("replica %s: %s", self.replica_id, exc)
                    self._fail_all(str(exc), deltas, fail_requests=False)
                    return
                except Exception as exc:  # a bug, not a bad request: this replica is done
                    log.exception("replica %s: engine step failed; failing its requests",
                                  self.replica_id)
                    self._fail_all(f"{type(exc).__name__}: {exc}", deltas)
                    return
            if deltas:
                self._publish(deltas)
            elif not self.engine.has_unfinished():
                self._wake.wait(self._idle_wait_s)

    def _admit(self, request: Request) -> OutputDelta | None:
        """Adds a request; a request the engine refuses ends at once with an error delta."""
        try:
            self.engine.add_request(request)
            return None
        except Exception as exc:  # RequestError mostly; nothing a client sends may stop the loop
            return OutputDelta(request_id=request.request_id, token_ids=[],
                               finish_reason="error", error=str(exc),
                               num_prompt_tokens=len(request.prompt_token_ids),
                               num_output_tokens=len(request.prior_output_token_ids))

    def _snapshot(self) -> ReplicaStats:
        stats = self.engine.stats()
        stats.replica_id = self.replica_id
        return stats

    def _publish(self, deltas: list[OutputDelta]) -> None:
        stats = self._snapshot()
        with self._lock:
            self._outbox.extend(deltas)
            self._stats = stats
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, event = waiter
            with contextlib.suppress(RuntimeError):  # that loop closed: nobody is waiting
                loop.call_soon_threadsafe(event.set)

    def _fail_all(self, error: str, deltas: list[OutputDelta], fail_requests: bool = True) -> None:
        with self._lock:
            self._error = error
            queued, self._inbox = self._inbox, []
        running = list(self.engine.seqs.values()) if fail_requests else []
        queued = queued if fail_requests else []
        failed = [OutputDelta(request_id=s.request_id, token_ids=[], finish_reason="error",
                              error=f"the replica's engine failed: {error}",
                              num_prompt_tokens=s.num_prompt_tokens,
                              num_output_tokens=s.num_output_tokens) for s in running]
        failed += [OutputDelta(request_id=r.request_id, token_ids=[], finish_reason="error",
                               error=f"the replica's engine failed: {error}",
                               num_prompt_tokens=len(r.prompt_token_ids)) for r in queued]
        # Deltas of requests that just failed too would contradict their error: drop them.
        gone = {d.request_id for d in failed}
        out = [d for d in deltas if d.request_id not in gone] + failed
        try:
            stats = self._snapshot()
        except Exception:  # the engine is broken; keep the last good counters
            stats = msgspec.structs.replace(self._stats)
        stats.healthy = False
        with self._lock:
            self._outbox.extend(out)
            self._stats = stats
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):
                waiter[0].call_soon_threadsafe(waiter[1].set)
