"""Continuous batching with one token budget per step and no prefill/decode phases.

Every scheduled sequence advances its computed-token count towards its token count: a new prompt
by a (possibly chunked) prefill, a running sequence by its one new token. Running sequences are
served first, in arrival order; when the KV cache is full the latest-arrived running sequence is
preempted (its blocks freed, to be recomputed later, mostly from the prefix cache). Waiting
sequences are admitted first-come first-served while budget, sequence slots and blocks last.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.kv.kv_manager import KVManager
from worker.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, kv: KVManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, num_lookahead: int = 0) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted_now = False

        # 1. Running sequences, oldest first; the newest are preempted when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.can_append(seq, num_new, num_lookahead):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                preempted_now = True
                if victim is seq:
                    break
            else:
                self.kv.append(seq, num_new, num_lookahead)
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1

        # 2. Waiting sequences, FCFS; none admitted in a step that had to preempt.
        while (self.waiting and budget > 0 and not preempted_now
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            cached = self.kv.find_cached_prefix(seq) if not seq.block_table else []
            num_new = seq.num_tokens - len(cached) * self.kv.block_size
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.can_allocate(seq, num_new + num_lookahead, cached):
                break
            self.kv.allocate(seq, num_new + num_lookahead, cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.block_table:
            self.kv.free(seq)
