"""DraftPoolProposer: draft-model Ray actors shared by all replicas.

A sequence is sticky to one actor, chosen by a stable hash of its request id (crc32, the same
in every process), so its draft KV lives in one place. Each step makes one call per actor that
has sequences to serve, carrying all of them (msgspec bytes, never pickle); the calls run in
parallel and are awaited together. An actor that dies or times out is marked dead: its
sequences simply stop speculating, the rest go on.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import msgspec
import ray

from protos.messages import encode
from worker.sequence import Sequence
from worker.spec.draft_proposer import DraftClient
from worker.spec.messages import DraftBatch, DraftReply
from worker.spec.proposer import NO_PROPOSAL, Proposal

log = logging.getLogger(__name__)


def actor_index(seq_id: str, num_actors: int) -> int:
    return zlib.crc32(seq_id.encode()) % num_actors


class DraftPoolProposer(DraftClient):
    name = "pool"

    def __init__(self, actors: list[Any], eos_token_ids: list[int], vocab_size: int, *,
                 timeout_s: float = 5.0) -> None:
        super().__init__(eos_token_ids, vocab_size)
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.dead: set[int] = set()
        self._pending_free: list[list[str]] = [[] for _ in self.actors]
        self._reply = msgspec.msgpack.Decoder(DraftReply)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        out = [NO_PROPOSAL] * len(seqs)
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            a = actor_index(seq.request_id, len(self.actors))
            if a not in self.dead:
                groups.setdefault(a, []).append(i)
        refs = {}
        for a, idx in groups.items():
            batch = DraftBatch(queries=[self.query(seqs[i], ks[i]) for i in idx],
                               freed=self._pending_free[a], eos_token_ids=self.eos_token_ids)
            self._pending_free[a] = []
            refs[a] = self.actors[a].propose.remote(encode(batch))
        if not refs:
            return out
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        ready_set = set(ready)
        for a, ref in refs.items():
            if ref not in ready_set:
                self._mark_dead(a, f"no answer within {self.timeout_s:g} s")
                continue
            try:
                reply = self._reply.decode(ray.get(ref))
            except ray.exceptions.RayError as exc:
                self._mark_dead(a, f"{type(exc).__name__}: {exc}")
                continue
            for i, prop in zip(groups[a], reply.proposals):
                out[i] = self.proposal(seqs[i], prop)
        return out

    def _mark_dead(self, a: int, why: str) -> None:
        self.dead.add(a)
        log.warning("draft actor %d is gone (%s): its sequences continue without speculation",
                    a, why)

    def _freed(self, seq_id: str) -> None:
        a = actor_index(seq_id, len(self.actors))
        if a not in self.dead:
            self._pending_free[a].append(seq_id)
