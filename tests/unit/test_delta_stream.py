"""The replica's delta stream (cluster/delta_stream.py) without Ray: frames arrive in order and
complete, a wrong secret gets nothing, a newer connection replaces an older one, and a closed or
silent replica ends the client's stream with StreamClosed."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest

from cluster.delta_stream import (
    DeltaStreamClient,
    DeltaStreamServer,
    StreamAddress,
    StreamClosed,
)
from cluster.ray_replica import RayReplicaHandle
from protos.messages import OutputDelta, PollResult, ReplicaStats, encode


class FakeEngine:
    """AsyncEngine.poll's contract: the deltas queued since the last poll, or none after
    timeout_s."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[OutputDelta]] = asyncio.Queue()
        self.timeouts: list[float] = []

    async def poll(self, timeout_s: float) -> PollResult:
        self.timeouts.append(timeout_s)
        try:
            deltas = await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            deltas = []
        return PollResult(deltas=deltas, stats=ReplicaStats(replica_id="r0"))


def delta(rid: str, *tokens: int) -> OutputDelta:
    return OutputDelta(request_id=rid, token_ids=list(tokens))


async def listening(engine: FakeEngine) -> tuple[DeltaStreamServer, StreamAddress]:
    server = DeltaStreamServer(engine.poll)
    return server, await server.start("127.0.0.1")


async def _next_with_deltas(client: DeltaStreamClient) -> PollResult:
    while not (result := await client.next()).deltas:
        pass
    return result


def test_frames_arrive_in_order_and_whole():
    async def main() -> None:
        engine = FakeEngine()
        server, address = await listening(engine)
        assert not server.connected
        client = await DeltaStreamClient.connect(address, 0.05, stall_s=5.0)
        # Big frames too: a step of many sequences with long token lists.
        sent = [[delta("a", 1)], [delta("b", *range(5000)), delta("c", 7)], [delta("a", 2)]]
        for batch in sent:
            engine.queue.put_nowait(batch)
        got = [(await _next_with_deltas(client)).deltas for _ in sent]
        assert got == sent
        assert (await client.next()).stats.replica_id == "r0"  # an empty frame per timeout
        assert engine.timeouts and set(engine.timeouts) == {0.05}  # the client's poll timeout
        assert server.connected
        # A router that stops asking (no request in flight) gets nothing queued up meanwhile.
        polls = len(engine.timeouts)
        await asyncio.sleep(0.3)
        assert len(engine.timeouts) == polls
        engine.queue.put_nowait([delta("d", 9)])
        assert (await client.next()).deltas == [delta("d", 9)]  # the next answer is fresh
        client.close()
        await server.close()

    asyncio.run(main())


def test_a_wrong_secret_gets_nothing():
    async def main() -> None:
        engine = FakeEngine()
        server, address = await listening(engine)
        wrong = msgspec.structs.replace(address, secret=bytes(len(address.secret)))
        client = await DeltaStreamClient.connect(wrong, 0.05, stall_s=5.0)
        engine.queue.put_nowait([delta("secret", 1)])
        with pytest.raises(StreamClosed):
            await client.next()
        assert engine.timeouts == []  # the engine was never polled for it
        assert engine.queue.qsize() == 1
        await server.close()

    asyncio.run(main())


def test_a_new_connection_replaces_the_old_one():
    async def main() -> None:
        engine = FakeEngine()
        server, address = await listening(engine)
        assert await server.start("127.0.0.1") == address  # one listener per replica
        old = await DeltaStreamClient.connect(address, 0.05, stall_s=5.0)
        await old.next()
        new = await DeltaStreamClient.connect(address, 0.05, stall_s=5.0)
        await new.next()
        with pytest.raises(StreamClosed):  # the old stream ends (after frames in flight)
            while True:
                await old.next()
        engine.queue.put_nowait([delta("x", 3)])
        assert (await _next_with_deltas(new)).deltas == [delta("x", 3)]
        new.close()
        await server.close()

    asyncio.run(main())


def test_a_closed_or_silent_replica_ends_the_stream():
    async def main() -> None:
        engine = FakeEngine()
        server, address = await listening(engine)
        client = await DeltaStreamClient.connect(address, 0.05, stall_s=5.0)
        await client.next()
        await server.close()  # the replica shuts down
        with pytest.raises(StreamClosed):
            while True:
                await client.next()

        async def never(timeout_s: float) -> PollResult:
            await asyncio.sleep(3600)
            raise AssertionError

        silent = DeltaStreamServer(never)
        quiet = await DeltaStreamClient.connect(await silent.start("127.0.0.1"), 0.05,
                                                stall_s=0.3)
        with pytest.raises(StreamClosed, match="no answer to a poll"):
            await quiet.next()
        await silent.close()

    asyncio.run(main())


def test_nobody_listening_fails_the_connect():
    async def main() -> None:
        server, address = await listening(FakeEngine())
        await server.close()
        with pytest.raises(OSError):
            await DeltaStreamClient.connect(StreamAddress("127.0.0.1", address.port,
                                                          address.secret), 0.05, stall_s=1.0)

    asyncio.run(main())


class _Method:
    """An actor method stand-in: .remote(...) returns an awaitable, as an ObjectRef is."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        return self.fn(*args)


class FakeActor:
    def __init__(self, address: StreamAddress, engine: FakeEngine) -> None:
        async def where() -> bytes:
            return encode(address)

        async def poll(timeout_s: float) -> bytes:
            return encode(await engine.poll(timeout_s))

        self.delta_stream = _Method(where)
        self.poll = _Method(poll)


def test_the_handle_reads_the_stream_and_falls_back_to_actor_calls():
    async def main() -> None:
        engine = FakeEngine()
        server, address = await listening(engine)
        actor = FakeActor(address, engine)
        handle = RayReplicaHandle("r0", actor, poll_timeout_s=0.05)
        await handle.connect()  # before any request: the stream is open, nothing was polled
        assert engine.timeouts == [] and actor.delta_stream.calls == 1
        for _ in range(100):
            if server.connected:
                break
            await asyncio.sleep(0.01)
        assert server.connected
        engine.queue.put_nowait([delta("s", 1)])
        assert (await handle.poll()).deltas == [delta("s", 1)]
        assert actor.poll.calls == 0 and actor.delta_stream.calls == 1
        await handle.close()
        await server.close()

        # A stream nobody can reach (another node behind a firewall, say): actor calls.
        unreachable = FakeActor(StreamAddress("127.0.0.1", server_port_closed(), b"x" * 32),
                                engine)
        handle = RayReplicaHandle("r1", unreachable, poll_timeout_s=0.05)
        engine.queue.put_nowait([delta("f", 2)])
        assert (await handle.poll()).deltas == [delta("f", 2)]
        await handle.poll()
        assert unreachable.poll.calls == 2 and unreachable.delta_stream.calls == 1

    asyncio.run(main())


def server_port_closed() -> int:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
