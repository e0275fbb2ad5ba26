"""The measured gate (worker/spec/gate.py): a batch size speculates only while speculative steps
cost less wall time per emitted token than plain ones."""

from __future__ import annotations

import time

import pytest

from tests.spec.test_spec_greedy import PROMPTS, make_engine, run
from worker.spec.config import SpeculativeConfig
from worker.spec.gate import SpecGate
from worker.spec.proposer import Proposal, Proposer


def decide(gate: SpecGate, batch: int, spec_cost: float, plain_cost: float, steps: int) -> int:
    """Runs `steps` decisions with fixed per-token costs; returns how many speculated."""
    n = 0
    for _ in range(steps):
        spec = gate.speculate(batch)
        n += spec
        gate.record(batch, spec, spec_cost if spec else plain_cost, 1)
    return n


def test_warmup_tries_both_then_keeps_the_cheaper() -> None:
    gate = SpecGate(warmup=3, explore_every=16)
    seen = []
    for _ in range(8):
        seen.append(gate.speculate(1))
        gate.record(1, seen[-1], 0.01 if seen[-1] else 0.02, 1)
    assert seen == [True] * 4 + [False] * 4  # the first of each arm is not counted
    assert decide(gate, 1, 0.01, 0.02, 200) >= 200 - 200 // 32 - 1  # plain explored 1 in 32

    slow = SpecGate(warmup=3, explore_every=16)
    assert decide(slow, 4, 0.05, 0.01, 8) == 4
    # losing 5x: tried again every 16 * 4 steps only
    assert decide(slow, 4, 0.05, 0.01, 256) == 4


def test_batch_sizes_are_measured_apart() -> None:
    gate = SpecGate(warmup=2)
    decide(gate, 1, 0.01, 0.03, 10)
    decide(gate, 8, 0.03, 0.01, 10)
    assert gate.speculate(1) and not gate.speculate(8)
    assert gate.snapshot()[1][1] == pytest.approx(0.01)
    assert gate.snapshot()[8][0] == pytest.approx(0.01)


def test_the_choice_follows_a_change() -> None:
    gate = SpecGate(warmup=2, explore_every=4, decay=0.5)
    assert decide(gate, 1, 0.01, 0.02, 20) >= 20 - 2 - 20 // 8
    decide(gate, 1, 0.05, 0.02, 40)  # acceptance collapsed: speculating now costs 2.5x
    assert decide(gate, 1, 0.05, 0.02, 40) <= 40 // 10 + 1
    decide(gate, 1, 0.005, 0.02, 40)  # and recovered: 4x cheaper
    assert decide(gate, 1, 0.005, 0.02, 40) >= 40 - 40 // 16 - 1


def test_uneven_speculative_steps_are_costed_by_their_totals() -> None:
    """Speculative steps of 14 ms emitting 1, 1, 4, 1, 1, 4... tokens cost 7 ms per token against
    10 ms plain: the gate keeps speculating. The mean of the per-step ratios (10.5 ms) would call
    speculation the loser; it switched EAGLE off at batch 1 on chat."""
    gate = SpecGate(warmup=3, explore_every=16)
    spec_steps = 0
    for i in range(300):
        spec = gate.speculate(1)
        spec_steps += spec
        gate.record(1, spec, 0.014 if spec else 0.010, (4 if i % 3 == 2 else 1) if spec else 1)
    assert spec_steps >= 300 - 300 // 16 - 6, gate.snapshot()
    assert gate.snapshot()[1][1] == pytest.approx(0.007, rel=0.25)


def runs_of_speculation(seq: list[bool]) -> list[int]:
    runs, n = [], 0
    for spec in [*seq, False]:
        if spec:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_speculation_is_retried_in_bursts_sized_to_what_it_loses() -> None:
    """Losing narrowly (1.15x per token), speculation is retried 3 steps at a time, so a retry
    sees more than one step of the text; losing 2x, one step at a time."""
    for cost, burst in ((0.0115, 3), (0.02, 1)):
        gate = SpecGate(warmup=3, explore_every=16)
        seq = []
        for _ in range(300):
            seq.append(gate.speculate(1))
            gate.record(1, seq[-1], cost if seq[-1] else 0.010, 1)
        runs = runs_of_speculation(seq)
        assert runs[0] == 4 and set(runs[1:-1]) == {burst}, runs  # the last may be cut short
        assert len(runs) - 1 >= 300 // (16 * cost / 0.010) - 2


def test_a_hard_opening_does_not_keep_speculation_off() -> None:
    """The first steps speculate into a hard stretch (1 token per step, 1.2x a plain step), then
    the text gets easy (3 tokens per step): within two exploring periods the gate speculates
    again, and stays on."""
    gate = SpecGate(explore_every=16)
    seq = []
    for i in range(150):
        seq.append(gate.speculate(1))
        easy = i >= 12
        gate.record(1, seq[-1], 0.012 if seq[-1] else 0.010, (3 if easy else 1) if seq[-1] else 1)
    first_back = next(i for i in range(12, 150) if seq[i] and seq[i + 1] and seq[i + 2])
    assert first_back <= 12 + 2 * 16 * 1.2 + 4, seq
    assert sum(seq[first_back:]) >= (150 - first_back) * 0.95


def test_steps_without_tokens_are_not_measured() -> None:
    gate = SpecGate(warmup=1)
    gate.record(1, True, 0.5, 0)
    assert gate.snapshot() == {}


class Oracle(Proposer):
    """Proposes the true greedy continuation, after `delay` seconds; `wrong` shifts every
    proposed token so none is accepted."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], delay: float = 0.0,
                 wrong: bool = False) -> None:
        self.reference, self.delay, self.wrong = reference, delay, wrong
        self.calls = 0

    def propose(self, seqs, ks):
        self.calls += 1
        time.sleep(self.delay)
        out = []
        for seq, k in zip(seqs, ks):
            ref = self.reference[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            done = seq.num_output_tokens
            out.append(Proposal([(t + 1) % 256 if self.wrong else t
                                 for t in ref[done:done + k]]))
        return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def baseline(model):
    return run(make_engine(model, None), max_tokens=40)


def spec(k: int = 4) -> SpeculativeConfig:
    return SpeculativeConfig(method="ngram", num_speculative_tokens=k, min_acceptance=0.0,
                             max_step_tokens=64)


def test_a_proposer_that_costs_more_than_it_wins_is_turned_off(model, baseline) -> None:
    """Proposals that take 30 ms and are never right: after the warm-up the engine stops asking
    for them, except to re-check now and then; the output is still exactly greedy decoding."""
    eng = make_engine(model, spec(), gate=True)
    ref = {tuple(p): b for p, b in zip(PROMPTS, baseline)}
    eng.spec.proposer = Oracle(ref, delay=0.03, wrong=True)
    assert run(eng, max_tokens=40) == baseline
    m = eng.spec.metrics
    assert m.accepted_tokens == 0
    assert eng.spec.proposer.calls <= 10, eng.spec.gate.snapshot()
    assert m.gated_steps >= 25 and eng.stats().spec_gated_steps_total == m.gated_steps
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_a_proposer_that_pays_keeps_speculating(model, baseline) -> None:
    """A forward bound by reading the weights (here: 20 ms whatever the rows, as a real model's
    decode on a CPU or GPU) and right proposals: speculation stays on."""
    eng = make_engine(model, spec(), gate=True)
    ref = {tuple(p): b for p, b in zip(PROMPTS, baseline)}
    eng.spec.proposer = Oracle(ref)
    execute = eng.runner.execute

    def weight_bound(plan):
        time.sleep(0.02)
        return execute(plan)

    eng.runner.execute = weight_bound
    assert run(eng, max_tokens=40) == baseline
    m = eng.spec.metrics
    assert m.mean_accepted_length > 3
    # the 1 + 3 warm-up steps without speculation, and a re-check at most every 16 steps after
    assert m.gated_steps <= 4 + m.spec_steps // 16 + 1, (m, eng.spec.gate.snapshot())
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


@pytest.mark.parametrize("step_tokens", [64, 8])
def test_seeded_sampling_repeats_whatever_the_gate_decides(model, baseline, step_tokens) -> None:
    """A request with a seed gets the same tokens whether the gate lets its steps speculate or
    not (the gate's choices depend on timing); unseeded and greedy neighbours follow the gate.
    With 8 tokens per step, k is the share of all 4 decoding sequences either way."""
    import random

    from protos.messages import Request, SamplingParams
    from tests.engine_utils import run_to_completion, tokens_of

    ref = {tuple(p): b for p, b in zip(PROMPTS, baseline)}

    def answers(gate_says) -> tuple[dict[str, list[int]], int]:
        eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                                   min_acceptance=0.0,
                                                   max_step_tokens=step_tokens), gate=True)
        eng.spec.proposer = Oracle(ref)
        eng.spec.gate.speculate = gate_says
        reqs = [Request(request_id=f"s{i}", prompt_token_ids=p,
                        sampling=SamplingParams(temperature=0.8, max_tokens=24,
                                                seed=7 + i if i % 2 == 0 else None))
                for i, p in enumerate(PROMPTS)]
        out = run_to_completion(eng, reqs)
        assert eng.kv.num_free_blocks == eng.kv.num_blocks
        return {r: tokens_of(o) for r, o in out.items()}, eng.spec.metrics.gated_steps

    always, gated_always = answers(lambda batch: True)
    coin = random.Random(3)
    flaky, gated_flaky = answers(lambda batch: coin.random() < 0.5)
    assert gated_always == 0 and gated_flaky > 5
    assert flaky["s0"] == always["s0"] and flaky["s2"] == always["s2"]  # the seeded ones
