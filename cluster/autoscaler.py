"""Autoscaling policies as code: load signals in, a replica count and its reason out.

Pure: no Ray, no clock of its own (the caller passes `now`), so every policy and every
hysteresis rule is tested with synthetic signals and a fake clock. FleetMonitor
(cluster/fleet_monitor.py) gathers the signals inside the router actor and the Controller
applies the decisions: more replicas are placement groups that the Ray autoscaler (KubeRay's
in-tree one) turns into nodes; fewer replicas are drained before they are killed.

The policies, each "how many replicas does this load need?":
- target_ongoing_requests: ceil(requests in flight / target per replica), as Ray Serve does.
- queue_depth: grow while replicas' waiting queues exceed the target; shrink when nothing waits
  and the running requests fit on one replica fewer with room to spare.
- kv_utilization: ceil(KV cache in use, summed in replica units / target fraction).
- ttft_slo: grow while the router's TTFT quantile exceeds the SLO; shrink when it is far below.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from protos.messages import ReplicaStats

Policy = Literal["target_ongoing_requests", "queue_depth", "kv_utilization", "ttft_slo"]

# Scale down only when the load would leave this much headroom on the remaining replicas:
# without it, shrinking a fleet that is just busy enough makes the next burst queue at once,
# and the fleet flaps between n and n-1.
DOWNSCALE_HEADROOM = 0.5


class AutoscalerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`autoscaling:` in a ServeConfig. Absent: the deployment keeps `replicas` fixed."""

    policy: Policy = "target_ongoing_requests"
    min_replicas: int = 1
    max_replicas: int = 4
    # Scale to zero saves the GPUs of an idle deployment at the price of a cold start (model load,
    # maybe a new node) for the first request after it: clients get UNAVAILABLE meanwhile.
    allow_scale_to_zero: bool = False
    target_ongoing_requests: float = 16.0  # per replica
    target_queue_depth: float = 2.0  # waiting requests per replica
    target_kv_utilization: float = 0.7  # fraction of each replica's KV blocks in use
    ttft_slo_s: float = 1.0
    ttft_quantile: float = 0.9  # which TTFT quantile must stay within the SLO
    ttft_window_s: float = 60.0  # TTFT samples older than this are forgotten
    # Hysteresis: a change is applied only after the policy has asked for it continuously this
    # long. Up is quick (users are waiting), down is slow (a replica is expensive to get back).
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    interval_s: float = 5.0  # how often the signals are gathered and a decision made

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"autoscaling: {message}")

        need(self.min_replicas >= 0, f"min_replicas must be >= 0 (got {self.min_replicas})")
        need(self.min_replicas >= 1 or self.allow_scale_to_zero,
             "min_replicas 0 means scaling to zero (a cold start for the next request); "
             "set allow_scale_to_zero: true to ask for it, or min_replicas >= 1")
        need(self.max_replicas >= max(1, self.min_replicas),
             f"max_replicas must be >= max(1, min_replicas) (got {self.max_replicas}, "
             f"min_replicas {self.min_replicas})")
        for name in ("target_ongoing_requests", "target_queue_depth", "ttft_slo_s",
                     "ttft_window_s", "interval_s"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(0 < self.target_kv_utilization <= 1,
             f"target_kv_utilization must be in (0, 1] (got {self.target_kv_utilization})")
        need(0 < self.ttft_quantile < 1,
             f"ttft_quantile must be in (0, 1) (got {self.ttft_quantile})")
        need(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0,
             "upscale_delay_s and downscale_delay_s must be >= 0")


class LoadSignals(msgspec.Struct, frozen=True, kw_only=True):
    """What a decision looks at: fresh per-replica stats plus the router's view."""

    replicas: list[ReplicaStats]  # ready replicas (serving, not draining)
    num_starting: int = 0  # replicas asked for and not yet serving
    router_outstanding: int = 0  # requests the router holds: queued to or running on replicas
    refused_total: int = 0  # requests refused because no replica was there (scale from zero)
    ttft_s: float | None = None  # the router's TTFT quantile over the window; None: no samples
    max_num_seqs: int = 64  # concurrent sequences one replica runs (its engine setting)

    @property
    def current(self) -> int:
        return len(self.replicas) + self.num_starting


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    current: int
    desired: int
    reason: str
    policy: str

    @property
    def direction(self) -> Literal["up", "down", "hold"]:
        if self.desired > self.current:
            return "up"
        return "down" if self.desired < self.current else "hold"


class Proposal(msgspec.Struct, frozen=True):
    """A policy's raw answer, before bounds and hysteresis."""

    desired: int
    reason: str


def propose(config: AutoscalerConfig, s: LoadSignals) -> Proposal:
    """The policy's replica count for this load (unbounded, no hysteresis)."""
    current = s.current
    ready = len(s.replicas)
    running = sum(r.num_running for r in s.replicas)
    waiting = sum(r.num_waiting for r in s.replicas)
    if config.policy == "target_ongoing_requests":
        ongoing = max(s.router_outstanding, running + waiting)
        return Proposal(math.ceil(ongoing / config.target_ongoing_requests),
                        f"{ongoing} ongoing requests, target "
                        f"{config.target_ongoing_requests:g} per replica")
    if config.policy == "kv_utilization":
        used = sum(r.kv_usage for r in s.replicas)  # in replica units
        return Proposal(math.ceil(used / config.target_kv_utilization - 1e-9),
                        f"KV cache use {used:.2f} replica(s) worth, target "
                        f"{config.target_kv_utilization:.0%} per replica")
    if config.policy == "queue_depth":
        per = waiting / ready if ready else float(waiting)
        if per > config.target_queue_depth:
            # The excess waits for slots: add replicas for it at the slots each one has.
            excess = waiting - config.target_queue_depth * ready
            extra = max(1, math.ceil(excess / max(1, s.max_num_seqs)))
            return Proposal(current + extra, f"{per:.1f} waiting per replica > target "
                                             f"{config.target_queue_depth:g}")
        if waiting == 0 and current > 0 and \
                running <= (current - 1) * s.max_num_seqs * DOWNSCALE_HEADROOM:
            return Proposal(current - 1, f"nothing waits and {running} running requests fit on "
                                         f"{current - 1} replica(s)")
        return Proposal(current, f"{per:.1f} waiting per replica, target "
                                 f"{config.target_queue_depth:g}")
    # ttft_slo
    if s.ttft_s is None:
        if s.router_outstanding == 0:
            return Proposal(current - 1 if current else 0, "no requests in the TTFT window")
        return Proposal(current, "no TTFT samples yet")
    slo = config.ttft_slo_s
    q = f"p{config.ttft_quantile * 100:g} TTFT {s.ttft_s:.3f} s"
    if s.ttft_s > slo:
        # TTFT is not linear in replicas; grow in proportion but at most double per decision.
        return Proposal(max(current + 1, math.ceil(current * min(s.ttft_s / slo, 2.0))),
                        f"{q} > SLO {slo:g} s")
    if s.ttft_s < slo * DOWNSCALE_HEADROOM:
        return Proposal(current - 1, f"{q} < {DOWNSCALE_HEADROOM:g} x SLO {slo:g} s")
    return Proposal(current, f"{q} within SLO {slo:g} s")


class Autoscaler:
    """Bounds and hysteresis over `propose`: one instance per deployment, fed every interval.

    A change is applied once the policy has asked for the same direction for the whole delay;
    the count applied is the most conservative one asked for in that time (the smallest
    increase, the smallest decrease). Out-of-bounds counts (an initial `replicas` outside
    [min, max]) and a request hitting a deployment scaled to zero are corrected at once.
    """

    def __init__(self, config: AutoscalerConfig) -> None:
        self.config = config
        self._since: float | None = None  # when the current run of up (or down) asks began
        self._direction: str = "hold"
        self._bound: int = 0  # the most conservative count asked for during the run
        self._refused_seen = 0

    def decide(self, signals: LoadSignals, now: float) -> Decision:
        cfg = self.config
        current = signals.current
        refused = signals.refused_total - self._refused_seen
        self._refused_seen = signals.refused_total
        if current == 0 and (refused > 0 or signals.router_outstanding > 0):
            # Waiting out a delay would only lengthen the cold start clients already see.
            return self._apply(current, max(1, cfg.min_replicas),
                               f"{refused} request(s) refused with no replica: scale from zero")
        proposal = propose(cfg, signals)
        target = min(max(proposal.desired, cfg.min_replicas), cfg.max_replicas)
        bounded = "" if target == proposal.desired else \
            f" (bounded to [{cfg.min_replicas}, {cfg.max_replicas}])"
        if current < cfg.min_replicas or current > cfg.max_replicas:
            return self._apply(current, target,
                               f"{current} replicas outside [{cfg.min_replicas}, "
                               f"{cfg.max_replicas}]")
        if target == current:
            self._reset()
            return Decision(current=current, desired=current, policy=cfg.policy,
                            reason=f"hold: {proposal.reason}{bounded}")
        direction = "up" if target > current else "down"
        if direction != self._direction:
            self._direction, self._since, self._bound = direction, now, target
        # Most conservative over the run: the smallest step in this direction.
        self._bound = min(self._bound, target) if direction == "up" else max(self._bound, target)
        delay = cfg.upscale_delay_s if direction == "up" else cfg.downscale_delay_s
        assert self._since is not None
        waited = now - self._since
        if waited >= delay:
            return self._apply(current, self._bound, f"{proposal.reason}{bounded}; "
                                                     f"asked for {waited:.0f} s")
        return Decision(current=current, desired=current, policy=cfg.policy,
                        reason=f"hold: {proposal.reason}{bounded}; scale {direction} to "
                               f"{self._bound} after {delay:g} s ({waited:.0f} s so far)")

    def _apply(self, current: int, desired: int, reason: str) -> Decision:
        self._reset()
        return Decision(current=current, desired=desired, policy=self.config.policy,
                        reason=reason)

    def _reset(self) -> None:
        self._direction, self._since, self._bound = "hold", None, 0
