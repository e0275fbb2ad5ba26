"""The replica engine: add_request / abort / step.

A step reads like the design: schedule -> run -> postprocess. Everything a client sees of a
request leaves the engine as an OutputDelta.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from protos.messages import OutputDelta, ReplicaStats, Request
from worker.config import ConfigError, EngineConfig, ModelConfig
from worker.kv.kv_manager import KVManager
from worker.model_runner import ModelRunner
from worker.sampler import Sampler
from worker.scheduler import Scheduler, SchedulerOutput
from worker.sequence import Sequence, SequenceStatus
from worker.spec.factory import build_spec_decoder

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take; the message names the field and the limit."""


class StepTimes:
    """Where step time goes: model forward vs everything else (engine overhead)."""

    def __init__(self) -> None:
        self.steps = 0
        self.total = 0.0
        self.model = 0.0

    @property
    def overhead_fraction(self) -> float:
        return 1.0 - self.model / self.total if self.total else 0.0


class Engine:
    def __init__(self, config: EngineConfig, model_dir: str | Path | None = None,
                 tokenizer: Any = None, detokenizer_factory: Any = None,
                 runner: ModelRunner | None = None, draft_actors: list[Any] | None = None) -> None:
        """`tokenizer` (text.tokenizer.Tokenizer) and `detokenizer_factory` (text.detokenizer.
        IncrementalDetokenizer) are optional: without them the engine streams token ids only.
        `runner`: rank 0's runner of a tensor/pipeline-parallel replica (worker.parallel_runner);
        None builds a single-process one. `draft_actors`: handles of the draft pool when
        config.speculative.method is "pool" (worker.spec.draft_actor.start_draft_pool)."""
        self.config = config
        model_dir = Path(model_dir or config.model)
        self.model_config = ModelConfig.from_hf_dir(model_dir)
        self.runner = runner or ModelRunner(config, self.model_config, model_dir)
        self.max_model_len = self._resolve_max_model_len()
        self.kv = KVManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self.tokenizer = tokenizer
        self.detokenizer_factory = detokenizer_factory
        eos = list(self.model_config.eos_token_ids)
        if tokenizer is not None:
            eos += [t for t in tokenizer.eos_token_ids if t not in eos]
        self.eos_token_ids = eos
        self._eos = frozenset(eos)
        self.sampler = Sampler(eos, seed=config.seed)
        # Speculative decoding (worker/spec/); None: one token per sequence and step.
        self.spec = build_spec_decoder(config.speculative, self, draft_actors) \
            if config.speculative is not None else None
        self.seqs: dict[str, Sequence] = {}
        self._pending: list[OutputDelta] = []
        self._step_id = 0
        self.times = StepTimes()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _resolve_max_model_len(self) -> int:
        capacity = self.runner.num_blocks * self.config.block_size
        wanted = self.config.max_model_len or self.model_config.max_position_embeddings
        if self.config.max_model_len and wanted > capacity:
            raise ConfigError(f"max_model_len {wanted} does not fit the KV cache ({capacity} "
                              "tokens); raise --kv-cache-bytes or lower --max-model-len")
        if wanted > self.model_config.max_position_embeddings and self.config.max_model_len:
            raise ConfigError(f"max_model_len {wanted} exceeds the model's "
                              f"max_position_embeddings {self.model_config.max_position_embeddings}")
        return min(wanted, capacity)

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        n = len(request.prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty: give at least one token")
        total = n + len(request.prior_output_token_ids)
        if total >= self.max_model_len:
            raise RequestError(f"prompt has {total} tokens but max_model_len is "
                               f"{self.max_model_len}: shorten the prompt (at least one token "
                               "must be left to generate)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt_token_ids contains {bad}, outside the vocabulary [0, {vocab})")
        if request.request_id in self.seqs:
            raise RequestError(f"request_id {request.request_id!r} is already running")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        detok = None
        if self.tokenizer is not None and self.detokenizer_factory is not None:
            p = request.sampling
            detok = self.detokenizer_factory(
                self.tokenizer, list(request.prompt_token_ids) + list(request.prior_output_token_ids),
                skip_special_tokens=p.skip_special_tokens, stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output)
        seq = Sequence(request, detok)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests now and free their blocks; their final deltas come with the next step."""
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is None:
                continue
            self.scheduler.finish(seq)
            if self.spec is not None:
                self.spec.free(seq)
            self._pending.append(self._delta(seq, [], "", finish="abort"))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[OutputDelta]:
        t0 = time.perf_counter()
        deltas, self._pending = self._pending, []
        # Speculation reserves k lookahead KV slots per sequence; rejected ones are trimmed.
        k = self.spec.num_lookahead(self.scheduler) if self.spec is not None else 0
        sched = self.scheduler.schedule(k)
        if not sched:
            return deltas
        spec_batch = None
        if k:
            plan, spec_batch = self.spec.build_plan(self.runner, self._step_id, sched)
        else:
            plan = self.runner.build_plan(self._step_id, sched)
        self._step_id += 1
        tm = time.perf_counter()
        logits = self.runner.execute(plan)
        model_time = time.perf_counter() - tm
        if self.spec is not None and self.spec.proposer.wants_features:
            self.spec.proposer.observe(sched.seqs, plan, self.runner.last_hidden)
        sampling = [seq for seq, n in zip(sched.seqs, sched.num_new_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens]
        tokens: list[list[int]] = []
        lps: list[list[Any]] = []
        if spec_batch is not None:
            tokens, lps = self.spec.sample(logits, spec_batch, self.sampler)
        elif sampling:
            sampled = self.sampler(logits, sampling)
            tokens = [[t] for t in sampled.token_ids]
            lps = [[lp] for lp in sampled.logprobs]
        deltas.extend(self._postprocess(sched, sampling, tokens, lps, trim=k > 0))
        if self.spec is not None:
            self.spec.end_step(time.perf_counter() - t0, sum(map(len, tokens)))
        self.times.steps += 1
        self.times.model += model_time
        self.times.total += time.perf_counter() - t0
        return deltas

    def _postprocess(self, sched: SchedulerOutput, sampling: list[Sequence],
                     tokens: list[list[int]], lps: list[list[Any]],
                     trim: bool = False) -> list[OutputDelta]:
        """tokens[i]: what sampling[i] emits this step, one token or (speculation) its accepted
        proposals and the target's token after them. `trim`: lookahead slots were reserved."""
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.prompt_tokens_total += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.kv.cache_computed_blocks(seq)
        out: list[OutputDelta] = []
        for i, seq in enumerate(sampling):
            finish, stop_reason, text, step_lps = None, None, "", []
            # Token by token, so that a stop among accepted proposals drops what follows it.
            for j, token in enumerate(tokens[i]):
                if j:  # the previous token was an accepted proposal: its KV is computed
                    seq.num_computed_tokens += 1
                seq.token_ids.append(token)
                self.generation_tokens_total += 1
                lp = lps[i][j]
                if lp is not None:
                    seq.logprobs.append(lp)
                    step_lps.append(lp)
                finish, stop_reason = self._check_stop(seq, token)
                if seq.detokenizer is not None:
                    piece, stop_str = seq.detokenizer.update([token])
                    text += piece
                    if stop_str is not None and finish is None:
                        finish, stop_reason = "stop", stop_str
                    elif finish is not None and stop_str is None:
                        text += seq.detokenizer.flush()
                if finish is not None:
                    break
            if len(tokens[i]) > 1:
                self.kv.cache_computed_blocks(seq)
            new_tokens = seq.token_ids[seq.num_emitted_tokens:]
            seq.num_emitted_tokens = seq.num_tokens
            if finish is not None:
                seq.finish_reason, seq.stop_reason = finish, stop_reason
                self.scheduler.finish(seq)
                self.seqs.pop(seq.request_id, None)
                if self.spec is not None:
                    self.spec.free(seq)
            out.append(self._delta(seq, new_tokens, text, finish, stop_reason,
                                   step_lps or None))
        if trim:  # rejected proposals' slots and unused lookahead go back to the pool
            for seq in sched.seqs:
                self.kv.trim_lookahead(seq)
        return out

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | str | None]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self._eos:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _delta(self, seq: Sequence, tokens: list[int], text: str, finish: str | None = None,
               stop_reason: int | str | None = None, logprobs: list | None = None) -> OutputDelta:
        return OutputDelta(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    # -- observability -------------------------------------------------------------------------

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preempted_total=self.scheduler.num_preemptions,
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_free=self.kv.num_free_blocks,
            prefix_queries_total=self.kv.prefix_queries,
            prefix_hits_total=self.kv.prefix_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            steps_total=self.times.steps,
            **(self.spec.stats_fields() if self.spec is not None else {}),
        )

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.seqs.values() if s.status == SequenceStatus.RUNNING)
