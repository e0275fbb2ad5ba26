"""Router-side latency tracking, stats → metrics, the status table and router placement options,
without Ray running (ray.util.metrics objects record locally; their record calls are captured)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.deployment_ops import router_actor_options
from cluster.gpu_telemetry import GpuTelemetry
from cluster.metrics import LatencyTracker, MeteredReplicaHandle, ServeMetrics, TtftWindow
from cluster.status import DeploymentStatus, ReplicaPlacement, ReplicaRow, format_table
from protos.messages import OutputDelta, PollResult, ReplicaStats, Request
from router.fakes import FakeReplica


class Captured:
    """Stands in for a ray.util.metrics object: keeps (value, tags) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))

    inc = set = observe


@pytest.fixture
def metrics() -> ServeMetrics:
    m = ServeMetrics("tiny", "dep")
    for name in ("ttft", "itl", "e2e", "requests", "running", "waiting", "kv_usage",
                 "prefix_hit_rate", "spec_acceptance", "prompt_tokens", "generation_tokens",
                 "preemptions", "spec_proposed", "spec_accepted", "spec_verifications",
                 "spec_emitted", "spec_proposer_seconds", "spec_gated_steps"):
        setattr(m, name, Captured())
    return m


def delta(rid: str, n: int, finish: str | None = None) -> OutputDelta:
    return OutputDelta(request_id=rid, token_ids=list(range(n)), finish_reason=finish)


def test_ttft_itl_and_e2e_from_arrival_with_tags(metrics: ServeMetrics) -> None:
    window = TtftWindow(60)
    tracker = LatencyTracker(metrics, window)
    tracker.submitted("replica-0", [Request(request_id="a", prompt_token_ids=[1],
                                            arrival_time=100.0)], now=100.1)
    stats = ReplicaStats()
    tracker.polled("replica-0", PollResult(deltas=[delta("a", 1)], stats=stats), now=100.5)
    tracker.polled("replica-0", PollResult(deltas=[delta("a", 2)], stats=stats), now=100.7)
    tracker.polled("replica-0", PollResult(deltas=[delta("a", 1, "length")], stats=stats),
                   now=101.0)
    tags = {"model": "tiny", "deployment": "dep", "replica": "replica-0"}
    assert metrics.ttft.calls == [(pytest.approx(0.5), tags)]
    assert [v for v, _ in metrics.itl.calls] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert metrics.e2e.calls == [(pytest.approx(1.0), tags)]
    assert metrics.requests.calls == [(1, {**tags, "finish_reason": "length"})]
    assert window.quantile(0.9, now=101.0) == pytest.approx(0.5)
    assert window.quantile(0.9, now=200.0) is None  # out of the window
    assert len(tracker) == 0


def test_a_moved_request_keeps_its_timing_and_gets_no_second_ttft(metrics: ServeMetrics) -> None:
    tracker = LatencyTracker(metrics, TtftWindow(60))
    req = Request(request_id="a", prompt_token_ids=[1], arrival_time=10.0)
    tracker.submitted("r0", [req], now=10.0)
    tracker.polled("r0", PollResult(deltas=[delta("a", 1)], stats=ReplicaStats()), now=10.2)
    moved = Request(request_id="a", prompt_token_ids=[1], arrival_time=10.0,
                    prior_output_token_ids=[0])
    tracker.submitted("r1", [moved], now=10.3)
    tracker.aborted("r0", ["a"])  # the router frees it on the replica it left
    tracker.polled("r1", PollResult(deltas=[delta("a", 1, "stop")], stats=ReplicaStats()),
                   now=10.5)
    assert len(metrics.ttft.calls) == 1 and len(metrics.e2e.calls) == 1
    assert metrics.e2e.calls[0][1]["replica"] == "r1"
    # A fresh request that moved before its first token, and one aborted for good.
    tracker.submitted("r0", [Request(request_id="b", prompt_token_ids=[1])], now=11.0)
    tracker.aborted("r0", ["b"])
    assert len(tracker) == 0


def test_replica_stats_become_gauges_and_counter_increments(metrics: ServeMetrics) -> None:
    s1 = ReplicaStats(num_running=3, num_waiting=1, kv_blocks_total=10, kv_blocks_free=4,
                      prefix_queries_total=10, prefix_hits_total=5, prompt_tokens_total=100,
                      generation_tokens_total=20)
    metrics.record_replica("r0", s1)
    s2 = ReplicaStats(num_running=3, num_waiting=1, kv_blocks_total=10, kv_blocks_free=4,
                      prompt_tokens_total=130, generation_tokens_total=20)
    metrics.record_replica("r0", s2)
    assert [v for v, _ in metrics.prompt_tokens.calls] == [100, 30]
    assert [v for v, _ in metrics.generation_tokens.calls] == [20]  # no change: no call
    assert metrics.kv_usage.calls[0][0] == pytest.approx(0.6)
    assert metrics.prefix_hit_rate.calls[0][0] == pytest.approx(0.5)
    assert metrics.running.calls[0][1] == {"model": "tiny", "deployment": "dep", "replica": "r0"}


def test_speculative_counters_advance_by_what_changed(metrics: ServeMetrics) -> None:
    """Dashboards divide rates of these counters (accepted / proposed, emitted / verifications,
    proposer seconds / emitted), so each must advance by exactly the replica's increment."""
    metrics.record_replica("r0", ReplicaStats())
    assert metrics.spec_acceptance.calls == [] and metrics.spec_proposed.calls == []
    s1 = ReplicaStats(spec_proposed_tokens_total=40, spec_accepted_tokens_total=10,
                      spec_verifications_total=8, spec_emitted_tokens_total=18,
                      spec_proposer_seconds_total=0.5, spec_gated_steps_total=3)
    s2 = ReplicaStats(spec_proposed_tokens_total=60, spec_accepted_tokens_total=25,
                      spec_verifications_total=12, spec_emitted_tokens_total=37,
                      spec_proposer_seconds_total=0.75, spec_gated_steps_total=3)
    metrics.record_replica("r0", s1)
    metrics.record_replica("r0", s2)
    tags = {"model": "tiny", "deployment": "dep", "replica": "r0"}
    assert metrics.spec_proposed.calls == [(40, tags), (20, tags)]
    assert [v for v, _ in metrics.spec_accepted.calls] == [10, 15]
    assert [v for v, _ in metrics.spec_verifications.calls] == [8, 4]
    assert [v for v, _ in metrics.spec_emitted.calls] == [18, 19]
    assert [v for v, _ in metrics.spec_proposer_seconds.calls] == [0.5, 0.25]
    assert [v for v, _ in metrics.spec_gated_steps.calls] == [3]  # unchanged: no call
    assert [v for v, _ in metrics.spec_acceptance.calls] == [0.25, pytest.approx(25 / 60)]
    # A restarted replica starts its counters again from zero: nothing goes backwards.
    metrics.forget_replica("r0")
    metrics.record_replica("r0", ReplicaStats(spec_proposed_tokens_total=5))
    assert metrics.spec_proposed.calls[-1] == (5, tags)


def test_metered_handle_is_transparent() -> None:
    async def body() -> None:
        inner = FakeReplica("r0")
        handle = MeteredReplicaHandle(inner, LatencyTracker(ServeMetrics("m", "d"),
                                                            TtftWindow(60)))
        assert handle.replica_id == "r0"
        await handle.submit([Request(request_id="x", prompt_token_ids=[1, 2])])
        assert [r.request_id for r in inner.submitted] == ["x"]
        await handle.abort(["x"])
        assert inner.aborted == ["x"] and len(handle.tracker) == 0
        assert handle.submitted is inner.submitted  # other attributes pass through

    asyncio.run(body())


def test_status_table() -> None:
    status = DeploymentStatus(
        name="default", model="tiny", address="127.0.0.1:5", starting=1, router_outstanding=2,
        ttft_p50_s=0.1, ttft_p90_s=None, autoscaling="queue_depth [1, 3]",
        last_decision="up 1 -> 2: 5.0 waiting per replica > target 2",
        replicas=[ReplicaRow(replica_id="replica-0", state="ready",
                             placement=ReplicaPlacement(node_ip="10.0.0.2", devices="cuda:0"),
                             stats=ReplicaStats(num_running=2, kv_blocks_total=4,
                                                kv_blocks_free=1, prefix_queries_total=4,
                                                prefix_hits_total=1)),
                  ReplicaRow(replica_id="replica-1", state="draining",
                             placement=ReplicaPlacement(), stats=None)])
    text = format_table(status)
    assert "1 starting, 2 request(s) in flight" in text
    assert "TTFT p50 0.100 s, p90 -" in text and "last decision: up 1 -> 2" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("REPLICA"))
    assert header.split() == ["REPLICA", "STATE", "NODE", "DEVICES", "RUNNING", "WAITING", "KV",
                              "USE", "PREFIX", "HIT", "HEALTH"]
    row0 = next(line for line in lines if line.startswith("replica-0")).split()
    assert row0 == ["replica-0", "ready", "10.0.0.2", "cuda:0", "2", "0", "75%", "25%", "ok"]
    row1 = next(line for line in lines if line.startswith("replica-1")).split()
    assert row1[:2] == ["replica-1", "draining"] and row1[-2:] == ["no", "answer"]


def test_router_actor_options() -> None:
    assert router_actor_options("default", None) == {"name": "tandem-router-default",
                                                     "namespace": "tandem"}
    assert router_actor_options("a", "head")["resources"] == {"node:__internal_head__": 0.001}
    assert router_actor_options("a", "router-pool")["resources"] == {"router-pool": 0.001}


def test_gpu_telemetry_is_off_without_a_gpu() -> None:
    assert GpuTelemetry.start([], {"model": "m", "replica": "r"}) is None
    # Where NVML is missing (no nvidia-ml-py, no driver) an assigned id does not break either.
    GpuTelemetry.start([0], {"model": "m", "replica": "r"})
