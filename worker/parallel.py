"""Process-group facts a layer needs: its tensor-parallel rank, size and group, and which
pipeline stage (and so which decoder layers) it belongs to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


class CommTimer:
    """Seconds spent inside collectives; read by bench/parallel.py. Host time: on CUDA the
    kernels are asynchronous, so it measures only launch and any wait for peers."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def add(self, t0: float) -> None:
        self.seconds += time.perf_counter() - t0
        self.calls += 1


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1
    timer: CommTimer | None = field(default=None, compare=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            t0 = time.perf_counter()
            dist.all_reduce(x, group=self.group)
            if self.timer is not None:
                self.timer.add(t0)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        if self.timer is not None:
            self.timer.add(t0)
        return torch.cat(parts, dim=-1)


SINGLE = TPInfo()


def split_layers(num_layers: int, num_stages: int,
                 layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of each pipeline stage's decoder layers: as given, or as even as possible.
    An uneven remainder goes to the later stages: the first stage also embeds, and its rank 0
    also schedules and samples, so it should carry the fewest layers."""
    if num_stages < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1 (got {num_stages})")
    if layers_per_stage:
        if len(layers_per_stage) != num_stages or any(n < 1 for n in layers_per_stage):
            raise ValueError(f"pipeline layers {layers_per_stage} must give {num_stages} "
                             "positive counts, one per stage")
        if sum(layers_per_stage) != num_layers:
            raise ValueError(f"pipeline layers {layers_per_stage} add up to "
                             f"{sum(layers_per_stage)}, but the model has {num_layers} layers")
        counts = list(layers_per_stage)
    else:
        if num_layers < num_stages:
            raise ValueError(f"{num_layers} layers cannot be split into {num_stages} stages")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


@dataclass(frozen=True)
class StageInfo:
    """One pipeline stage: its index, the number of stages, and its layers [start, end)."""

    rank: int = 0
    size: int = 1
    start: int = 0
    end: int | None = None  # None: to the last layer (the whole model)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return self.start, num_layers if self.end is None else self.end


WHOLE_MODEL = StageInfo()
