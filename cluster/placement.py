"""Placement groups for replicas: one group per replica, every shard of it reserved together.

A replica's bundles are STRICT_PACK (one node): its ranks talk over a process group that should
not cross the network. Today a replica is one bundle; tensor and pipeline parallelism will ask
for tp * pp bundles through replica_bundles.
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
                    pipeline_parallel_size: int = 1) -> list[Bundle]:
    """One bundle per rank (tp * pp ranks): {"CPU": n}, plus {"GPU": 1} on GPUs."""
    bundle: Bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    return [dict(bundle) for _ in range(tensor_parallel_size * pipeline_parallel_size)]


def create_replica_group(name: str, bundles: list[Bundle]) -> PlacementGroup:
    return placement_group(bundles, strategy="STRICT_PACK", name=name)


async def wait_until_ready(pg: PlacementGroup, bundles: list[Bundle], timeout_s: float) -> None:
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
    raise PlacementError(
        f"a replica needs {bundles} on one node (STRICT_PACK) but the cluster could not provide "
        f"them within {timeout_s:g} s ({shown}). Lower --replicas or the per-replica resources "
        "(replica.num_cpus / num_gpus in the config), or add nodes to the Ray cluster.")


def remove_group(pg: PlacementGroup) -> None:
    """Removes a group; a group already gone (e.g. its cluster shut down) is fine."""
    with contextlib.suppress(Exception):  # best effort during teardown
        remove_placement_group(pg)
