"""The model runner of one rank of a tensor/pipeline-parallel replica.

Every rank builds only its shard (its TP slice of its stage's layers), warms up and sizes its
KV cache like a single-process runner, then agrees with the others on the smallest block count
(the scheduler on rank 0 hands out block ids that must exist on every rank). Per step, rank 0
broadcasts the StepPlan and all ranks run `execute` on it (SPMD):

    stage 0:   embed + its layers for micro-batch 0, 1, ...  --send-->  stage 1 ...
    last stage: its layers, final norm, LM head (vocab shards all-gathered in its TP group)
                --send logits-->  rank 0, which samples

Sends are asynchronous (isend) and waited for at the end of the step, so a stage starts its
next micro-batch while the previous one is on the wire. Logits (fp32, sampled rows only) go
back to rank 0 because sampling needs per-request state (penalties, seeds, stop rules) that
only rank 0 keeps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from protos.messages import StepPlan
from worker.config import EngineConfig, ModelConfig
from worker.distributed import PeerLostError, PlanChannel, ProcessGroups, min_over_ranks
from worker.model_runner import ModelRunner
from worker.pipeline import split_plan

log = logging.getLogger(__name__)


class StepTimer:
    """Per-rank split of step time: compute, TP collectives, and waiting on pipeline peers
    (the receive of a stage's input includes the upstream stage's compute: the bubble)."""

    def __init__(self) -> None:
        self.steps = 0
        self.total = 0.0
        self.pp_wait = 0.0
        self.plan = 0.0

    def as_dict(self, tp_comm: float) -> dict[str, float]:
        return {"steps": self.steps, "total_s": self.total, "tp_comm_s": tp_comm,
                "pp_wait_s": self.pp_wait, "plan_s": self.plan,
                "compute_s": self.total - tp_comm - self.pp_wait - self.plan}


class ParallelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path,
                 groups: ProcessGroups) -> None:
        self.groups = groups
        self.channel = PlanChannel(groups)
        self.timer = StepTimer()
        # Warm-up plans are built identically on every rank, so they are not broadcast; from
        # the end of start-up on, rank 0 sends each step's plan.
        self._broadcast = False
        super().__init__(config, model_config, model_dir, tp=groups.tp, stage=groups.stage)
        self._broadcast = groups.rank == 0
        self.timer = StepTimer()  # count serving steps only, not the warm-up
        groups.timer.seconds, groups.timer.calls = 0.0, 0

    # -- start-up --------------------------------------------------------------------------

    def _size_kv_cache(self) -> int:
        mine = super()._size_kv_cache()
        agreed = min_over_ranks(self.groups, mine)
        if agreed != mine:
            log.info("KV cache: %d blocks on this rank, %d agreed by all ranks", mine, agreed)
        return agreed

    # -- per step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs this rank's part of the step. On rank 0: fp32 logits for plan.sample_indices;
        elsewhere the result is not used. Any communication failure is a PeerLostError."""
        t0 = time.perf_counter()
        try:
            if self._broadcast:
                self.channel.send(plan)
                self.timer.plan += time.perf_counter() - t0
            logits = self._run(plan)
        except RuntimeError as exc:
            if isinstance(exc, PeerLostError) or not _is_comm_error(exc):
                raise
            raise PeerLostError(f"rank {self.groups.rank}: a peer of this replica is gone or "
                                f"stopped answering: {exc}") from exc
        self.timer.steps += 1
        self.timer.total += time.perf_counter() - t0
        return logits

    def _run(self, plan: StepPlan) -> torch.Tensor:
        g = self.groups
        stage = g.stage
        vocab = self.model_config.vocab_size
        micro = split_plan(plan, stage.size)
        sends: list[tuple[dist.Work, torch.Tensor]] = []  # keep tensors alive until sent
        logits: list[torch.Tensor] = []
        for mb in micro:
            hidden = None
            if not stage.is_first:
                hidden = torch.empty(mb.num_tokens, self.model_config.hidden_size,
                                     dtype=self.dtype, device=self.device)
                self._recv(hidden, g.prev_rank)
            out = self._forward(mb, hidden)
            if not stage.is_last:
                sends.append((dist.isend(out, g.next_rank), out))
            elif mb.sample_indices:
                idx = torch.tensor(mb.sample_indices, dtype=torch.int64, device=self.device)
                # contiguous: the vocab-padding slice of gathered shards is a view, and a send
                # needs one flat buffer.
                mb_logits = self.model.compute_logits(out.index_select(0, idx)).float().contiguous()
                if g.rank == 0:
                    logits.append(mb_logits)
                elif g.tp.rank == 0:
                    sends.append((dist.isend(mb_logits, 0), mb_logits))
        if g.rank == 0 and not stage.is_last:
            for mb in micro:
                if mb.sample_indices:
                    buf = torch.empty(len(mb.sample_indices), vocab, dtype=torch.float32,
                                      device=self.device)
                    self._recv(buf, g.last_stage_head)
                    logits.append(buf)
        for work, _ in sends:
            work.wait()
        if not logits:
            return torch.empty(0, vocab, dtype=torch.float32, device=self.device)
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _forward(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor:
        dev = self.device
        input_ids = torch.tensor(plan.input_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(plan.positions, dtype=torch.int64, device=dev)
        return self.model(input_ids, positions, self._metadata(plan), hidden).contiguous()

    def _recv(self, buf: torch.Tensor, src: int) -> None:
        t0 = time.perf_counter()
        dist.recv(buf, src)
        self.timer.pp_wait += time.perf_counter() - t0

    # -- lifecycle -------------------------------------------------------------------------

    def stop_peers(self) -> None:
        """Rank 0: tells the other ranks to leave their step loop."""
        if self._broadcast:
            self.channel.send_stop()
            self._broadcast = False

    def timings(self) -> dict[str, float]:
        return self.timer.as_dict(self.groups.timer.seconds)


def _is_comm_error(exc: RuntimeError) -> bool:
    """gloo and NCCL report a lost peer as RuntimeError (DistBackendError is a subclass) with
    the transport's message; a shape or kernel bug says nothing of the kind."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout",
                                         "peer", "socket"))
