"""Starting a tensor/pipeline-parallel replica: one placement group, one actor per bundle.

Rank r sits in bundle r. Rank 0 is the ReplicaActor (engine, scheduler, sampler); ranks 1.. are
RankActors. Order of start-up:
1. reserve the group (STRICT_PACK for a single stage, PACK across stages) and check that each
   stage's TP ranks landed on one node;
2. find rank 0's node IP and a free port there (a tiny task in bundle 0): the TCP store of
   torch.distributed lives there;
3. create every actor at once: their constructors join the process groups together (devices are
   picked inside the actors, after Ray has set CUDA_VISIBLE_DEVICES), build their shards, warm
   up and agree on the KV cache size;
4. wait for all of them; any failure kills them all and removes the group.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import msgspec
import ray
from ray.util import placement_group_table
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import (
    Bundle,
    PlacementError,
    create_replica_group,
    remove_group,
    replica_bundles,
    wait_until_ready,
)
from cluster.serve_config import ReplicaSettings
from protos.messages import encode
from worker.config import EngineConfig


def parallel_bundles(replica: ReplicaSettings) -> list[Bundle]:
    """One bundle per rank, in rank order (stage-major), with each stage's extra resources."""
    tp = replica.tensor_parallel_size
    bundles = replica_bundles(replica.num_cpus, replica.num_gpus, tp,
                              replica.pipeline_parallel_size, replica.resources)
    for rank, bundle in enumerate(bundles):
        if replica.stage_resources:
            bundle.update(replica.stage_resources[rank // tp])
    return bundles


def group_strategy(replica: ReplicaSettings) -> str:
    # One stage: all ranks all-reduce, so one node or nothing. Several stages: only the hops
    # between stages may cross nodes; PACK still keeps them on one node when one has room.
    return "STRICT_PACK" if replica.pipeline_parallel_size == 1 else "PACK"


def check_tp_groups_local(pg: PlacementGroup, tp: int, pp: int) -> None:
    """PACK may split a stage's TP ranks over nodes; refuse that rather than all-reduce over
    the network twice per layer."""
    if tp == 1 or pp == 1:
        return
    nodes = placement_group_table(pg).get("bundles_to_node_id", {})
    for stage in range(pp):
        where = {nodes.get(r) for r in range(stage * tp, (stage + 1) * tp)}
        if len(where) > 1:
            raise PlacementError(
                f"pipeline stage {stage}'s {tp} tensor-parallel ranks were placed on "
                f"{len(where)} nodes; each stage needs {tp} bundles on one node. Free a node's "
                "worth of resources, or pin stages to nodes with replica.stage_resources.")


log = logging.getLogger(__name__)

PORT_ATTEMPTS = 3  # fresh ports to try for rank 0's store before the start fails


def _rank0_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


async def start_parallel_replica(replica_id: str, config: EngineConfig, model_name: str,
                                 replica: ReplicaSettings) -> Any:
    """Like replica_actor.start_replica, for tp * pp > 1; returns a StartedReplica."""
    from cluster.rank_actor import RankActor
    from cluster.replica_actor import MAX_CONCURRENCY, ReplicaActor, StartedReplica
    from protos.messages import ModelCard
    from worker.distributed import ParallelSpec

    tp, pp = replica.tensor_parallel_size, replica.pipeline_parallel_size
    bundles = parallel_bundles(replica)
    strategy = group_strategy(replica)
    pg = create_replica_group(f"tandem-{replica_id}", bundles, strategy)
    actors: list[Any] = []
    try:
        await wait_until_ready(pg, bundles, replica.start_timeout_s, strategy)
        check_tp_groups_local(pg, tp, pp)
        engine_config = encode(config)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            addr_task = ray.remote(_rank0_address).options(
                num_cpus=0, scheduling_strategy=_in_bundle(pg, 0))
            addr, port = await addr_task.remote()
            spec = encode(ParallelSpec(
                tensor_parallel_size=tp, pipeline_parallel_size=pp, master_addr=addr,
                master_port=port, pipeline_layers=replica.pipeline_layers,
                collective_timeout_s=replica.collective_timeout_s))
            for rank in range(1, tp * pp):
                actors.append(ray.remote(RankActor).options(
                    num_cpus=bundles[rank]["CPU"], num_gpus=bundles[rank].get("GPU", 0),
                    max_concurrency=4, max_restarts=0, scheduling_strategy=_in_bundle(pg, rank),
                ).remote(replica_id, rank, engine_config, spec))
            rank0 = ray.remote(ReplicaActor).options(
                num_cpus=bundles[0]["CPU"], num_gpus=bundles[0].get("GPU", 0),
                max_concurrency=MAX_CONCURRENCY, max_restarts=0,
                scheduling_strategy=_in_bundle(pg, 0),
            ).remote(replica_id, engine_config, model_name, 0, spec, list(actors))
            actors.insert(0, rank0)
            refs = [a.ready.remote() for a in actors]
            try:
                results = await _all_ready(refs, replica.start_timeout_s, replica_id)
                break
            except RuntimeError as exc:
                # The free port was found by binding and closing a socket, so another process
                # can take it before rank 0's store binds it: try again with a fresh one.
                if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("replica %s: rank 0's port %d was taken meanwhile; retrying with "
                            "another", replica_id, port)
                for actor in actors:
                    ray.kill(actor, no_restart=True)
                actors = []
        card = msgspec.msgpack.decode(results[0], type=ModelCard)
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_group(pg)
        raise
    return StartedReplica(replica_id=replica_id, actor=rank0, placement_group=pg, card=card)


async def _all_ready(refs: list[Any], timeout_s: float, replica_id: str) -> list[Any]:
    """Waits for every rank; the first failure wins (the others would only time out waiting
    for the failed rank in a collective)."""
    tasks = [asyncio.ensure_future(_awaited(r)) for r in refs]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        for rank, task in enumerate(tasks):
            if task in done and task.exception() is not None:
                exc = task.exception()
                cause = getattr(exc, "cause", None) or exc
                raise RuntimeError(f"rank {rank} of replica {replica_id} failed to start: "
                                   f"{type(cause).__name__}: {cause}") from None
        if pending:
            late = [rank for rank, task in enumerate(tasks) if task in pending]
            raise TimeoutError(f"ranks {late} of replica {replica_id} did not load the model "
                               f"within {timeout_s:g} s")
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


async def _awaited(ref: Any) -> Any:
    return await ref
