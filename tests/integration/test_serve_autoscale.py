"""Autoscaling on a local Ray: 1 → 2 → 1 replicas under a loopback gRPC load generator, with no
failed request (scale-down drains), then the Ray metrics as Prometheus scrapes them from Ray's
metrics agent, and the status the router reports. One Ray and one deployment for the module."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgspec
import pytest
import ray

from cluster.serve import Deployment, deploy
from cluster.serve_config import build_serve_config
from cluster.status import DeploymentStatus, format_table
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.serve_utils import text_model

MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, metrics_port: int
               ) -> Iterator[Deployment]:
    model = text_model(tmp_path_factory.mktemp("autoscale-model"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             # Ray's own knob: push metrics to the agent every 0.5 s instead of 10 s.
             _system_config={"metrics_report_interval_ms": 500})
    config = build_serve_config(None, {
        "model": str(model), "replicas": 1, "metrics_interval_s": 0.5,
        "engine": {"kv_cache_bytes": 1 << 20, "num_threads": 1, "dtype": "float32",
                   "max_num_seqs": 4},
        "replica": {"num_cpus": 0.5, "health_check_period_s": 1.0},
        "router": {"port": 0, "drain_timeout_s": 30},
        "autoscaling": {"policy": "target_ongoing_requests", "target_ongoing_requests": 2,
                        "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.5,
                        "downscale_delay_s": 2.0, "interval_s": 0.5},
    })
    dep = deploy(config, model, "tiny")
    try:
        yield dep
    finally:
        dep.shutdown(drain_timeout_s=5)
        ray.shutdown()


class Load:
    """Closed-loop clients on loopback; every request must stream MAX_TOKENS and end LENGTH."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._clients: list[tuple[asyncio.Task, asyncio.Event]] = []

    async def set_concurrency(self, n: int) -> None:
        """Adds clients, or stops some: a stopping client finishes its request in flight."""
        while len(self._clients) > n:
            task, stop = self._clients.pop()
            stop.set()
            await task
        while len(self._clients) < n:
            stop = asyncio.Event()
            self._clients.append(
                (asyncio.create_task(self._client(len(self._clients), stop)), stop))

    async def _client(self, i: int, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            k = 0
            while not stop.is_set():
                k += 1
                request = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[3 + i, 7 + k % 50, 11, 13]),
                    sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                               ignore_eos=True))
                await self._one(stub, request)

    async def _one(self, stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> None:
        try:
            responses = [r async for r in stub.Generate(request, timeout=60)]
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"{exc.code().name}: {exc.details()}")
            return
        got = sum(len(r.token_ids) for r in responses)
        if got != MAX_TOKENS or responses[-1].finish_reason != pb.FINISH_REASON_LENGTH:
            self.failures.append(f"{got} tokens, finish {responses[-1].finish_reason}")
        else:
            self.ok += 1


async def wait_replicas(dep: Deployment, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while len(await dep.router.replica_ids.remote()) != n:
        assert time.monotonic() - t0 < timeout, f"no {n} replica(s) within {timeout} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


def test_scales_one_two_one_under_load_without_failures(deployment: Deployment) -> None:
    async def body() -> None:
        load = Load(deployment.info.port)
        await load.set_concurrency(6)  # 6 ongoing / target 2 → more than max: 2
        await wait_replicas(deployment, 2, 90)
        before = load.ok
        await asyncio.sleep(2.0)  # both replicas take work
        assert load.ok > before
        await load.set_concurrency(1)  # 1 ongoing → 1 replica; the other drains under traffic
        await wait_replicas(deployment, 1, 60)
        after = load.ok
        t0 = time.monotonic()
        while load.ok < after + 2 and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.2)
        await load.set_concurrency(0)
        assert load.failures == []
        assert load.ok >= after + 2

    asyncio.run(asyncio.wait_for(body(), 240))


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of a metric's samples."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            out.append(dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")])))
    return out


def test_metrics_reach_the_ray_metrics_agent(deployment: Deployment, metrics_port: int) -> None:
    names = {
        "ray_tandem_ttft_seconds_bucket": {"replica"},
        "ray_tandem_inter_token_latency_seconds_bucket": {"replica"},
        "ray_tandem_e2e_latency_seconds_count": {"replica"},
        "ray_tandem_requests_total": {"replica", "finish_reason"},
        "ray_tandem_prompt_tokens_total": {"replica"},
        "ray_tandem_generation_tokens_total": {"replica"},
        "ray_tandem_running_requests": {"replica"},
        "ray_tandem_waiting_requests": {"replica"},
        "ray_tandem_kv_cache_usage": {"replica"},
        "ray_tandem_prefix_cache_hit_rate": {"replica"},
        "ray_tandem_replicas": {"state"},
        "ray_tandem_autoscaler_decisions_total": {"direction", "policy"},
        "ray_tandem_autoscaler_desired_replicas": set(),
    }
    # Ray's agent exports on an interval: wait until everything asserted below has arrived.
    deadline = time.monotonic() + 45
    while True:
        text = scrape(metrics_port)
        missing = [n for n in names if not samples(text, n)]
        directions = {s["direction"]
                      for s in samples(text, "ray_tandem_autoscaler_decisions_total")}
        if (not missing and directions == {"up", "down"}) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == [], missing
    for name, tags in names.items():
        for labels in samples(text, name):
            assert labels["model"] == "tiny" and labels["deployment"] == "default", labels
            assert tags <= labels.keys(), (name, labels)
    assert directions == {"up", "down"}
    replicas = {s["replica"] for s in samples(text, "ray_tandem_generation_tokens_total")}
    assert {"replica-0", "replica-1"} <= replicas


def test_status_names_every_replica_and_its_node(deployment: Deployment) -> None:
    raw = ray.get(deployment.router.status.remote(), timeout=30)
    status = msgspec.msgpack.decode(raw, type=DeploymentStatus)
    assert status.name == "default" and status.model == "tiny"
    assert [r.replica_id for r in status.replicas] == ["replica-0"]
    row = status.replicas[0]
    assert row.placement.devices == "cpu" and row.placement.node_ip
    assert row.stats is not None and row.health == "ok"
    assert status.autoscaling == "target_ongoing_requests [1, 2]"
    assert status.last_decision  # the autoscaler has decided at least once
    table = format_table(status)
    assert "replica-0" in table and "HEALTH" in table
    # The router is a named actor of namespace "tandem": what `tandem status` looks up.
    assert ray.get_actor("tandem-router-default", namespace="tandem") is not None


def test_a_second_deployment_with_the_same_name_is_refused(deployment: Deployment,
                                                           tmp_path: Path) -> None:
    config = build_serve_config(None, {"model": str(tmp_path), "router": {"port": 0}})
    with pytest.raises(RuntimeError, match="a deployment named 'default' already runs"):
        deploy(config, tmp_path, "other")
