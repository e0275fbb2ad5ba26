"""RankActor: the Ray actor hosting one rank (> 0) of a tensor/pipeline-parallel replica.

Ray only creates it, checks its health and kills it: per step it hears from rank 0 through
torch.distributed (worker/rank_worker.py), never through Ray.
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec


class RankActor:
    """Built with ray.remote in cluster/parallel_replica.py, one per bundle after the first."""

    def __init__(self, replica_id: str, rank: int, engine_config: bytes, spec: bytes) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Imported here: torch loads only inside the actor, after Ray has set its devices.
        from worker.config import EngineConfig
        from worker.distributed import ParallelSpec
        from worker.rank_worker import RankWorker

        self.replica_id = replica_id
        config = msgspec.msgpack.decode(engine_config, type=EngineConfig)
        self.worker = RankWorker(config, msgspec.msgpack.decode(spec, type=ParallelSpec), rank,
                                 on_failure=_exit_process)

    async def ready(self) -> int:
        return self.worker.runner.num_blocks

    async def health(self) -> str | None:
        """None while its step loop runs, else why not."""
        return self.worker.health()

    async def timings(self) -> bytes:
        return msgspec.msgpack.encode(self.worker.runner.timings())


def _exit_process() -> None:
    """A rank whose step failed cannot rejoin its replica's lockstep; dying closes its sockets,
    so rank 0's current collective fails now (PeerLostError) instead of after the timeout."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(1)
