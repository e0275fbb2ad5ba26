"""`tandem serve` on a local Ray: router actor + two replica actors with a tiny model, driven by a
real gRPC client. One deployment for the whole module (Ray and actor start-up dominate); the
replica-kill test runs last because it changes the replica set."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgspec
import pytest
import ray

from cluster import cli
from cluster.placement import PlacementError
from cluster.replica_actor import start_replica
from cluster.serve import Deployment, deploy
from cluster.serve_config import ReplicaSettings, build_serve_config
from protos.messages import ReplicaStats, Request, SamplingParams
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.serve_utils import text_model
from text.detokenizer import IncrementalDetokenizer
from text.tokenizer import Tokenizer
from worker.config import EngineConfig
from worker.engine import Engine

KV_BYTES = 1 << 20
PROMPTS = ["It is a truth universally", "My dear Mr. Bennet", "However little known",
           "the feelings or views of such a man"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def deployment(model_dir: Path) -> Iterator[Deployment]:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    config = build_serve_config(None, {
        "model": str(model_dir), "replicas": 2,
        # fp32: a re-submitted request recomputes its prefix in one prefill; in bf16 that can
        # round differently from step-by-step decoding and flip a greedy pick.
        "engine": {"kv_cache_bytes": KV_BYTES, "num_threads": 1, "dtype": "float32"},
        "replica": {"num_cpus": 0.5, "health_check_period_s": 0.5, "restart_backoff_s": 0.5},
        "router": {"port": 0, "drain_timeout_s": 10},
    })
    dep = deploy(config, model_dir, "tiny")
    try:
        yield dep
    finally:
        dep.shutdown(drain_timeout_s=5)
        ray.shutdown()


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> Engine:
    tok = Tokenizer.from_dir(model_dir)
    return Engine(EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES, num_threads=1,
                               dtype="float32"),
                  model_dir, tok, IncrementalDetokenizer)


def offline_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int
                   ) -> list[tuple[list[int], str]]:
    """What the in-process engine generates greedily, one (tokens, text) per prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, ids in zip(rids, prompts):
        engine.add_request(Request(request_id=rid, prompt_token_ids=ids, sampling=params))
    out = {rid: ([], "") for rid in rids}
    while engine.has_unfinished():
        for d in engine.step():
            tokens, text = out[d.request_id]
            out[d.request_id] = (tokens + d.token_ids, text + d.text)
    return [out[r] for r in rids]


def greedy_request(max_tokens: int, *, text: str | None = None, ids: list[int] | None = None
                   ) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if text is not None:
        return pb.GenerateRequest(text=text, sampling=sampling)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids or []), sampling=sampling)


async def generate(port: int, requests: list[pb.GenerateRequest]) -> list[list[pb.GenerateResponse]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
            return [r async for r in stub.Generate(request, timeout=60)]

        return list(await asyncio.gather(*(one(r) for r in requests)))


def run(coro) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))


def tokens(responses: list[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def replica_stats(dep: Deployment) -> dict[str, ReplicaStats]:
    raw = ray.get(dep.router.replica_stats.remote())
    return {rid: msgspec.msgpack.decode(b, type=ReplicaStats)
            for rid, b in msgspec.msgpack.decode(raw).items()}


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_delta_streams_connect_before_the_first_request(deployment: Deployment) -> None:
    actors = ray.get(deployment.router.replica_actors.remote())
    wait_for(lambda: all(ray.get([a.delta_stream_connected.remote() for a in actors.values()])),
             10, "the router to connect to every replica's delta stream")


def test_streamed_output_equals_offline_greedy(deployment: Deployment, offline: Engine,
                                               model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    expected = offline_greedy(offline, [tok.encode(p) for p in PROMPTS], 24)
    got = run(generate(deployment.info.port, [greedy_request(24, text=p) for p in PROMPTS]))
    for (want_ids, want_text), responses in zip(expected, got):
        assert tokens(responses) == want_ids
        assert "".join(r.text for r in responses) == want_text
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Streamed, not one message at the end. The router sends what a replica produced since the
    # last message, so 24 tokens of a tiny model can all arrive together when the host is busy;
    # 200 tokens cannot.
    [long] = run(generate(deployment.info.port, [greedy_request(200, text=PROMPTS[0])]))
    assert len(tokens(long)) == 200 and len(long) > 1


def test_two_replicas_both_take_work(deployment: Deployment) -> None:
    before = replica_stats(deployment)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(12)] for _ in range(8)]
    run(generate(deployment.info.port, [greedy_request(8, ids=p) for p in prompts]))
    after = replica_stats(deployment)
    assert len(after) == 2
    for rid, stats in after.items():
        assert stats.prompt_tokens_total > before[rid].prompt_tokens_total, rid
    # Their poll results came over the delta streams, not one actor call per step.
    actors = ray.get(deployment.router.replica_actors.remote())
    assert all(ray.get([a.delta_stream_connected.remote() for a in actors.values()]))


def test_shared_prefix_prompts_land_on_one_replica(deployment: Deployment) -> None:
    rng = random.Random(2)
    prefix = [rng.randrange(3, 1000) for _ in range(48)]  # three full 16-token blocks
    before = replica_stats(deployment)
    cached = []
    for i in range(4):
        (responses,) = run(generate(deployment.info.port,
                                    [greedy_request(4, ids=[*prefix, 5 + i, 9])]))
        cached.append(responses[-1].usage.cached_tokens)
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:]), cached
    after = replica_stats(deployment)
    gained = {rid: after[rid].prefix_hits_total - before[rid].prefix_hits_total for rid in after}
    assert sorted(gained.values())[0] == 0 and max(gained.values()) >= 3 * 32, gained


def test_cancel_mid_stream_frees_every_block(deployment: Deployment) -> None:
    async def cancel_after_two() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{deployment.info.port}") as channel:
            call = pb_grpc.GenerationStub(channel).Generate(
                greedy_request(200, ids=[11, 12, 13, 14, 15]))
            seen = 0
            async for response in call:
                seen += len(response.token_ids)
                if seen >= 2:
                    call.cancel()
                    break
            return seen

    seen = run(cancel_after_two())
    assert 2 <= seen < 200

    def all_free() -> bool:
        stats = replica_stats(deployment).values()
        return all(s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0 for s in stats)

    wait_for(all_free, 10, "every KV block to be free after the cancel")


def test_bad_input_is_invalid_argument_and_serving_goes_on(deployment: Deployment) -> None:
    async def body() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{deployment.info.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            bad = [greedy_request(4, ids=[1, 5000]),
                   pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-1.0)),
                   greedy_request(4, ids=list(range(3, 300)))]  # longer than max_model_len 256
            for request in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    _ = [r async for r in stub.Generate(request)]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            ok = [r async for r in stub.Generate(greedy_request(3, ids=[7, 8, 9]))]
            assert len(tokens(ok)) == 3

    run(body())


def test_cli_generate_against_the_server(deployment: Deployment, offline: Engine,
                                         model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    target = f"127.0.0.1:{deployment.info.port}"
    tok = Tokenizer.from_dir(model_dir)
    expected = offline_greedy(offline, [tok.encode(p) for p in PROMPTS[:2]], 6)
    argv = ["generate", "--server", target, "--max-tokens", "6", "--ignore-eos", "--json"]
    for p in PROMPTS[:2]:
        argv += ["--prompt", p]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["prompt"], d["token_ids"], d["text"], d["finish_reason"]) for d in lines] == [
        (p, ids, text, "length") for p, (ids, text) in zip(PROMPTS[:2], expected)]
    assert lines[0]["num_prompt_tokens"] == len(tok.encode(PROMPTS[0]))

    # One prompt, no --json: streamed text and a newline, as offline.
    assert cli.main(["generate", "--server", target, "--max-tokens", "6", "--ignore-eos",
                     "--prompt", PROMPTS[0]]) == 0
    assert capsys.readouterr().out == expected[0][1] + "\n"

    # A gRPC error is one line and a non-zero exit: refused input, and no server at all.
    assert cli.main(["generate", "--server", target, "--prompt", "word " * 300]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INVALID_ARGUMENT: text: the prompt has" in err[0], err
    assert cli.main(["generate", "--server", "127.0.0.1:1", "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tandem: error: 127.0.0.1:1: UNAVAILABLE")


def test_missing_resources_fail_placement_with_a_clear_error(model_dir: Path,
                                                             deployment: Deployment) -> None:
    settings = ReplicaSettings(num_cpus=64, start_timeout_s=1.0)
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES)
    with pytest.raises(PlacementError, match=r"CPU: 64 needed.*Lower --replicas"):
        run(start_replica("too-big", config, "tiny", settings))


def test_zz_killing_a_replica_mid_stream_loses_and_duplicates_nothing(
        deployment: Deployment, offline: Engine) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(6)]
    max_tokens = 150
    expected = offline_greedy(offline, prompts, max_tokens)
    actors = ray.get(deployment.router.replica_actors.remote())
    killed: list[str] = []

    async def body() -> list[list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{deployment.info.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            started = asyncio.Event()
            counts = [0] * len(prompts)

            async def one(i: int) -> list[int]:
                out: list[int] = []
                async for r in stub.Generate(greedy_request(max_tokens, ids=prompts[i]),
                                             timeout=60):
                    out += r.token_ids
                    counts[i] = len(out)
                    if all(counts):
                        started.set()
                return out

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
            await asyncio.wait_for(started.wait(), 30)
            stats = msgspec.msgpack.decode(await deployment.router.replica_stats.remote())
            busy = [rid for rid, b in stats.items()
                    if msgspec.msgpack.decode(b, type=ReplicaStats).num_running > 0]
            assert busy and max(counts) < max_tokens, "streams finished before the kill"
            victim = busy[0]
            ray.kill(actors[victim], no_restart=True)
            killed.append(victim)
            return list(await asyncio.gather(*tasks))

    got = run(body())
    for (want, _), have in zip(expected, got):
        assert have == want
    # The controller notices (router callback or health check) and brings up a replacement.
    wait_for(lambda: ray.get(deployment.router.replacements_total.remote()) >= 1, 30,
             "a replacement replica")
    ids = ray.get(deployment.router.replica_ids.remote())
    assert len(ids) == 2 and killed[0] not in ids
    after = run(generate(deployment.info.port,
                         [greedy_request(4, ids=p) for p in prompts[:4]]))
    assert [tokens(r) for r in after] == [w[:4] for w, _ in expected[:4]]
