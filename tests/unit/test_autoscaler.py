"""Autoscaling policies on synthetic load signals, with a fake clock: up, hold, down, bounds,
hysteresis, scale to zero and back."""

from __future__ import annotations

import pytest

from cluster.autoscaler import Autoscaler, AutoscalerConfig, LoadSignals, propose
from cluster.serve_config import build_serve_config
from protos.messages import ReplicaStats
from worker.config import ConfigError


def replicas(n: int, running: int = 0, waiting: int = 0, kv_free: int = 100) -> list[ReplicaStats]:
    return [ReplicaStats(replica_id=f"r{i}", num_running=running, num_waiting=waiting,
                         kv_blocks_total=100, kv_blocks_free=kv_free) for i in range(n)]


def config(**kw) -> AutoscalerConfig:
    base = dict(min_replicas=1, max_replicas=4, upscale_delay_s=10, downscale_delay_s=60,
                target_ongoing_requests=4)
    return AutoscalerConfig(**{**base, **kw})


def test_scales_up_only_after_the_upscale_delay_and_to_the_smallest_ask() -> None:
    scaler = Autoscaler(config())
    busy = LoadSignals(replicas=replicas(1), router_outstanding=12)  # needs 3
    d = scaler.decide(busy, now=0)
    assert (d.direction, d.desired) == ("hold", 1) and "after 10 s" in d.reason
    less = LoadSignals(replicas=replicas(1), router_outstanding=6)  # needs 2
    assert scaler.decide(less, now=5).direction == "hold"
    d = scaler.decide(busy, now=10)
    # The most conservative ask over the delay wins: 2, not 3.
    assert (d.direction, d.current, d.desired) == ("up", 1, 2)
    assert "12 ongoing requests, target 4 per replica" in d.reason


def test_a_dip_back_to_target_restarts_the_delay() -> None:
    scaler = Autoscaler(config())
    busy = LoadSignals(replicas=replicas(1), router_outstanding=8)
    ok = LoadSignals(replicas=replicas(1), router_outstanding=4)
    scaler.decide(busy, now=0)
    assert scaler.decide(ok, now=9).direction == "hold"  # back on target: the run ends
    assert scaler.decide(busy, now=10).direction == "hold"  # a new run starts at 10
    assert scaler.decide(busy, now=19).direction == "hold"
    assert scaler.decide(busy, now=20).direction == "up"


def test_scales_down_after_the_longer_delay_and_never_below_min() -> None:
    scaler = Autoscaler(config(min_replicas=2))
    idle = LoadSignals(replicas=replicas(4), router_outstanding=0)
    assert scaler.decide(idle, now=0).direction == "hold"
    assert scaler.decide(idle, now=59).direction == "hold"
    d = scaler.decide(idle, now=60)
    assert (d.direction, d.desired) == ("down", 2) and "bounded to [2, 4]" in d.reason


def test_never_above_max_and_starting_replicas_count() -> None:
    scaler = Autoscaler(config(upscale_delay_s=0))
    flood = LoadSignals(replicas=replicas(2), num_starting=1, router_outstanding=1000)
    d = scaler.decide(flood, now=0)
    assert (d.current, d.desired) == (3, 4)
    at_max = LoadSignals(replicas=replicas(4), router_outstanding=1000)
    d = scaler.decide(at_max, now=1)
    assert d.direction == "hold" and "bounded" in d.reason


def test_out_of_bounds_is_corrected_at_once() -> None:
    scaler = Autoscaler(config(min_replicas=2))
    d = scaler.decide(LoadSignals(replicas=replicas(1)), now=0)
    assert (d.direction, d.desired) == ("up", 2) and "outside [2, 4]" in d.reason


def test_scale_to_zero_needs_asking_and_wakes_on_a_refused_request() -> None:
    with pytest.raises(ValueError, match="allow_scale_to_zero"):
        AutoscalerConfig(min_replicas=0)
    scaler = Autoscaler(config(min_replicas=0, allow_scale_to_zero=True, downscale_delay_s=0))
    d = scaler.decide(LoadSignals(replicas=replicas(1)), now=0)
    assert (d.direction, d.desired) == ("down", 0)
    assert scaler.decide(LoadSignals(replicas=[]), now=1).direction == "hold"
    d = scaler.decide(LoadSignals(replicas=[], refused_total=3), now=2)
    assert (d.direction, d.desired) == ("up", 1) and "scale from zero" in d.reason
    # The same refusals are not counted twice.
    assert scaler.decide(LoadSignals(replicas=[], refused_total=3), now=3).direction == "hold"


def test_queue_depth_policy() -> None:
    cfg = config(policy="queue_depth", target_queue_depth=2)
    up = propose(cfg, LoadSignals(replicas=replicas(2, running=8, waiting=10), max_num_seqs=8))
    assert up.desired == 4 and "10.0 waiting per replica > target 2" in up.reason
    hold = propose(cfg, LoadSignals(replicas=replicas(2, running=8, waiting=1), max_num_seqs=8))
    assert hold.desired == 2
    # Nothing waits, but 2 x 8 running would not fit half-full on one replica: hold.
    assert propose(cfg, LoadSignals(replicas=replicas(2, running=8), max_num_seqs=8)).desired == 2
    down = propose(cfg, LoadSignals(replicas=replicas(2, running=1), max_num_seqs=8))
    assert down.desired == 1 and "fit on 1" in down.reason


def test_kv_utilization_policy() -> None:
    cfg = config(policy="kv_utilization", target_kv_utilization=0.5)
    assert propose(cfg, LoadSignals(replicas=replicas(2, kv_free=10))).desired == 4  # 1.8 / .5
    assert propose(cfg, LoadSignals(replicas=replicas(2, kv_free=75))).desired == 1  # 0.5 / .5
    assert propose(cfg, LoadSignals(replicas=replicas(2, kv_free=50))).desired == 2


def test_ttft_slo_policy() -> None:
    cfg = config(policy="ttft_slo", ttft_slo_s=0.5)
    slow = propose(cfg, LoadSignals(replicas=replicas(2), ttft_s=0.8, router_outstanding=5))
    assert slow.desired == 4 and "p90 TTFT 0.800 s > SLO 0.5 s" in slow.reason
    far = propose(cfg, LoadSignals(replicas=replicas(4), ttft_s=9.0, router_outstanding=5))
    assert far.desired == 8  # at most double per decision
    fast = propose(cfg, LoadSignals(replicas=replicas(2), ttft_s=0.1, router_outstanding=5))
    assert fast.desired == 1
    assert propose(cfg, LoadSignals(replicas=replicas(2), ttft_s=0.4)).desired == 2
    assert propose(cfg, LoadSignals(replicas=replicas(2), ttft_s=None)).desired == 1
    assert propose(cfg, LoadSignals(replicas=replicas(2), router_outstanding=3)).desired == 2


def test_autoscaling_in_a_serve_config() -> None:
    cfg = build_serve_config(None, {"replicas": 2, "autoscaling": {
        "policy": "kv_utilization", "min_replicas": 1, "max_replicas": 3}})
    assert cfg.autoscaling is not None and cfg.autoscaling.policy == "kv_utilization"
    assert build_serve_config(None, {}).autoscaling is None  # off unless asked for
    with pytest.raises(ConfigError, match=r"within autoscaling\.min_replicas\.\.max_replicas"):
        build_serve_config(None, {"replicas": 5, "autoscaling": {"max_replicas": 3}})
    with pytest.raises(ConfigError, match=r"Expected `str` matching|policy"):
        build_serve_config(None, {"autoscaling": {"policy": "vibes"}})
    with pytest.raises(ConfigError, match="unknown field `max_replica`"):
        build_serve_config(None, {"autoscaling": {"max_replica": 3}})
