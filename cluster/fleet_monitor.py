"""FleetMonitor: once per interval, inside the router actor, turn replica stats into metrics and
(when autoscaling is on) into a scaling decision that the Controller carries out.

One `stats` call per replica per interval (seconds apart, all awaited concurrently): lifecycle
traffic, not per request. Decisions are logged with their reason, counted in
`tandem_autoscaler_decisions`, and the last one is kept for `tandem status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from cluster.autoscaler import Autoscaler, Decision, LoadSignals
from cluster.metrics import LatencyTracker, ServeMetrics, TtftWindow
from protos.messages import ReplicaStats

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0  # a replica slower than this is left out of one round (health checks
# deal with replicas that stay silent)


class FleetMonitor:
    def __init__(self, controller: Any, server: Any, metrics: ServeMetrics,
                 tracker: LatencyTracker, ttft_window: TtftWindow, *,
                 autoscaler: Autoscaler | None, metrics_interval_s: float, max_num_seqs: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.controller = controller
        self.server = server
        self.metrics = metrics
        self.tracker = tracker
        self.ttft_window = ttft_window
        self.autoscaler = autoscaler
        self.metrics_interval_s = metrics_interval_s
        self.max_num_seqs = max_num_seqs
        self.clock = clock
        self.last_decision: Decision | None = None
        self.last_stats: dict[str, ReplicaStats] = {}
        self._next_decision = 0.0
        self._task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._decoder = msgspec.msgpack.Decoder(ReplicaStats)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._retiring]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @property
    def period_s(self) -> float:
        if self.autoscaler is None:
            return self.metrics_interval_s
        return min(self.metrics_interval_s, self.autoscaler.config.interval_s)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bad round must not end monitoring (or autoscaling) for good
                log.exception("fleet monitor round failed")
            await asyncio.sleep(self.period_s)

    async def fresh_stats(self, replicas: list[Any] | None = None) -> dict[str, ReplicaStats]:
        """Stats of the serving replicas (or of `replicas`), straight from them."""
        if replicas is None:
            replicas = list(self.controller.replicas.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(r.actor.stats.remote(), STATS_TIMEOUT_S) for r in replicas),
            return_exceptions=True)
        return {r.replica_id: self._decoder.decode(res)
                for r, res in zip(replicas, results) if isinstance(res, bytes)}

    async def tick(self) -> Decision | None:
        stats = await self.fresh_stats()
        for rid, s in stats.items():
            self.metrics.record_replica(rid, s)
        for rid in set(self.last_stats) - set(stats):
            self.metrics.forget_replica(rid)
        self.last_stats = stats
        fleet = self.server.fleet
        self.metrics.outstanding.set(fleet.num_outstanding, self.metrics.tags())
        for state, n in (("ready", len(self.controller.replicas)),
                         ("starting", self.controller.num_starting),
                         ("draining", len(self.controller.draining))):
            self.metrics.replicas.set(n, self.metrics.tags(state=state))
        self.tracker.sweep(time.time())
        now = self.clock()
        if self.autoscaler is None or now < self._next_decision:
            return None
        self._next_decision = now + self.autoscaler.config.interval_s
        cfg = self.autoscaler.config
        signals = LoadSignals(
            replicas=list(stats.values()), num_starting=self.controller.num_starting,
            router_outstanding=fleet.num_outstanding, refused_total=fleet.refused_total,
            ttft_s=self.ttft_window.quantile(cfg.ttft_quantile, time.time()),
            max_num_seqs=self.max_num_seqs)
        decision = self.autoscaler.decide(signals, now)
        self.apply(decision, stats)
        return decision

    def apply(self, decision: Decision, stats: dict[str, ReplicaStats]) -> None:
        self.last_decision = decision
        self.metrics.desired.set(decision.desired, self.metrics.tags())
        if decision.direction == "hold":
            log.debug("autoscaler: %d replicas: %s", decision.current, decision.reason)
            return
        log.info("autoscaler: %s %d -> %d replicas (%s): %s", decision.direction,
                 decision.current, decision.desired, decision.policy, decision.reason)
        self.metrics.decisions.inc(1, self.metrics.tags(direction=decision.direction,
                                                        policy=decision.policy))
        if decision.direction == "up":
            self.controller.scale_up(decision.desired - decision.current)
            return
        # The least busy replicas go first (newest first on a tie): the fewest requests to wait
        # for while draining, and the oldest prefix caches stay.
        ready = list(self.controller.replicas)
        order = sorted(ready, key=lambda rid: (
            stats[rid].num_running + stats[rid].num_waiting if rid in stats else 0,
            -ready.index(rid)))
        for rid in order[:decision.current - decision.desired]:
            task = asyncio.get_running_loop().create_task(self.controller.scale_down(rid))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
