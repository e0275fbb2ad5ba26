"""Serving metrics through ray.util.metrics: the Ray dashboard and Prometheus see them.

Ray exports every metric with a `ray_` prefix (counters also get `_total`), so `tandem_ttft_seconds`
is scraped as `ray_tandem_ttft_seconds_bucket`. Recording is an in-process call (a few
microseconds, measured); Ray's metrics agent collects the values on its own schedule, so nothing
here adds a Ray call per token or per request.

Where each figure comes from:
- latencies (TTFT, inter-token, end to end): the router's side of each replica handle
  (MeteredReplicaHandle), timed from the request's arrival at the router, so router queueing
  and the router↔replica hop are included, as a client sees them;
- load, KV cache, prefix hits, token counters: the replicas' ReplicaStats, fetched by the
  FleetMonitor once per interval;
- replica count and autoscaler decisions: the FleetMonitor;
- GPU utilisation, memory, temperature, power: cluster/gpu_telemetry.py inside each replica.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from protos.messages import PollResult, ReplicaStats, Request
from router.replica import ReplicaHandle

TAGS = ("model", "deployment", "replica")

# Bucket edges in seconds: TTFT spans a fast prefill to a long queue; inter-token latency is a
# decode step, from a GPU's milliseconds to a CPU's tenths of a second.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class ServeMetrics:
    """The deployment's metric objects; one per router actor (never module state)."""

    def __init__(self, model: str, deployment: str) -> None:
        self.base = {"model": model, "deployment": deployment}
        self.ttft = Histogram("tandem_ttft_seconds", "time to first token, seen by the router",
                              boundaries=TTFT_BUCKETS, tag_keys=TAGS)
        self.itl = Histogram("tandem_inter_token_latency_seconds",
                             "time between output tokens, seen by the router",
                             boundaries=ITL_BUCKETS, tag_keys=TAGS)
        self.e2e = Histogram("tandem_e2e_latency_seconds", "request arrival to last token",
                             boundaries=E2E_BUCKETS, tag_keys=TAGS)
        self.requests = Counter("tandem_requests", "finished requests by finish reason",
                                tag_keys=(*TAGS, "finish_reason"))
        self.running = Gauge("tandem_running_requests", "requests running on a replica",
                             tag_keys=TAGS)
        self.waiting = Gauge("tandem_waiting_requests", "requests waiting on a replica",
                             tag_keys=TAGS)
        self.kv_usage = Gauge("tandem_kv_cache_usage", "fraction of KV cache blocks in use",
                              tag_keys=TAGS)
        self.prefix_hit_rate = Gauge("tandem_prefix_cache_hit_rate",
                                     "prompt tokens found in the prefix cache / looked up",
                                     tag_keys=TAGS)
        self.spec_acceptance = Gauge("tandem_spec_acceptance_rate",
                                     "accepted / proposed speculative tokens", tag_keys=TAGS)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "prompt tokens computed",
                                     tag_keys=TAGS)
        self.generation_tokens = Counter("tandem_generation_tokens", "tokens generated",
                                         tag_keys=TAGS)
        self.preemptions = Counter("tandem_preemptions", "sequences preempted", tag_keys=TAGS)
        # Speculative decoding, as counters so that dashboards take rates over any window:
        # accepted/proposed is the acceptance rate, emitted/verifications the tokens a verify
        # step yields per sequence (the speed-up's ceiling), proposer seconds per emitted token
        # the drafting cost, gated steps how often the measured gate ran plain decoding.
        self.spec_proposed = Counter("tandem_spec_proposed_tokens",
                                     "speculative tokens proposed", tag_keys=TAGS)
        self.spec_accepted = Counter("tandem_spec_accepted_tokens",
                                     "speculative tokens accepted by the target", tag_keys=TAGS)
        self.spec_verifications = Counter("tandem_spec_verifications",
                                          "sequence verifications (one per sequence and step)",
                                          tag_keys=TAGS)
        self.spec_emitted = Counter("tandem_spec_emitted_tokens",
                                    "tokens emitted by verifications (accepted + bonus)",
                                    tag_keys=TAGS)
        self.spec_proposer_seconds = Counter("tandem_spec_proposer_seconds",
                                             "wall time spent proposing", tag_keys=TAGS)
        self.spec_gated_steps = Counter("tandem_spec_gated_steps",
                                        "steps the measured gate ran without speculation",
                                        tag_keys=TAGS)
        dep = ("model", "deployment")
        self.replicas = Gauge("tandem_replicas", "replicas by state (ready, starting, draining)",
                              tag_keys=(*dep, "state"))
        self.outstanding = Gauge("tandem_router_outstanding_requests",
                                 "requests the router holds", tag_keys=dep)
        self.desired = Gauge("tandem_autoscaler_desired_replicas",
                             "the autoscaler's last decision", tag_keys=dep)
        self.decisions = Counter("tandem_autoscaler_decisions",
                                 "autoscaler decisions that changed the replica count",
                                 tag_keys=(*dep, "direction", "policy"))
        self._last: dict[str, ReplicaStats] = {}  # per replica: counters already exported

    def tags(self, replica: str = "", **extra: str) -> dict[str, str]:
        return {**self.base, "replica": replica, **extra} if replica else {**self.base, **extra}

    def record_replica(self, replica_id: str, stats: ReplicaStats) -> None:
        """Gauges from fresh stats; counters advance by what changed since the last call."""
        tags = self.tags(replica_id)
        self.running.set(stats.num_running, tags)
        self.waiting.set(stats.num_waiting, tags)
        self.kv_usage.set(stats.kv_usage, tags)
        self.prefix_hit_rate.set(stats.prefix_hit_rate, tags)
        if stats.spec_proposed_tokens_total:
            self.spec_acceptance.set(stats.spec_acceptance_rate, tags)
        last = self._last.get(replica_id, ReplicaStats())
        for counter, field in (
                (self.prompt_tokens, "prompt_tokens_total"),
                (self.generation_tokens, "generation_tokens_total"),
                (self.preemptions, "num_preempted_total"),
                (self.spec_proposed, "spec_proposed_tokens_total"),
                (self.spec_accepted, "spec_accepted_tokens_total"),
                (self.spec_verifications, "spec_verifications_total"),
                (self.spec_emitted, "spec_emitted_tokens_total"),
                (self.spec_proposer_seconds, "spec_proposer_seconds_total"),
                (self.spec_gated_steps, "spec_gated_steps_total")):
            now, before = getattr(stats, field), getattr(last, field)
            if now > before:
                counter.inc(now - before, tags)
        self._last[replica_id] = stats

    def forget_replica(self, replica_id: str) -> None:
        """A retired replica's gauges drop to zero instead of freezing at their last value."""
        tags = self.tags(replica_id)
        for gauge in (self.running, self.waiting, self.kv_usage):
            gauge.set(0, tags)
        self._last.pop(replica_id, None)


class TtftWindow:
    """TTFT samples of the last `window_s` seconds, for the ttft_slo policy's quantile."""

    def __init__(self, window_s: float, max_samples: int = 10_000) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, ttft_s: float, now: float) -> None:
        self._samples.append((now, ttft_s))

    def quantile(self, q: float, now: float) -> float | None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class _Timing:
    __slots__ = ("arrival", "first", "last", "replica_id")

    def __init__(self, arrival: float, replica_id: str) -> None:
        self.arrival = arrival
        self.first: float | None = None
        self.last = arrival
        self.replica_id = replica_id  # where it runs now


class LatencyTracker:
    """Per-request timing across the router's handles, keyed by request id.

    Shared by every handle of a deployment so that a request re-submitted to another replica
    after a failure keeps its arrival time and first token: no second TTFT sample for it.
    """

    # Requests that never finish here (their client left and the abort raced the replica's
    # removal) are forgotten after this long so the table cannot grow without bound.
    STALE_S = 3600.0

    def __init__(self, metrics: ServeMetrics, ttft_window: TtftWindow) -> None:
        self.metrics = metrics
        self.ttft_window = ttft_window
        self._timings: dict[str, _Timing] = {}

    def submitted(self, replica_id: str, requests: list[Request], now: float) -> None:
        for r in requests:
            timing = self._timings.get(r.request_id)
            if timing is None:
                timing = self._timings[r.request_id] = _Timing(r.arrival_time or now, replica_id)
                if r.prior_output_token_ids:
                    # Moved here after its tokens began streaming: its TTFT was not this one.
                    timing.first = timing.last = now
            timing.replica_id = replica_id

    def polled(self, replica_id: str, result: PollResult, now: float) -> None:
        if not result.deltas:
            return
        tags = self.metrics.tags(replica_id)
        for delta in result.deltas:
            timing = self._timings.get(delta.request_id)
            if timing is None:
                continue
            n = len(delta.token_ids)
            if n:
                if timing.first is None:
                    timing.first = now
                    ttft = now - timing.arrival
                    self.metrics.ttft.observe(ttft, tags)
                    self.ttft_window.add(ttft, now)
                else:
                    # One sample per delta: the step's tokens share its wall time.
                    self.metrics.itl.observe((now - timing.last) / n, tags)
                timing.last = now
            if delta.finish_reason is not None:
                del self._timings[delta.request_id]
                self.metrics.e2e.observe(now - timing.arrival, tags)
                self.metrics.requests.inc(1, {**tags, "finish_reason": delta.finish_reason})

    def aborted(self, replica_id: str, request_ids: list[str]) -> None:
        """Forgets aborted requests, except those that moved on to another replica (the router
        aborts a request on a replica it takes it away from)."""
        for rid in request_ids:
            timing = self._timings.get(rid)
            if timing is not None and timing.replica_id == replica_id:
                del self._timings[rid]

    def sweep(self, now: float) -> None:
        stale = [rid for rid, t in self._timings.items() if now - t.last > self.STALE_S]
        for rid in stale:
            del self._timings[rid]

    def __len__(self) -> int:
        return len(self._timings)


class MeteredReplicaHandle(ReplicaHandle):
    """A ReplicaHandle that times what passes through it; no extra call to the replica.

    Implements the router's ReplicaHandle contract by delegation: the router cannot tell it
    from the handle it wraps.
    """

    def __init__(self, inner: ReplicaHandle, tracker: LatencyTracker) -> None:
        self.inner = inner
        self.replica_id = inner.replica_id
        self.tracker = tracker

    async def submit(self, requests: list[Request]) -> None:
        self.tracker.submitted(self.replica_id, requests, time.time())
        await self.inner.submit(requests)

    async def poll(self) -> PollResult:
        result = await self.inner.poll()
        self.tracker.polled(self.replica_id, result, time.time())
        return result

    async def abort(self, request_ids: list[str]) -> None:
        self.tracker.aborted(self.replica_id, request_ids)
        await self.inner.abort(request_ids)

    async def stats(self) -> ReplicaStats:
        return await self.inner.stats()

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # e.g. the Ray handle's `actor`
        return getattr(self.inner, name)

