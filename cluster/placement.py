"""Placement groups for replicas: one group per replica, every shard of it reserved together.

A replica has one bundle per rank (tp * pp bundles, rank order). Without pipeline parallelism
they are STRICT_PACK (one node): its TP ranks all-reduce twice per layer and must not cross the
network. With pipeline stages the group is PACK (one node when it fits, else spread) and each
stage's TP ranks are checked to share a node (cluster/parallel_replica.py, docs/parallelism.md).
"""

from __future__ import annotations

import asyncio
import contextlib

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

Bundle = dict[str, float]


class PlacementError(RuntimeError):
    """The cluster cannot host a replica; the message says which resources are missing."""


def replica_bundles(num_cpus: float, num_gpus: int = 0, tensor_parallel_size: int = 1,
                    pipeline_parallel_size: int = 1,
                    resources: dict[str, float] | None = None) -> list[Bundle]:
    """One bundle per rank (tp * pp ranks): {"CPU": n}, plus {"GPU": 1} on GPUs, plus the
    custom `resources` (replica.resources: e.g. one only worker nodes declare)."""
    bundle: Bundle = {"CPU": float(num_cpus), **(resources or {})}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    return [dict(bundle) for _ in range(tensor_parallel_size * pipeline_parallel_size)]


def create_replica_group(name: str, bundles: list[Bundle],
                         strategy: str = "STRICT_PACK") -> PlacementGroup:
    return placement_group(bundles, strategy=strategy, name=name)


async def wait_until_ready(pg: PlacementGroup, bundles: list[Bundle], timeout_s: float,
                           strategy: str = "STRICT_PACK") -> None:
    """Waits for the group's resources; on timeout removes it and says what is missing."""
    try:
        await asyncio.wait_for(pg.ready(), timeout_s)
        return
    except asyncio.TimeoutError:
        pass
    remove_placement_group(pg)
    need: Bundle = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    available = ray.available_resources()
    total = ray.cluster_resources()
    missing = {k: v for k, v in need.items() if available.get(k, 0.0) < v}
    shown = ", ".join(f"{k}: {v:g} needed, {available.get(k, 0.0):g} free of "
                      f"{total.get(k, 0.0):g}" for k, v in (missing or need).items())
    where = "on one node (STRICT_PACK)" if strategy == "STRICT_PACK" else f"({strategy})"
    if strategy == "STRICT_PACK" and not missing:
        # Enough in total, but no single node has it all.
        biggest = max((n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")),
                      key=lambda r: r.get("GPU", 0.0) or r.get("CPU", 0.0), default={})
        shown += (f"; enough in the cluster but not on one node: the largest node has "
                  f"{', '.join(f'{k}: {biggest.get(k, 0.0):g}' for k in need)}")
    raise PlacementError(
        f"a replica needs {len(bundles)} bundles {bundles} {where} but the cluster could not "
        f"provide them within {timeout_s:g} s ({shown}). Lower --replicas, --tp/--pp or the "
        "per-replica resources (replica.num_cpus / num_gpus in the config), or add nodes to the "
        "Ray cluster.")


def remove_group(pg: PlacementGroup) -> None:
    """Removes a group; a group already gone (e.g. its cluster shut down) is fine."""
    with contextlib.suppress(Exception):  # best effort during teardown
        remove_placement_group(pg)
