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
batch 1 and cut the chat speed-up from 1.43x to 1.18x. The
other is tried again every `explore_every` steps (less often the more it loses, up to 4x), so
the choice follows changes in traffic and acceptance; plain steps, whose cost does not depend
on the text, are re-checked 4x less often. A new batch size starts speculating for
`warmup` measured steps, then runs `warmup` plain ones; the first step of each is not counted
(it pays one-time costs), nor are steps that also prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


class SpecGate:
    def __init__(self, *, warmup: int = 3, explore_every: int = 16, decay: float = 0.95) -> None:
        self.warmup = warmup
        self.explore_every = explore_every
        self.decay = decay
        self._buckets: dict[int, _Bucket] = {}

    def speculate(self, batch: int) -> bool:
        """Whether a step with `batch` decoding sequences should speculate."""
        b = self._buckets.setdefault(batch, _Bucket())
        if b.spec.samples < self.warmup:
            return True
        if b.plain.samples < self.warmup:
            return False
        spec_wins = b.spec.seconds_per_token <= b.plain.seconds_per_token
        best, worst = sorted((b.spec.seconds_per_token, b.plain.seconds_per_token))
        period = self.explore_every * min(4.0, worst / best if best > 0 else 4.0)
        if spec_wins:
            # A plain step's cost is set by the batch and the machine, not by the text, so it
            # needs re-checking rarely; a speculative step's depends on what is being written.
            period *= 4
        b.since_explore += 1
        if b.since_explore >= period:
            b.since_explore = 0
            return not spec_wins
        return spec_wins

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
