"""Process groups of one tensor/pipeline-parallel replica, and the channel rank 0 uses to send
every other rank the plan of each step.

Ranks are numbered stage-major: rank = stage * tp + tp_rank, so rank 0 is stage 0's first
tensor rank (the one that schedules and samples) and each stage's TP group is a contiguous run
of ranks (one placement-group node). Three kinds of group:
- the world group on the device backend (NCCL on CUDA, gloo on CPU): pipeline send/recv;
- one TP group per stage, same backend: the all-reduces inside attention and MLP blocks;
- a CPU (gloo) group over all ranks: the per-step StepPlan broadcast and start-up agreements.
  It is separate so that a plan never queues behind tensor traffic, and it stays on the CPU
  because a plan is bytes the host must read anyway.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from protos.messages import StepPlan, decoder, encode
from worker.parallel import CommTimer, StageInfo, TPInfo, split_layers

log = logging.getLogger(__name__)

# Ranks other than 0 wait in the plan broadcast while the replica is idle; that wait is not a
# hang (a dead rank 0 closes its sockets and wakes them with an error, and the controller kills
# a replica whose rank 0 stopped answering), so it gets a bound measured in days, not seconds.
_IDLE_TIMEOUT = timedelta(days=30)
_STOP = -1  # plan size that tells the other ranks to leave their loop


class PeerLostError(RuntimeError):
    """A rank of this replica died or stopped answering mid-step. The replica must be rebuilt;
    its requests did nothing wrong and may move to another replica."""


class ParallelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a rank needs to join its replica's process groups (sent to each rank actor)."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    master_addr: str  # rank 0's node IP: the TCP store lives there
    master_port: int
    pipeline_layers: list[int] | None = None  # layers per stage; None: even split
    collective_timeout_s: float = 60.0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size


@dataclass
class ProcessGroups:
    rank: int
    world_size: int
    tp: TPInfo
    stage: StageInfo
    cpu_group: Any  # gloo, all ranks
    timeout_s: float
    timer: CommTimer

    @property
    def prev_rank(self) -> int:
        """The same TP rank in the previous stage: where this rank's input comes from."""
        return self.rank - self.tp.size

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp.size

    @property
    def last_stage_head(self) -> int:
        """The rank that sends the last stage's logits to rank 0."""
        return (self.stage.size - 1) * self.tp.size


def free_port() -> int:
    """A TCP port free on this node now. The store binds it moments later; another process
    taking it in between fails start-up with 'address in use', and the replica is retried."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_groups(spec: ParallelSpec, rank: int, num_layers: int,
                        device: torch.device) -> ProcessGroups:
    """Joins the replica's groups; blocks until every rank has joined (or the timeout)."""
    tp_size, pp_size = spec.tensor_parallel_size, spec.pipeline_parallel_size
    timeout = timedelta(seconds=spec.collective_timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.monotonic()
    dist.init_process_group(backend=backend,
                            init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
                            rank=rank, world_size=spec.world_size, timeout=timeout)
    # Every rank creates every group, in the same order: new_group is collective.
    cpu_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    timer = CommTimer()
    tp_group = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend, timeout=timeout) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    stage_index = spec.stage_of(rank)
    start, end = split_layers(num_layers, pp_size, spec.pipeline_layers)[stage_index]
    log.info("rank %d/%d joined (%s, stage %d layers %d-%d) in %.1f s", rank, spec.world_size,
             backend, stage_index, start, end - 1, time.monotonic() - t0)
    return ProcessGroups(
        rank=rank, world_size=spec.world_size,
        tp=TPInfo(rank=rank % tp_size, size=tp_size, group=tp_group, timer=timer),
        stage=StageInfo(rank=stage_index, size=pp_size, start=start, end=end),
        cpu_group=cpu_group, timeout_s=spec.collective_timeout_s, timer=timer)


def destroy_process_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def min_over_ranks(groups: ProcessGroups, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.cpu_group)
    return int(t.item())


class PlanChannel:
    """Rank 0 -> all: each step's StepPlan as msgspec bytes in a uint8 tensor, size first."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self._decoder = decoder(StepPlan)

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.groups.cpu_group)

    def send(self, plan: StepPlan) -> None:
        payload = encode(plan)
        self._broadcast(torch.tensor([len(payload)], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8))

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([_STOP], dtype=torch.int64))

    def receive(self) -> StepPlan | None:
        """The next plan, or None when rank 0 said stop."""
        size = torch.empty(1, dtype=torch.int64)
        self._broadcast(size)
        n = int(size.item())
        if n == _STOP:
            return None
        payload = torch.empty(n, dtype=torch.uint8)
        self._broadcast(payload)
        return self._decoder.decode(payload.numpy().tobytes())
