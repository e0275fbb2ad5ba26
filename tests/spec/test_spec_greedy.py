"""Greedy speculation emits exactly the tokens greedy decoding emits, whatever the proposals."""

from __future__ import annotations

import random

import msgspec
import pytest

from protos.messages import Request
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig
from worker.spec.proposer import Proposal, Proposer

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7],  # repetitive: n-gram lookup finds matches
    list(range(20, 45)),
    [9, 3, 9, 3, 9, 3, 11],
    [100, 101, 102],
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def make_engine(model, spec: SpeculativeConfig | None, gate: bool = False, **kw) -> Engine:
    """Without the measured gate unless asked: these tests need every step to speculate (a
    tiny target's forward is so cheap that the gate would rightly turn speculation off)."""
    if spec is not None and not gate:
        spec = msgspec.structs.replace(spec, measure_gate=False)
    cfg = dict(model=str(model), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
               speculative=spec)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def run(engine: Engine, max_tokens: int = 24, tag: str = "r") -> list[list[int]]:
    reqs = [Request(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=greedy(max_tokens))
            for i, p in enumerate(PROMPTS)]
    out = run_to_completion(engine, reqs)
    return [tokens_of(out[r.request_id]) for r in reqs]


class NoisyOracle(Proposer):
    """Proposes the true greedy continuation with random corruptions: every acceptance length
    from 0 to k occurs."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], seed: int = 0) -> None:
        self.reference = reference
        self.rng = random.Random(seed)

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            prompt = tuple(seq.token_ids[:seq.num_prompt_tokens])
            ref = self.reference[prompt]
            done = seq.num_output_tokens
            toks = list(ref[done:done + k])
            for j in range(len(toks)):
                if self.rng.random() < 0.25:
                    toks[j] = self.rng.randrange(256)
            out.append(Proposal(toks))
        return out


@pytest.fixture(scope="module")
def baseline(model):
    return run(make_engine(model, None))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_noisy_oracle_is_exact(model, baseline, k):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k, min_acceptance=0.0)
    eng = make_engine(model, spec)
    eng.spec.proposer = NoisyOracle({tuple(p): b for p, b in zip(PROMPTS, baseline)}, seed=k)
    assert run(eng) == baseline
    m = eng.spec.metrics
    assert m.proposed_tokens > 0 and 0 < m.accepted_tokens < m.proposed_tokens
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


@pytest.mark.parametrize("k", [2, 4])
def test_ngram_is_exact(model, baseline, k):
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=k))
    assert run(eng) == baseline
    assert eng.spec.metrics.proposed_tokens > 0


def test_exact_with_prefix_cache_hits(model, baseline):
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=3))
    assert run(eng, tag="a") == baseline
    assert run(eng, tag="b") == baseline  # second round reads the prompts from the cache
    assert eng.stats().prefix_hits_total > 0


def test_exact_under_preemption(model, baseline):
    # 4 sequences of up to 49 tokens in 4-token blocks need ~52 blocks; give ~24.
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                               min_acceptance=0.0),
                      kv_cache_bytes=24 * 2 * 2 * 4 * 2 * 16 * 4)
    eng.spec.proposer = NoisyOracle({tuple(p): b for p, b in zip(PROMPTS, baseline)})
    assert run(eng) == baseline
    assert eng.scheduler.num_preemptions > 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_stop_among_accepted_tokens_truncates(model, baseline):
    """A stop token inside an accepted run ends the output right there, as without speculation."""
    stop = baseline[1][5]
    want = baseline[1][:baseline[1].index(stop) + 1]
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, min_acceptance=0.0)
    eng = make_engine(model, spec)
    oracle = NoisyOracle({tuple(p): b for p, b in zip(PROMPTS, baseline)})
    oracle.rng.random = lambda: 1.0  # no corruption: everything is accepted
    eng.spec.proposer = oracle
    out = run_to_completion(eng, [Request(request_id="s", prompt_token_ids=PROMPTS[1],
                                          sampling=greedy(24, stop_token_ids=(stop,)))])
    assert tokens_of(out["s"]) == want
    assert out["s"][-1].finish_reason == "stop" and out["s"][-1].stop_reason == stop
