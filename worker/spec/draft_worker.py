"""DraftWorker: a small draft model with its own paged KV cache, proposing for many sequences.

It reuses the engine's parts: a ModelRunner (model, paged KV, flattened steps) and a KVManager
(block tables; no prefix caching). Per sequence it keeps a copy of the target's tokens and how
many of them its KV holds. Each DraftBatch first rolls every sequence back to the prefix the
target confirmed (`prefix_len`: rejected proposals are dropped by trimming computed tokens and
their blocks), appends the target's new tokens, then runs k batched forwards: the first catches
up on everything new and proposes token 1, each further one feeds the last proposal.

A trimmed-vocabulary draft (bench/train_draft.py) carries `draft_vocab.json`; ids are
mapped at the edges so that everything outside speaks the target's vocabulary. Its distribution
q is scattered over the target's vocabulary (tokens outside the draft's get q = 0) and processed
exactly like the target's p (worker/spec/processing.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from worker.config import EngineConfig, ModelConfig
from worker.kv.kv_manager import KVManager
from worker.model_runner import ModelRunner
from worker.scheduler import SchedulerOutput
from worker.spec.config import SpeculativeConfig
from worker.spec.messages import DraftBatch, DraftProposal, DraftQuery, DraftReply
from worker.spec.processing import RowContext, draft_choice, draft_generator

log = logging.getLogger(__name__)

DRAFT_VOCAB_FILE = "draft_vocab.json"
_BLOCK_SIZE = 16
_WARM_TOKENS = 256


class DraftState:
    """One sequence as the draft sees it (duck-types what KVManager and build_plan read)."""

    __slots__ = ("block_hashes", "block_table", "num_cached_tokens", "num_computed_tokens",
                 "num_registered_blocks", "target_ids", "token_ids")

    def __init__(self) -> None:
        self.target_ids: list[int] = []  # the target's vocabulary (history for penalties)
        self.token_ids: list[int] = []  # the draft's vocabulary (model input)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftWorker:
    def __init__(self, model_dir: str | Path, spec: SpeculativeConfig, *, target_vocab_size: int,
                 device: str = "auto", seed: int = 0, num_threads: int | None = None) -> None:
        model_dir = Path(model_dir)
        self.config = EngineConfig(
            model=str(model_dir), dtype=spec.draft_dtype, device=device,
            quantization=spec.draft_format,
            kv_cache_bytes=spec.draft_kv_cache_bytes, block_size=_BLOCK_SIZE,
            enable_prefix_caching=False, max_num_batched_tokens=_WARM_TOKENS,
            num_threads=num_threads)
        self.model_config = ModelConfig.from_hf_dir(model_dir)
        self.runner = ModelRunner(self.config, self.model_config, model_dir)
        self.kv = KVManager(self.runner.num_blocks, _BLOCK_SIZE, enable_prefix_caching=False)
        self.max_len = min(self.model_config.max_position_embeddings,
                           self.runner.num_blocks * _BLOCK_SIZE)
        self.target_vocab_size = target_vocab_size
        self.generator = draft_generator(seed)
        self._load_vocab(model_dir)
        self.states: OrderedDict[str, DraftState] = OrderedDict()  # LRU order
        self._step = 0

    def _load_vocab(self, model_dir: Path) -> None:
        vd = self.model_config.vocab_size
        file = model_dir / DRAFT_VOCAB_FILE
        if file.is_file():
            to_target = json.loads(file.read_text())["target_ids"]
            if len(to_target) != vd:
                raise ValueError(f"{file}: {len(to_target)} ids for a {vd}-token draft vocabulary")
        else:
            if vd > self.target_vocab_size:
                raise ValueError(f"draft vocabulary ({vd}) is larger than the target's "
                                 f"({self.target_vocab_size}) and {file.name} is missing")
            to_target = list(range(vd))
        self.to_target = torch.tensor(to_target, dtype=torch.long)
        self.unknown = self.to_target < 0  # never proposed
        self.to_draft = torch.zeros(self.target_vocab_size, dtype=torch.long)
        known = ~self.unknown
        self.to_draft[self.to_target[known]] = torch.arange(vd)[known]
        self._to_target_list = to_target
        self._to_draft_list = self.to_draft.tolist()

    # -- the batch ---------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> DraftReply:
        t0 = time.perf_counter()
        for sid in batch.freed:
            self.forget(sid)
        out = [DraftProposal([]) for _ in batch.queries]
        live: list[tuple[int, DraftState, DraftQuery]] = []
        for i, q in enumerate(batch.queries):
            st = self._sync(q)
            if st is None:
                out[i] = DraftProposal([], resync=True)
            elif q.k > 0 and st.num_tokens + q.k <= self.max_len and self._reserve(st, q, live):
                live.append((i, st, q))
        proposals: dict[int, list[int]] = {i: [] for i, _, _ in live}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in live}
        for r in range(max((q.k for _, _, q in live), default=0)):
            rows = [(i, st, q) for i, st, q in live if q.k > r]
            states = [st for _, st, _ in rows]
            counts = [st.num_tokens - st.num_computed_tokens for st in states]
            plan = self.runner.build_plan(self._step, SchedulerOutput(states, counts))
            self._step += 1
            logits = self.runner.execute(plan)
            for j, (i, st, q) in enumerate(rows):
                st.num_computed_tokens += counts[j]
                token, q_row = self._choose(logits[j], st, q, batch.eos_token_ids)
                proposals[i].append(token)
                if q_row is not None:
                    probs[i].append(q_row)
                st.target_ids.append(token)
                st.token_ids.append(self._to_draft_list[token])
        for i, _, _ in live:
            raw = b""
            if probs[i]:
                raw = torch.stack(probs[i]).float().numpy().astype(np.float32).tobytes()
            out[i] = DraftProposal(proposals[i], raw)
        return DraftReply(proposals=out, seconds=time.perf_counter() - t0)

    def _sync(self, q: DraftQuery) -> DraftState | None:
        """Roll the sequence back to q.prefix_len tokens and append q.tokens; None: resend."""
        st = self.states.get(q.seq_id)
        if st is None:
            if q.prefix_len:
                return None
            st = self.states[q.seq_id] = DraftState()
        elif q.prefix_len > st.num_tokens:
            self.forget(q.seq_id)
            return None
        self.states.move_to_end(q.seq_id)
        del st.target_ids[q.prefix_len:]
        del st.token_ids[q.prefix_len:]
        st.target_ids.extend(q.tokens)
        st.token_ids.extend(self._to_draft_list[t] if 0 <= t < self.target_vocab_size else 0
                            for t in q.tokens)
        # At least the last token is fed again: its logits propose the first token.
        st.num_computed_tokens = min(st.num_computed_tokens, q.prefix_len, st.num_tokens - 1)
        self.kv.trim_lookahead(st)
        return st

    def _reserve(self, st: DraftState, q: DraftQuery,
                 live: list[tuple[int, DraftState, DraftQuery]]) -> bool:
        """KV for the new tokens and k-1 proposals fed back; evicts idle sequences (LRU)."""
        new = st.num_tokens - st.num_computed_tokens
        busy = {id(s) for _, s, _ in live} | {id(st)}
        while not self.kv.can_append(st, new, q.k - 1):
            victim = next((sid for sid, s in self.states.items() if id(s) not in busy), None)
            if victim is None:
                return False
            self.forget(victim)
        self.kv.append(st, new, q.k - 1)
        return True

    def _choose(self, row: torch.Tensor, st: DraftState, q: DraftQuery,
                eos: list[int]) -> tuple[int, torch.Tensor | None]:
        """The next proposal (target id) and, for sampled requests, q over the target vocab."""
        p = q.params
        row = row.float().masked_fill(self.unknown, float("-inf"))
        if p.greedy and not (p.has_penalties or p.min_tokens):
            return self._to_target_list[int(row.argmax())], None
        full = torch.full((1, self.target_vocab_size), float("-inf"))
        known = ~self.unknown
        full[0, self.to_target[known]] = row[known]
        return draft_choice(full, RowContext(p, st.target_ids, q.num_prompt_tokens), eos,
                            self.generator)

    def forget(self, seq_id: str) -> None:
        st = self.states.pop(seq_id, None)
        if st is not None and st.block_table:
            self.kv.free(st)
