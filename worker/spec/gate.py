"""SpecGate: speculate at a batch size only while it is measured to pay there.

Whether a speculative step pays depends on things no static rule knows well: what the proposer
costs per call (an EAGLE head runs once per sequence, n-gram lookup is nearly free), what the
extra verify rows cost on this machine, and how often the guesses land on this traffic. At
batch 1 on a CPU a verify row costs ~2% of a decode and speculation wins; at batch 8 the same
EAGLE proposals cost more than the ~1/3 token per sequence they add (bench/speculative.py
measured 0.83x there before the gate).

So the decoder measures both choices. Per number of decoding sequences it keeps, for
speculative steps and for plain ones, an EMA of step wall time and an EMA of emitted tokens, and
runs the arm with the lower ratio. The ratio of the averages, not an average of per-step ratios:
a speculative step emits 1 token at one step and 4 at the next, and the mean of seconds/tokens
over such steps overstates the cost per token (Jensen); with it the gate switched EAGLE off at
batch 1 and cut the chat speed-up from 1.43x to 1.18x.

The two arms are not alike, and the gate treats them differently:
- A plain step's cost is set by the batch and the machine, not by the text: 3 measured steps
  settle it, and while speculation wins it is re-checked only every 4 x `explore_every` steps.
- A speculative step's yield depends on what is being written (the opening line of a poem is
  hard, its rhythm then easy). One sequence's yield jumps from step to step; a batch's is an
  average over its sequences. So the evidence is counted in sequence-steps: a new batch size
  first speculates for `warmup` (6) sequence-steps' worth of measured steps (at least 3), and
  while plain decoding wins, speculation is re-tried every `explore_every` steps (less often
  the more it loses, up to 4x) for a burst of up to 3 sequence-steps (batch 1: 3 steps, batch
  3 and up: 1), shortened so that exploring costs at most ~3% where it loses.
Wrongly decoding plain forgoes up to half of a step where speculation doubles the speed;
wrongly speculating at batch 8 costs a sixth of one: the bias towards trying speculation is
deliberate. The first step of each arm is not counted (it pays one-time costs), nor are steps
that also prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PLAIN_WARMUP = 3
PLAIN_RECHECK = 4  # plain decoding is re-checked this many times less often than speculation
EXPLORE_BUDGET = 0.03  # share of a losing step's cost that exploring may spend
BURST_SEQ_STEPS = 3  # evidence sought by one exploring burst, in sequence-steps


@dataclass
class _Arm:
    seconds: float = 0.0  # EMA of a step's wall time
    tokens: float = 0.0  # EMA of the tokens a step emitted
    samples: int = 0
    seen: bool = False  # the first step of each arm is dropped: it pays one-time costs

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens if self.tokens > 0 else 0.0


@dataclass
class _Bucket:
    plain: _Arm = field(default_factory=_Arm)
    spec: _Arm = field(default_factory=_Arm)
    since_explore: int = 0
    burst: int = 0  # speculative steps still to run in an exploring burst


class SpecGate:
    def __init__(self, *, warmup: int = 6, explore_every: int = 16, decay: float = 0.95) -> None:
        self.warmup = warmup
        self.explore_every = explore_every
        self.decay = decay
        self._buckets: dict[int, _Bucket] = {}

    def speculate(self, batch: int) -> bool:
        """Whether a step with `batch` decoding sequences should speculate."""
        b = self._buckets.setdefault(batch, _Bucket())
        if b.spec.samples < max(PLAIN_WARMUP, math.ceil(self.warmup / batch)):
            return True
        if b.plain.samples < PLAIN_WARMUP:
            return False
        if b.burst > 0:  # even where the burst's first steps already tipped the balance
            b.burst -= 1
            return True
        spec_wins = b.spec.seconds_per_token <= b.plain.seconds_per_token
        best, worst = sorted((b.spec.seconds_per_token, b.plain.seconds_per_token))
        ratio = worst / best if best > 0 else 4.0
        period = self.explore_every * min(4.0, ratio) * (PLAIN_RECHECK if spec_wins else 1)
        b.since_explore += 1
        if b.since_explore < period:
            return spec_wins
        b.since_explore = 0
        if not spec_wins:  # a burst of speculative steps: one alone says little about the text
            budget = EXPLORE_BUDGET * period / max(ratio - 1.0, 1e-6)
            b.burst = max(1, min(math.ceil(BURST_SEQ_STEPS / batch), int(budget))) - 1
        return not spec_wins

    def record(self, batch: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A decode-only step's wall time and the tokens it emitted."""
        if tokens <= 0 or seconds <= 0:
            return
        b = self._buckets.setdefault(batch, _Bucket())
        arm = b.spec if speculated else b.plain
        if not arm.seen:
            arm.seen = True
            return
        # A plain mean over the first samples (bias-corrected EMA), so that the warm-up weighs
        # its few steps alike instead of trusting the latest one.
        d = min(self.decay, arm.samples / (arm.samples + 1))
        arm.seconds = d * arm.seconds + (1 - d) * seconds
        arm.tokens = d * arm.tokens + (1 - d) * tokens
        arm.samples += 1

    def snapshot(self) -> dict[int, tuple[float, float]]:
        """Per batch size: (seconds per token plain, speculating); 0 where not yet measured."""
        return {n: (b.plain.seconds_per_token, b.spec.seconds_per_token)
                for n, b in sorted(self._buckets.items())}
