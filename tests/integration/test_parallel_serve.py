"""`tandem serve` with one tensor-parallel (tp=2) replica: a gRPC stream equals offline greedy,
and killing rank 1 mid-stream fails the replica, the controller replaces it and the stream
goes on where it was (nothing lost or duplicated)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray

from cluster.serve import Deployment, deploy
from cluster.serve_config import build_serve_config
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.serve_utils import text_model
from tests.integration.test_serve_grpc import greedy_request, offline_greedy, wait_for
from worker.config import EngineConfig
from worker.engine import Engine

pytestmark = pytest.mark.slow
KV_BYTES = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_model(tmp_path_factory.mktemp("tp-serve-model"))


@pytest.fixture(scope="module")
def deployment(model_dir: Path) -> Iterator[Deployment]:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    config = build_serve_config(None, {
        "model": str(model_dir), "replicas": 1,
        "engine": {"kv_cache_bytes": KV_BYTES, "num_threads": 1, "dtype": "float32"},
        "replica": {"num_cpus": 0.5, "tensor_parallel_size": 2, "health_check_period_s": 0.5,
                    "restart_backoff_s": 0.5, "collective_timeout_s": 20},
        "router": {"port": 0, "drain_timeout_s": 10},
    })
    dep = deploy(config, model_dir, "tiny")
    try:
        yield dep
    finally:
        dep.shutdown(drain_timeout_s=5)
        ray.shutdown()


def test_tp2_replica_streams_offline_greedy_and_survives_a_killed_rank(
        deployment: Deployment, model_dir: Path) -> None:
    offline = Engine(EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES, num_threads=1,
                                  dtype="float32"), model_dir)
    prompts = [[11, 12, 13, 14, 15], [300, 301, 302]]
    max_tokens = 120
    expected = [ids for ids, _ in offline_greedy(offline, prompts, max_tokens)]
    rank0 = ray.get(deployment.router.replica_actors.remote())["replica-0"]
    (rank1,) = ray.get(rank0.rank_actors.remote())

    async def body() -> list[list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{deployment.info.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            started = asyncio.Event()
            counts = [0] * len(prompts)

            async def one(i: int) -> list[int]:
                out: list[int] = []
                async for r in stub.Generate(greedy_request(max_tokens, ids=prompts[i]),
                                             timeout=120):
                    out += r.token_ids
                    counts[i] = len(out)
                    if min(counts) >= 4:
                        started.set()
                return out

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
            await asyncio.wait_for(started.wait(), 60)
            assert max(counts) < max_tokens, "streams finished before the kill"
            ray.kill(rank1, no_restart=True)
            return list(await asyncio.gather(*tasks))

    got = asyncio.run(asyncio.wait_for(body(), 150))
    assert got == expected
    wait_for(lambda: ray.get(deployment.router.replacements_total.remote()) >= 1, 60,
             "a replacement replica")
    ids = ray.get(deployment.router.replica_ids.remote())
    assert ids and "replica-0" not in ids


def test_a_taken_rank0_port_is_retried_with_a_fresh_one(deployment: Deployment, model_dir: Path,
                                                        tmp_path: Path, monkeypatch) -> None:
    """Rank 0's store port is found by binding and closing a socket, so another process can
    take it first (seen once under load: EADDRINUSE). The start then retries with a fresh port
    instead of failing the replica."""
    import os
    import socket

    from cluster import parallel_replica
    from cluster.placement import remove_group
    from cluster.serve_config import ReplicaSettings

    held = socket.socket()
    held.bind(("", 0))
    held.listen()
    taken = held.getsockname()[1]
    marker = str(tmp_path / "first-address-given")

    def address() -> tuple[str, int]:  # runs as a Ray task: the held port first, then a free one
        if not os.path.exists(marker):
            open(marker, "w").close()
            return ray.util.get_node_ip_address(), taken
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    monkeypatch.setattr(parallel_replica, "_rank0_address", address)
    settings = ReplicaSettings(num_cpus=0.5, tensor_parallel_size=2, collective_timeout_s=20,
                               start_timeout_s=120)
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=KV_BYTES, num_threads=1,
                          dtype="float32")
    try:
        started = asyncio.run(parallel_replica.start_parallel_replica(
            "port-retry", config, "tiny", settings))
    finally:
        held.close()
    try:
        assert os.path.exists(marker), "the taken port was never handed out"
        assert started.card.name == "tiny"
    finally:
        remove_group(started.placement_group)
