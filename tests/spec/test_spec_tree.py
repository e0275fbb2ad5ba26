"""Token-tree speculation (worker/spec/tree.py): greedy output is exactly greedy decoding's,
whichever branch holds the right tokens, and the accepted branch's K/V end up where the next
steps read them."""

from __future__ import annotations

import random

import pytest

from protos.messages import Request, SamplingParams
from tests.engine_utils import greedy, run_to_completion, tokens_of
from tests.spec.test_spec_greedy import PROMPTS, make_engine, run
from worker.spec.config import SpeculativeConfig
from worker.spec.proposer import Proposal, Proposer
from worker.spec.tree import depths, first_branch, tree_holes, walk_greedy


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def baseline(model):
    return run(make_engine(model, None))


def random_tree(rng: random.Random, truth: list[int], k: int) -> Proposal:
    """Up to k tokens: decoy branches around the true continuation (itself sometimes corrupted
    part-way), the true branch at a random place among its siblings."""
    tokens: list[int] = []
    parents: list[int] = []
    node = -1
    for want in truth:
        siblings = rng.randrange(3)
        place = rng.randrange(siblings + 1)
        true_index = None
        for s in range(siblings + 1):
            if len(tokens) >= k:
                break
            tokens.append(want if s == place and rng.random() > 0.15 else rng.randrange(256))
            parents.append(node)
            if s == place:
                true_index = len(tokens) - 1
            elif rng.random() < 0.3 and len(tokens) < k:  # a decoy with a child of its own
                tokens.append(rng.randrange(256))
                parents.append(len(tokens) - 2)
        if true_index is None:
            break
        node = true_index
    return Proposal(tokens, parents=parents)


class TreeOracle(Proposer):
    def __init__(self, reference: dict[tuple[int, ...], list[int]], seed: int = 0,
                 chain: bool = False) -> None:
        self.reference = reference
        self.rng = random.Random(seed)
        self.chain = chain
        self.paths: list[list[int]] = []

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            ref = self.reference[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            prop = random_tree(self.rng, ref[seq.num_output_tokens:], k)
            if self.chain:
                prop = Proposal(first_branch(prop.token_ids, prop.parents))
            out.append(prop)
        return out

    def on_tree_accept(self, seq, path):
        self.paths.append(path)


def test_tree_helpers() -> None:
    parents = [-1, -1, 0, 1, 3]
    assert depths(parents) == [1, 1, 2, 2, 3]
    assert first_branch([10, 11, 12, 13, 14], parents) == [10, 12]
    # rows: root, 10, 11, 12 (under 10), 13 (under 11), 14 (under 13)
    assert tree_holes(parents)[5] == 0b10100  # row 5 sees 13, 11, root; not 12 (2 back), 10
    best = [11, 99, 13, 0, 14, 7]  # the target's argmax after the root and after each token
    assert walk_greedy(best, [10, 11, 12, 13, 14], parents) == ([11, 13, 14, 7], [1, 3, 4])
    assert walk_greedy([5] * 6, [10, 11, 12, 13, 14], parents) == ([5], [])


@pytest.mark.parametrize("k", [3, 6, 12])
def test_tree_proposals_are_exact(model, baseline, k):
    """k = 12 makes steps of up to 13 tokens: past the fused layer's 8 rows in float32, so
    both the C kernel's and the torch reference's tree masks are used."""
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k, min_acceptance=0.0,
                             max_step_tokens=64)
    eng = make_engine(model, spec)
    oracle = TreeOracle({tuple(p): b for p, b in zip(PROMPTS, baseline)}, seed=k)
    eng.spec.proposer = oracle
    moves = []
    move_kv = eng.spec.move_kv
    eng.spec.move_kv = lambda s, d: (moves.append(len(s)), move_kv(s, d))
    assert run(eng) == baseline
    m = eng.spec.metrics
    assert m.accepted_tokens > 0 and moves, "no tree branch other than the first was accepted"
    assert any(p and p != list(range(len(p))) for p in oracle.paths)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_trees_with_prefix_hits_and_preemption(model, baseline):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=6, min_acceptance=0.0)
    eng = make_engine(model, spec, kv_cache_bytes=24 * 2 * 2 * 4 * 2 * 16 * 4)
    eng.spec.proposer = TreeOracle({tuple(p): b for p, b in zip(PROMPTS, baseline)}, seed=3)
    assert run(eng, tag="a") == baseline
    assert run(eng, tag="b") == baseline
    assert eng.scheduler.num_preemptions > 0 and eng.stats().prefix_hits_total > 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_tree_logprobs_are_the_targets(model):
    eng0 = make_engine(model, None)
    req = lambda rid: Request(request_id=rid, prompt_token_ids=PROMPTS[1],  # noqa: E731
                              sampling=greedy(16, logprobs=2))
    want = run_to_completion(eng0, [req("a")])["a"]
    ref = {tuple(PROMPTS[1]): tokens_of(want)}
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=5,
                                               min_acceptance=0.0))
    eng.spec.proposer = TreeOracle(ref, seed=1)
    got = run_to_completion(eng, [req("b")])["b"]
    assert tokens_of(got) == tokens_of(want)
    a = [lp for d in want for lp in d.logprobs]
    b = [lp for d in got for lp in d.logprobs]
    assert [x.sampled.token_id for x in a] == [x.sampled.token_id for x in b]
    for x, y in zip(a, b):
        assert abs(x.sampled.logprob - y.sampled.logprob) < 1e-4
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


def test_sampled_requests_verify_the_first_branch(model, baseline):
    """Where a tree cannot be walked (sampling), its first branch is verified as a chain: the
    same tokens as a proposer that gives that chain, under the same seed."""
    ref = {tuple(p): b for p, b in zip(PROMPTS, baseline)}
    outs = []
    for chain in (False, True):
        eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                                   min_acceptance=0.0))
        eng.spec.proposer = TreeOracle(ref, seed=5, chain=chain)
        reqs = [Request(request_id=f"s{i}", prompt_token_ids=p,
                        sampling=SamplingParams(temperature=0.8, max_tokens=16, seed=11 + i,
                                                ignore_eos=True))
                for i, p in enumerate(PROMPTS)]
        out = run_to_completion(eng, reqs)
        outs.append([tokens_of(out[r.request_id]) for r in reqs])
        assert not eng.spec.proposer.paths  # no tree was walked
    assert outs[0] == outs[1]
