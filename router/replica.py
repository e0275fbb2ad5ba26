"""ReplicaHandle: all the router knows about a model replica.

cluster/ implements it over Ray actor handles; router/fakes.py implements it in-process for tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from protos.messages import PollResult, ReplicaStats, Request


class ReplicaHandle(ABC):
    """One model replica, seen from the router.

    Contract:
    - Calls are batched: the router sends one `submit` per batch of new requests and one `poll`
      per engine step for all of the replica's requests. An implementation over Ray makes at most
      one actor call per method call (msgspec-encoded bytes, never pickled client data); the one
      in cluster/ long-polls over a socket to the replica instead (cluster/delta_stream.py).
    - `submit` and `abort` may be called while a `poll` is outstanding; implementations must
      allow that (a Ray async actor does).
    - Any exception from `submit` or `poll` means the replica is dead: the router stops using it
      and re-submits its unfinished requests elsewhere. Raise only for that, never for a bad
      request (report those as an OutputDelta with finish_reason="error" and `error` set).
    - A request's deltas arrive in order; its last delta has finish_reason set. A re-submitted
      request carries `prior_output_token_ids`: the replica must not emit those tokens (or their
      text) again, and counts them toward max_tokens.
    """

    replica_id: str

    @abstractmethod
    async def submit(self, requests: list[Request]) -> None:
        """Queues new requests. Returns once the replica has accepted them (not when they run)."""

    @abstractmethod
    async def poll(self) -> PollResult:
        """Long-poll: the deltas of all this replica's requests produced since the last poll.

        Waits up to a short, implementation-chosen timeout (tens of milliseconds) for at least one
        engine step, then returns, possibly with no deltas. Only one poll is outstanding at a time.
        """

    @abstractmethod
    async def abort(self, request_ids: list[str]) -> None:
        """Stops these requests and frees their KV blocks. Unknown or finished ids are ignored.

        Deltas for aborted requests may still come in the next poll; the router drops them.
        """

    @abstractmethod
    async def stats(self) -> ReplicaStats:
        """Current counters; also cheap enough to serve as a health check."""

    async def connect(self) -> None:  # noqa: B027 - optional hook
        """Called once when the router starts using the replica, before the first poll: set up
        whatever polls need, off the first request's path. Raising means the replica is dead."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """The router stopped using this replica: release connections (not the replica)."""
