"""Dispatch across fake replicas and recovery from replica failure, end to end over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from protos.messages import ModelCard
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.fakes import FakeReplica, FakeTokenizer
from router.server import RouterServer, start_server

VOCAB = 512
CARD = ModelCard(name="fake-model", max_model_len=256, vocab_size=VOCAB, eos_token_ids=[257],
                 block_size=4)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=15))


@contextlib.asynccontextmanager
async def serving(replicas: list[FakeReplica], failed: list[str] | None = None,
                  **config: object) -> AsyncIterator[tuple[RouterServer, pb_grpc.GenerationStub]]:
    server = await start_server(
        RouterConfig(**config), replicas, FakeTokenizer(), CARD,
        on_replica_failed=(lambda rid, exc: failed.append(rid)) if failed is not None else None)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, pb_grpc.GenerationStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


def token_request(ids: list[int], max_tokens: int, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + i) % VOCAB for i in range(1, n + 1)]


async def collect(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> list[int]:
    return [t async for r in stub.Generate(request) for t in r.token_ids]


async def read_tokens(call: grpc.aio.UnaryStreamCall, at_least: int) -> tuple[list[int], str]:
    tokens, text = [], ""
    while len(tokens) < at_least:
        response = await call.read()
        tokens += response.token_ids
        text += response.text
    return tokens, text


async def read_rest(call: grpc.aio.UnaryStreamCall) -> tuple[list[int], str, pb.GenerateResponse]:
    tokens, text, last = [], "", None
    while (response := await call.read()) is not grpc.aio.EOF:
        tokens += response.token_ids
        text += response.text
        last = response
    return tokens, text, last


def test_two_replicas_both_take_work() -> None:
    async def body() -> None:
        replicas = [FakeReplica("r0"), FakeReplica("r1")]
        async with serving(replicas) as (_, stub):
            prompts = [[i * 10 + j for j in range(6)] for i in range(1, 7)]
            outs = await asyncio.gather(*(collect(stub, token_request(p, 8)) for p in prompts))
        assert outs == [expected_tokens(p, 8) for p in prompts]
        assert all(r.submitted for r in replicas)
        assert sum(len(r.submitted) for r in replicas) == 6
    run(body)


def test_shared_prefix_prompts_land_on_one_replica() -> None:
    async def body() -> None:
        replicas = [FakeReplica("r0"), FakeReplica("r1")]
        system = [7, 7, 7, 7, 8, 8, 8, 8]  # two full blocks of 4
        async with serving(replicas) as (_, stub):
            await collect(stub, token_request([*system, 1], 2))  # seeds the affinity
            prompts = [[*system, 100 + i, 3] for i in range(6)]
            await asyncio.gather(*(collect(stub, token_request(p, 8)) for p in prompts))
        owners = {r.replica_id for r in replicas
                  for q in r.submitted if q.prompt_token_ids[:8] == system}
        assert len(owners) == 1
    run(body)


def test_replica_death_mid_stream_continues_elsewhere_without_loss_or_duplication() -> None:
    async def body() -> None:
        replicas = [FakeReplica("r0", step_delay_s=0.005), FakeReplica("r1", step_delay_s=0.005)]
        failed: list[str] = []
        prompt = [100, 101, 102, 103, 104]
        async with serving(replicas, failed) as (server, stub):
            call = stub.Generate(token_request(prompt, 40, request_id="survivor"))
            head, head_text = await read_tokens(call, at_least=5)
            victim = next(r for r in replicas if "survivor" in r.running_ids)
            rescuer = next(r for r in replicas if r is not victim)
            victim.die()
            tail, tail_text, last = await read_rest(call)
            assert failed == [victim.replica_id]
            assert server.fleet.replica_ids == [rescuer.replica_id]
        tokens = head + tail
        assert tokens == expected_tokens(prompt, 40)
        assert head_text + tail_text == "".join(f"<{t}>" for t in tokens)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 40 and last.usage.prompt_tokens == 5
        resubmitted = rescuer.submitted[-1]
        assert resubmitted.prompt_token_ids == prompt
        # Exactly what the client had received when the replica died (at least the head).
        prior = resubmitted.prior_output_token_ids
        assert prior == tokens[:len(prior)]
        assert len(resubmitted.prior_output_token_ids) >= len(head)
    run(body)


def test_orphaned_request_waits_for_a_new_replica() -> None:
    async def body() -> None:
        only = FakeReplica("r0", step_delay_s=0.005)
        prompt = [1, 2, 3]
        async with serving([only]) as (server, stub):
            call = stub.Generate(token_request(prompt, 20))
            head, _ = await read_tokens(call, at_least=3)
            only.die()
            await asyncio.sleep(0.05)
            server.add_replica(FakeReplica("r0-rebuilt"))
            tail, _, last = await read_rest(call)
        assert head + tail == expected_tokens(prompt, 20)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
    run(body)


def test_orphaned_request_fails_unavailable_when_no_replica_comes() -> None:
    async def body() -> None:
        only = FakeReplica("r0", step_delay_s=0.005)
        async with serving([only], orphan_timeout_s=0.1) as (server, stub):
            call = stub.Generate(token_request([1], 50))
            await read_tokens(call, at_least=2)
            only.die()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_rest(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no replica became available" in err.value.details()
            assert server.fleet.num_outstanding == 0
    run(body)


def test_request_that_keeps_failing_gives_up_after_max_resubmits() -> None:
    async def body() -> None:
        replicas = [FakeReplica(f"r{i}", step_delay_s=0.005) for i in range(3)]
        async with serving(replicas, max_resubmits=1) as (_, stub):
            call = stub.Generate(token_request([1], 100, request_id="cursed"))
            for _ in range(2):
                await read_tokens(call, at_least=1)
                while not any("cursed" in r.running_ids for r in replicas):
                    await asyncio.sleep(0.002)  # being moved
                next(r for r in replicas if "cursed" in r.running_ids).die()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_rest(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "giving up" in err.value.details()
    run(body)


def test_removing_a_replica_moves_its_requests() -> None:
    async def body() -> None:
        replicas = [FakeReplica("r0", step_delay_s=0.005), FakeReplica("r1", step_delay_s=0.005)]
        prompt = [40, 41]
        async with serving(replicas) as (server, stub):
            call = stub.Generate(token_request(prompt, 30, request_id="mover"))
            head, _ = await read_tokens(call, at_least=3)
            source = next(r for r in replicas if "mover" in r.running_ids)
            await server.remove_replica(source.replica_id, drain=False)
            tail, _, _ = await read_rest(call)
            assert source.aborted == ["mover"]  # its KV freed there
            assert server.fleet.replica_ids == [r.replica_id for r in replicas if r is not source]
            await server.remove_replica("no-such-replica")  # idempotent
        assert head + tail == expected_tokens(prompt, 30)
    run(body)


def test_draining_removal_lets_requests_finish_in_place() -> None:
    async def body() -> None:
        replicas = [FakeReplica("r0", step_delay_s=0.002), FakeReplica("r1", step_delay_s=0.002)]
        async with serving(replicas) as (server, stub):
            call = stub.Generate(token_request([9], 10, request_id="stay"))
            await read_tokens(call, at_least=1)
            source = next(r for r in replicas if "stay" in r.running_ids)
            removal = asyncio.create_task(server.remove_replica(source.replica_id))
            _, _, last = await read_rest(call)
            await removal
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            assert source.aborted == [] and len(source.submitted) == 1
            other = await collect(stub, token_request([9], 2))
            assert other == [10, 11]
            assert source.submitted[-1].request_id == "stay"  # the new one went elsewhere
    run(body)
