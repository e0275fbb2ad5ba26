"""The gRPC front door against fake replicas: a real grpc.aio server on 127.0.0.1:0 and a real
client stub."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.messages import ModelCard, OutputDelta
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.fakes import FakeReplica, FakeTokenizer
from router.server import RouterServer, start_server

CARD = ModelCard(name="fake-model", max_model_len=64, vocab_size=512, eos_token_ids=[257],
                 block_size=4)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=15))


@contextlib.asynccontextmanager
async def serving(replicas: list[FakeReplica], **config: object
                  ) -> AsyncIterator[tuple[RouterServer, pb_grpc.GenerationStub, grpc.aio.Channel]]:
    server = await start_server(RouterConfig(**config), replicas, FakeTokenizer(), CARD)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, pb_grpc.GenerationStub(channel), channel
    finally:
        await channel.close()
        await server.stop(0)


def token_request(ids: list[int], max_tokens: int = 5, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    async def wait() -> None:
        while not check():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(wait(), timeout)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


def test_stream_carries_deltas_and_usage_in_the_last_message() -> None:
    async def body() -> None:
        async with serving([FakeReplica("r0")]) as (_, stub, _):
            responses = [r async for r in stub.Generate(
                token_request([10, 11, 12], max_tokens=5, request_id="req-1"))]
        assert [t for r in responses for t in r.token_ids] == [13, 14, 15, 16, 17]
        assert "".join(r.text for r in responses) == "<13><14><15><16><17>"
        assert {r.request_id for r in responses} == {"req-1"}
        *head, last = responses
        assert all(not r.HasField("usage") and r.finish_reason == 0 for r in head)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 5)
    run(body)


def test_text_and_chat_prompts_are_tokenized_and_usage_can_be_left_out() -> None:
    async def body() -> None:
        replica = FakeReplica("r0", eos_token_id=100)
        async with serving([replica]) as (_, stub, _):
            text = [r async for r in stub.Generate(pb.GenerateRequest(
                text="ab", sampling=pb.SamplingParams(max_tokens=3),
                stream_options=pb.StreamOptions(include_usage=False)))]
            chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
            stopped = [r async for r in stub.Generate(pb.GenerateRequest(
                chat=chat, sampling=pb.SamplingParams(max_tokens=50)))]
        assert replica.submitted[0].prompt_token_ids == [256, 97, 98]  # BOS + bytes
        assert text[-1].request_id and not text[-1].HasField("usage")
        expected_chat = list(FakeTokenizer().apply_chat_template(
            [{"role": "user", "content": "hi"}]).encode())
        assert replica.submitted[1].prompt_token_ids == expected_chat  # no second BOS
        assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP
        assert stopped[-1].stop_token_id == 100
    run(body)


BAD_REQUESTS = [
    (pb.GenerateRequest(), "input:"),
    (pb.GenerateRequest(text=""), "text:"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
    (token_request([1, 600]), "token_ids.ids[1]"),
    (token_request([-1]), "token_ids.ids[0]"),
    (token_request(list(range(64))), "token_ids: the prompt has 64 tokens"),
    (pb.GenerateRequest(text="x" * 80), "text: the prompt has 81 tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                        sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(top_p=0)),
     "sampling.top_p"),
    (token_request([1], max_tokens=0), "sampling.max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                        sampling=pb.SamplingParams(max_tokens=2, min_tokens=3)),
     "sampling.min_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(logprobs=21)),
     "sampling.logprobs"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(seed=2**63)),
     "sampling.seed"),
    (token_request([1], model="gpt-9"), "model"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot")])),
     "chat.messages"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])),
     "chat.messages[0].role"),
    (token_request([1], request_id="x" * 300), "request_id"),
]


def test_every_bad_input_gets_invalid_argument_naming_the_field() -> None:
    async def body() -> None:
        replica = FakeReplica("r0")
        async with serving([replica]) as (_, stub, _):
            for request, field in BAD_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(request):
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert err.value.details().startswith(field), (field, err.value.details())
            # Still serving, and nothing bad reached the replica.
            ok = [r async for r in stub.Generate(token_request([1], max_tokens=2))]
            assert ok[-1].usage.completion_tokens == 2
            assert len(replica.submitted) == 1
    run(body)


def test_api_keys_are_required_except_for_health() -> None:
    async def body() -> None:
        async with serving([FakeReplica("r0")], api_keys=("k-one", "k-two")) as (_, stub, ch):
            for metadata in [(), (("authorization", "Bearer wrong"),),
                             (("authorization", "k-one"),)]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(token_request([1]), metadata=metadata):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer k-two"),)
            out = [r async for r in stub.Generate(token_request([1], max_tokens=2),
                                                  metadata=good)]
            assert out[-1].usage.completion_tokens == 2
            assert await health_status(ch) == SERVING
    run(body)


def test_admission_limit_answers_resource_exhausted() -> None:
    async def body() -> None:
        replica = FakeReplica("r0", step_delay_s=0.02)
        async with serving([replica], max_outstanding=2) as (server, stub, _):
            calls = [stub.Generate(token_request([i + 1], max_tokens=200)) for i in range(2)]
            for call in calls:
                await call.read()  # admitted and streaming
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(token_request([9])):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_outstanding" in err.value.details()
            for call in calls:
                call.cancel()
            await eventually(lambda: server.fleet.num_outstanding == 0)
            out = [r async for r in stub.Generate(token_request([9], max_tokens=1))]
            assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
    run(body)


def test_cancel_mid_stream_aborts_on_the_replica() -> None:
    async def body() -> None:
        replica = FakeReplica("r0", step_delay_s=0.01)
        async with serving([replica]) as (server, stub, _):
            call = stub.Generate(token_request([5], max_tokens=500, request_id="gone"))
            await call.read()
            await call.read()
            call.cancel()
            await eventually(lambda: replica.aborted == ["gone"])
            assert server.fleet.num_outstanding == 0
            assert replica.running_ids == []
    run(body)


def test_deadline_exceeded_aborts_on_the_replica() -> None:
    async def body() -> None:
        replica = FakeReplica("r0", step_delay_s=0.01)
        async with serving([replica]) as (server, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(
                        token_request([5], max_tokens=500, request_id="late"), timeout=0.2):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: replica.aborted == ["late"])
            assert server.fleet.num_outstanding == 0
    run(body)


def test_drain_stops_admitting_and_finishes_in_flight_requests() -> None:
    async def body() -> None:
        replica = FakeReplica("r0", step_delay_s=0.005)
        async with serving([replica]) as (server, stub, channel):
            assert await health_status(channel) == SERVING
            call = stub.Generate(token_request([1], max_tokens=20))
            await call.read()
            drained = asyncio.create_task(server.drain(timeout=5))
            await eventually(lambda: server.draining)
            assert await health_status(channel) == NOT_SERVING
            assert await health_status(channel, "tandem.v1.Generation") == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(token_request([2])):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = []
            while (r := await call.read()) is not grpc.aio.EOF:
                rest.append(r)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert await drained is True
    run(body)


def test_no_replica_means_not_serving_until_one_is_added() -> None:
    async def body() -> None:
        async with serving([]) as (server, stub, channel):
            assert await health_status(channel) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(token_request([1])):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            server.add_replica(FakeReplica("late"))
            await asyncio.sleep(0.01)
            assert await health_status(channel) == SERVING
            out = [r async for r in stub.Generate(token_request([1], max_tokens=1))]
            assert out[-1].token_ids == [2]
    run(body)


def test_tokenize_list_models_model_info_and_reflection() -> None:
    async def body() -> None:
        async with serving([FakeReplica("r0")]) as (_, stub, channel):
            tok = await stub.Tokenize(pb.TokenizeRequest(text="hi", add_special_tokens=False))
            assert list(tok.token_ids) == [104, 105] and tok.max_model_len == 64
            models = await stub.ListModels(pb.ListModelsRequest())
            assert [m.name for m in models.models] == ["fake-model"]
            info = await stub.ModelInfo(pb.ModelInfoRequest())
            assert info.model.block_size == 4 and list(info.model.eos_token_ids) == [257]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfo(pb.ModelInfoRequest(model="nope"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Tokenize(pb.TokenizeRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflect.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            answer = await call.read()
            await call.done_writing()
            names = {s.name for s in answer.list_services_response.service}
            assert {"tandem.v1.Generation", "grpc.health.v1.Health"} <= names
    run(body)


def test_logprobs_are_forwarded() -> None:
    async def body() -> None:
        async with serving([FakeReplica("r0")]) as (_, stub, _):
            out = [r async for r in stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(max_tokens=2,
                                                                           logprobs=2)))]
        logprobs = [lp for r in out for lp in r.logprobs]
        assert [lp.sampled.token_id for lp in logprobs] == [2, 3]
        assert [(t.token_id, t.logprob, t.rank) for t in logprobs[0].top] == [(2, 0.0, 1),
                                                                             (3, -1.0, 2)]
    run(body)


class _FailingReplica(FakeReplica):
    """Reports an engine-side error for every request after its first token."""

    def _step(self, seq):  # type: ignore[no-untyped-def]
        delta = super()._step(seq)
        if seq.num_output < 2:
            return delta
        self._running.pop(seq.request.request_id, None)
        return OutputDelta(request_id=delta.request_id, token_ids=[], finish_reason="error",
                           error="CUDA out of memory")


def test_engine_error_ends_the_stream_with_internal() -> None:
    async def body() -> None:
        async with serving([_FailingReplica("r0")]) as (server, stub, _):
            call = stub.Generate(token_request([1], max_tokens=10))
            first = await call.read()
            assert list(first.token_ids) == [2]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "CUDA out of memory" in err.value.details()
            assert server.fleet.num_outstanding == 0
    run(body)


def test_tls(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")

    async def body(tmp: Path) -> None:
        key, cert = tmp / "key.pem", tmp / "cert.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
        config = RouterConfig(tls_cert_path=str(cert), tls_key_path=str(key))
        server = await start_server(config, [FakeReplica("r0")], FakeTokenizer(), CARD)
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as ch:
                out = [r async for r in pb_grpc.GenerationStub(ch).Generate(
                    token_request([1], max_tokens=2))]
                assert out[-1].usage.completion_tokens == 2
        finally:
            await server.stop(0)

    run(lambda: body(tmp_path))


def test_clients_may_reuse_request_ids() -> None:
    async def body() -> None:
        replica = FakeReplica("r0")
        async with serving([replica]) as (_, stub, _):
            outs = await asyncio.gather(*(
                _tokens(stub.Generate(token_request([i], max_tokens=3, request_id="same")))
                for i in (10, 20)))
        assert outs == [[11, 12, 13], [21, 22, 23]]
        assert len({r.request_id for r in replica.submitted}) == 2
    run(body)


async def _tokens(call: grpc.aio.UnaryStreamCall) -> list[int]:
    return [t async for r in call for t in r.token_ids if r.request_id == "same"]
