"""In-process stand-ins for a model replica and a tokenizer.

They let the router, its tests and router load tests run without a model, torch or Ray.
FakeReplica's output is deterministic: each step appends (last token + 1) % vocab_size to every
running request, where "last token" starts as the last prompt (or prior output) token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from protos.messages import (
    OutputDelta,
    PollResult,
    ReplicaStats,
    Request,
    SampledLogprobs,
    TokenLogprob,
)
from router.replica import ReplicaHandle


class ReplicaDiedError(RuntimeError):
    pass


class _FakeSeq:
    __slots__ = ("last", "num_output", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.num_output = len(request.prior_output_token_ids)
        self.last = (request.prior_output_token_ids or request.prompt_token_ids)[-1]


class FakeReplica(ReplicaHandle):
    def __init__(self, replica_id: str, *, vocab_size: int = 512, eos_token_id: int | None = None,
                 step_delay_s: float = 0.001, poll_timeout_s: float = 0.05) -> None:
        self.replica_id = replica_id
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.step_delay_s = step_delay_s
        self.poll_timeout_s = poll_timeout_s
        # What the router sent, for tests to inspect.
        self.submitted: list[Request] = []
        self.submit_calls = 0
        self.aborted: list[str] = []
        self.poll_calls = 0
        self._running: dict[str, _FakeSeq] = {}
        self._finished_deltas: list[OutputDelta] = []
        self._wake = asyncio.Event()
        self._dead = False
        self._steps = 0
        # Wall time the "forward passes" really took: asyncio.sleep overshoots short delays
        # (epoll waits whole milliseconds), and router benchmarks subtract this, not the ask.
        self.step_seconds_total = 0.0

    @property
    def running_ids(self) -> list[str]:
        return [] if self._dead else list(self._running)

    def die(self) -> None:
        """From now on every call raises, as a crashed Ray actor's would."""
        self._dead = True
        self._wake.set()

    def _check_alive(self) -> None:
        if self._dead:
            raise ReplicaDiedError(f"fake replica {self.replica_id} is dead")

    async def submit(self, requests: list[Request]) -> None:
        self._check_alive()
        self.submit_calls += 1
        for r in requests:
            self.submitted.append(r)
            self._running[r.request_id] = _FakeSeq(r)
        self._wake.set()

    async def poll(self) -> PollResult:
        self._check_alive()
        self.poll_calls += 1
        if not self._running:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_timeout_s)
            self._check_alive()
        deltas: list[OutputDelta] = []
        if self._running:
            t0 = time.perf_counter()
            await asyncio.sleep(self.step_delay_s)  # the "forward pass"
            self.step_seconds_total += time.perf_counter() - t0
            self._check_alive()
            self._steps += 1
            deltas = [self._step(seq) for seq in list(self._running.values())]
        return PollResult(deltas=deltas, stats=self._stats())

    def _step(self, seq: _FakeSeq) -> OutputDelta:
        token = (seq.last + 1) % self.vocab_size
        seq.last = token
        seq.num_output += 1
        sampling = seq.request.sampling
        finish = stop = None
        is_eos = token == self.eos_token_id and not sampling.ignore_eos
        if is_eos or token in sampling.stop_token_ids:
            finish, stop = "stop", token
        elif sampling.max_tokens is not None and seq.num_output >= sampling.max_tokens:
            finish = "length"
        if finish is not None:
            del self._running[seq.request.request_id]
        logprobs = None
        if sampling.logprobs is not None:
            # The sampled token is always the most likely; alternatives follow it.
            top = [TokenLogprob((token + i) % self.vocab_size, -float(i), i + 1)
                   for i in range(sampling.logprobs)]
            logprobs = [SampledLogprobs(TokenLogprob(token, 0.0, 1), top)]
        return OutputDelta(
            request_id=seq.request.request_id, token_ids=[token], text=f"<{token}>",
            logprobs=logprobs, finish_reason=finish, stop_reason=stop,
            num_prompt_tokens=len(seq.request.prompt_token_ids),
            num_output_tokens=seq.num_output)

    async def abort(self, request_ids: list[str]) -> None:
        self._check_alive()
        self.aborted.extend(request_ids)
        for rid in request_ids:
            self._running.pop(rid, None)

    async def stats(self) -> ReplicaStats:
        self._check_alive()
        return self._stats()

    def _stats(self) -> ReplicaStats:
        return ReplicaStats(replica_id=self.replica_id, num_running=len(self._running),
                            steps_total=self._steps)


class FakeTokenizer:
    """A byte-level tokenizer with the methods of text.tokenizer.Tokenizer the router uses.

    Ids 0..255 are bytes; 256 is BOS, 257 is EOS.
    """

    bos_token_id = 256
    eos_token_ids = (257,)
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode())
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise ValueError("roles must be system, user or assistant")
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")
