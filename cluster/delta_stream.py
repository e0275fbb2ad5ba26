"""Delta stream: a replica answers the router's long-polls over one TCP connection.

Why not one Ray call per poll: the router long-polls each replica once per engine step, and at
low concurrency a step is one token. Measured on the 2-vCPU dev VM at one stream, each such Ray
actor call cost the router ~2.3 ms of CPU (task submission, reply, callbacks; ~15 context
switches) and the replica a share of the two cores its model runs on: served decode steps ran at
29.7 ms against 24.8 ms offline, the difference all inside the model's C kernels, i.e. cores
taken away. A poll byte and a length-prefixed msgpack answer on a socket cost a write and a
read on each side.

Ray stays the control plane: the router learns the stream's address and secret from a Ray call
(`ReplicaActor.delta_stream`), so only a holder of the actor handle can connect; submit, abort,
stats and health remain Ray calls. Each poll is one request byte from the router, answered by
the same long-poll as before (AsyncEngine.poll): the answer comes as soon as a step ends, or
empty after the poll timeout, so a silent stream means a stuck or unreachable replica. The
router asks again as soon as it has an answer, so a poll is waiting whenever a step ends, as
with actor calls; an idle router asks nothing and nothing piles up. One stream per replica: a
new connection (a restarted router) replaces the old one, which is closed.

The stream is plain TCP: where the cluster's traffic must be encrypted (Ray TLS), set
`replica.delta_stream: false` and polls go through actor calls again.

Hello (client -> server): the 32-byte secret, then the poll timeout as a little-endian
float64. Poll (client -> server): one byte. Answer: 4-byte little-endian length, then msgpack
PollResult bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable

import msgspec

from protos.messages import PollResult, encode

log = logging.getLogger(__name__)

SECRET_BYTES = 32
_HELLO = struct.Struct("<d")
_LENGTH = struct.Struct("<I")
_POLL = b"p"
HELLO_TIMEOUT_S = 10.0


class StreamAddress(msgspec.Struct, frozen=True):
    host: str
    port: int
    secret: bytes


class StreamClosed(ConnectionError):
    """The replica's end of the delta stream went away (or never answered)."""


class DeltaStreamServer:
    """The replica's end: serves `poll(timeout_s)` results to the one connected router."""

    def __init__(self, poll: Callable[[float], Awaitable[PollResult]]) -> None:
        self._poll = poll
        self._secret = secrets.token_bytes(SECRET_BYTES)
        self._server: asyncio.Server | None = None
        self._address: StreamAddress | None = None
        self._current: asyncio.Task | None = None

    async def start(self, host: str) -> StreamAddress:
        """Listens on `host` (once; later calls return the same address)."""
        if self._address is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self._address = StreamAddress(host, port, self._secret)
        return self._address

    @property
    def connected(self) -> bool:
        """Whether a router is reading this stream now."""
        return self._current is not None

    async def close(self) -> None:
        if self._current is not None:
            self._current.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(reader.readexactly(SECRET_BYTES + _HELLO.size),
                                           HELLO_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if not hmac.compare_digest(hello[:SECRET_BYTES], self._secret):
            log.warning("delta stream: refused a connection with a wrong secret")
            writer.close()
            return
        (timeout_s,) = _HELLO.unpack(hello[SECRET_BYTES:])
        # Two streams would split the deltas between them: the newest connection wins.
        previous, self._current = self._current, asyncio.current_task()
        if previous is not None:
            previous.cancel()
        try:
            while True:
                await reader.readexactly(1)
                data = encode(await self._poll(timeout_s))
                writer.write(_LENGTH.pack(len(data)) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if self._current is asyncio.current_task():
                self._current = None
            writer.close()


class DeltaStreamClient:
    """The router's end: one long-poll per `next()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stall_s: float) -> None:
        self._reader = reader
        self._writer = writer
        self._stall_s = stall_s
        self._decoder = msgspec.msgpack.Decoder(PollResult)

    @classmethod
    async def connect(cls, address: StreamAddress, poll_timeout_s: float,
                      stall_s: float) -> DeltaStreamClient:
        """`stall_s`: no answer to a poll for this long (the replica answers within
        poll_timeout_s) counts as a lost replica."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port), HELLO_TIMEOUT_S)
        writer.write(address.secret + _HELLO.pack(poll_timeout_s))
        await writer.drain()
        return cls(reader, writer, stall_s)

    async def next(self) -> PollResult:
        """One long-poll: the replica's next PollResult (empty after its poll timeout)."""
        try:
            self._writer.write(_POLL)
            header = await asyncio.wait_for(self._reader.readexactly(_LENGTH.size),
                                            self._stall_s)
            (size,) = _LENGTH.unpack(header)
            return self._decoder.decode(await self._reader.readexactly(size))
        except asyncio.TimeoutError:
            raise StreamClosed(f"no answer to a poll for {self._stall_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise StreamClosed(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._writer.close()
