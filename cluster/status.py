"""`tandem status`: a deployment's replicas, where they run, their load and health, as a table.

The router actor answers (RouterActor.status) from its own state: the controller's replica set,
fresh stats (one call per replica) and each replica's placement (asked once, then cached). The
CLI finds the router by its deployment name in namespace "tandem" (cluster/deployment_ops.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import msgspec

from protos.messages import ReplicaStats

ASK_TIMEOUT_S = 5.0


class ReplicaPlacement(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str = ""
    node_ip: str = ""
    devices: str = ""  # "cuda:0,1" or "cpu"


class ReplicaRow(msgspec.Struct, kw_only=True):
    replica_id: str
    state: str  # ready | draining
    placement: ReplicaPlacement
    stats: ReplicaStats | None  # None: it did not answer in time

    @property
    def health(self) -> str:
        if self.stats is None:
            return "no answer"
        return "ok" if self.stats.healthy else "failed"


class DeploymentStatus(msgspec.Struct, kw_only=True):
    name: str
    model: str
    address: str
    replicas: list[ReplicaRow]
    starting: int
    router_outstanding: int
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    autoscaling: str  # the policy and bounds, or "off"
    last_decision: str  # "" before the first


def replica_placement() -> ReplicaPlacement:
    """Where the calling actor runs (called inside a replica's actor)."""
    import ray

    ctx = ray.get_runtime_context()
    gpus = ray.get_gpu_ids()
    return ReplicaPlacement(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                            devices=f"cuda:{','.join(str(g) for g in gpus)}" if gpus else "cpu")


async def ask_placement(actor: Any) -> ReplicaPlacement:
    try:
        raw = await asyncio.wait_for(actor.where.remote(), ASK_TIMEOUT_S)
    except Exception:  # an older replica without where(), or one that is busy dying
        return ReplicaPlacement()
    return msgspec.msgpack.decode(raw, type=ReplicaPlacement)


class StatusReporter:
    """Router side: builds a DeploymentStatus from the controller and the fleet monitor."""

    def __init__(self, name: str, model: str, address: str, controller: Any, monitor: Any,
                 autoscaling: Any) -> None:
        self.name, self.model, self.address = name, model, address
        self.controller = controller
        self.monitor = monitor
        self.autoscaling = autoscaling
        self._placements: dict[str, ReplicaPlacement] = {}  # replicas do not move

    async def status(self) -> DeploymentStatus:
        import time

        live = {**self.controller.replicas, **self.controller.draining}
        unknown = [rid for rid in live if rid not in self._placements]
        found = await asyncio.gather(*(ask_placement(live[rid].actor) for rid in unknown))
        self._placements.update(zip(unknown, found))
        for rid in set(self._placements) - set(live):
            del self._placements[rid]
        stats = await self.monitor.fresh_stats(list(live.values()))
        rows = [ReplicaRow(replica_id=rid, state="ready" if rid in self.controller.replicas
                           else "draining", placement=self._placements[rid],
                           stats=stats.get(rid, self.monitor.last_stats.get(rid)))
                for rid in live]
        window, now = self.monitor.ttft_window, time.time()
        a = self.autoscaling
        decision = self.monitor.last_decision
        return DeploymentStatus(
            name=self.name, model=self.model, address=self.address, replicas=rows,
            starting=self.controller.num_starting,
            router_outstanding=self.monitor.server.fleet.num_outstanding,
            ttft_p50_s=window.quantile(0.5, now), ttft_p90_s=window.quantile(0.9, now),
            autoscaling="off" if a is None else
            f"{a.policy} [{a.min_replicas}, {a.max_replicas}]",
            last_decision="" if decision is None else
            f"{decision.direction} {decision.current} -> {decision.desired}: {decision.reason}")


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def format_table(status: DeploymentStatus) -> str:
    head = ["REPLICA", "STATE", "NODE", "DEVICES", "RUNNING", "WAITING", "KV USE", "PREFIX HIT",
            "HEALTH"]
    rows = []
    for r in status.replicas:
        s = r.stats
        rows.append([r.replica_id, r.state, r.placement.node_ip or "?", r.placement.devices or "?",
                     str(s.num_running) if s else "-", str(s.num_waiting) if s else "-",
                     _pct(s.kv_usage) if s else "-", _pct(s.prefix_hit_rate) if s else "-",
                     r.health])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [
        f"deployment {status.name}: {status.model} on {status.address}, "
        f"{len(status.replicas)} replica(s), {status.starting} starting, "
        f"{status.router_outstanding} request(s) in flight",
        f"TTFT p50 {_secs(status.ttft_p50_s)}, p90 {_secs(status.ttft_p90_s)} (router side); "
        f"autoscaling {status.autoscaling}",
    ]
    if status.last_decision:
        lines.append(f"last decision: {status.last_decision}")
    lines.append("")
    for row in [head, *rows]:
        lines.append("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def run_status(address: str | None, name: str, as_json: bool, out: Any = None) -> int:
    """The `tandem status` driver: joins the cluster, asks the named router, prints."""
    import ray

    from cluster.deployment_ops import NAMESPACE, router_actor_name

    out = out or sys.stdout
    ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR")
    try:
        try:
            router = ray.get_actor(router_actor_name(name), namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(
                f"no deployment named {name!r} on this cluster (looked for actor "
                f"{router_actor_name(name)!r} in namespace {NAMESPACE!r}); pass --name") from None
        raw = ray.get(router.status.remote(), timeout=30)
        status = msgspec.msgpack.decode(raw, type=DeploymentStatus)
    finally:
        ray.shutdown()
    if as_json:
        print(json.dumps(msgspec.to_builtins(status), indent=2), file=out)
    else:
        print(format_table(status), file=out)
    return 0
