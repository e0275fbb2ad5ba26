"""Building a parallel rank's runner, and the step loop of every rank other than 0.

Ranks other than 0 get no Ray call per step: a thread of their own waits for rank 0's next
StepPlan broadcast and runs it, until rank 0 says stop or a peer is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from worker.compute_thread import start_compute_thread
from worker.config import EngineConfig, ModelConfig
from worker.distributed import ParallelSpec, init_process_groups
from worker.model_runner import resolve_device
from worker.parallel_runner import ParallelRunner

log = logging.getLogger(__name__)


def build_parallel_runner(config: EngineConfig, spec: ParallelSpec, rank: int) -> ParallelRunner:
    """Joins the process groups and builds this rank's shard. Call it only after Ray has set
    the visible devices (inside the rank's actor): the device is chosen here."""
    model_dir = Path(config.model)
    model_config = ModelConfig.from_hf_dir(model_dir)
    device = resolve_device(config.device)
    groups = init_process_groups(spec, rank, model_config.num_layers, device)
    return ParallelRunner(config, model_config, model_dir, groups)


class RankWorker:
    """A rank > 0: its runner plus the thread that executes rank 0's plans."""

    def __init__(self, config: EngineConfig, spec: ParallelSpec, rank: int,
                 on_failure: Callable[[], None] | None = None) -> None:
        """`on_failure` runs after the step loop failed; the Ray actor passes one that ends the
        process, so that peers blocked in a collective with this rank see its sockets close
        at once instead of waiting out the collective timeout."""
        if rank == 0:
            raise ValueError("rank 0 runs the engine (cluster.replica_actor), not a RankWorker")
        self.rank = rank
        self.error: str | None = None
        self.stopped = False
        self._on_failure = on_failure
        self.runner: ParallelRunner

        def build() -> ParallelRunner:
            # On the thread that steps it (worker/compute_thread.py says why); set before the
            # loop starts reading it.
            self.runner = build_parallel_runner(config, spec, rank)
            return self.runner

        self._thread, _ = start_compute_thread(f"rank-{rank}", build, lambda _: self._loop())

    def _loop(self) -> None:
        try:
            while (plan := self.runner.channel.receive()) is not None:
                self.runner.execute(plan)
            log.info("rank %d: stopped by rank 0", self.rank)
        except Exception as exc:  # the replica is broken; health() reports it
            log.exception("rank %d: step loop failed", self.rank)
            self.error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            self.stopped = True
        if self.error is not None and self._on_failure is not None:
            self._on_failure()

    def health(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.stopped:
            return f"rank {self.rank} has stopped"
        return None
