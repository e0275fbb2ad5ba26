"""Token-tree speculation (worker/spec/tree.py): greedy output is exactly greedy decoding's,
whichever branch holds the right tokens, and the accepted branch's K/V end up where the next
steps read them."""

from __future__ import annotations

import random

import pytest
import torch

from protos.messages import Request, SamplingParams
from tests.engine_utils import greedy, run_to_completion, tokens_of
from tests.spec.test_spec_greedy import PROMPTS, make_engine, run
from tests.spec.test_spec_sampling import CHI2_999, chi_square
from worker.spec.config import SpeculativeConfig
from worker.spec.proposer import Proposal, Proposer
from worker.spec.tree import branch, depths, first_branch, tree_holes, walk_greedy, walk_sampled


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def baseline(model):
    return run(make_engine(model, None))


def random_tree(rng: random.Random, truth: list[int], k: int,
                decoys: list[int] | None = None) -> Proposal:
    """Up to k tokens: decoy branches around the true continuation (itself sometimes corrupted
    part-way), the true branch at a random place among its siblings. Decoys are random tokens,
    or drawn from `decoys`."""
    decoy = (lambda: rng.choice(decoys)) if decoys else (lambda: rng.randrange(256))
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
            tokens.append(want if s == place and rng.random() > 0.15 else decoy())
            parents.append(node)
            if s == place:
                true_index = len(tokens) - 1
            elif rng.random() < 0.3 and len(tokens) < k:  # a decoy with a child of its own
                tokens.append(decoy())
                parents.append(len(tokens) - 2)
        if true_index is None:
            break
        node = true_index
    return Proposal(tokens, parents=parents)


class TreeOracle(Proposer):
    """Random trees around the reference answer. `probs`: each proposal also claims a draft
    distribution (a point mass at each token), as a draft model's would. `answer_decoys`: the
    decoys are tokens of the answer."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], seed: int = 0,
                 chain: bool = False, probs: bool = False, answer_decoys: bool = False) -> None:
        self.reference = reference
        self.rng = random.Random(seed)
        self.chain = chain
        self.probs = probs
        self.answer_decoys = answer_decoys
        self.paths: list[list[int]] = []

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            ref = self.reference[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            prop = random_tree(self.rng, ref[seq.num_output_tokens:], k,
                               ref if self.answer_decoys else None)
            if self.chain:
                prop = Proposal(first_branch(prop.token_ids, prop.parents))
            if self.probs and prop.token_ids:
                q = torch.nn.functional.one_hot(torch.tensor(prop.token_ids), 256).float()
                prop = Proposal(prop.token_ids, q, prop.parents)
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
    assert branch([10, 11, 12, 13, 14], parents, 4) == [11, 13, 14]
    assert branch([10, 11, 12, 13, 14], parents, 2) == [10, 12]
    assert branch([10, 11, 12, 13, 14], parents, -1) == []


def test_walk_sampled_emits_what_the_target_samples():
    """Chi-square (significance 0.001, fixed seed): the first emitted token follows the root's
    p whatever the children are (two siblings, a duplicate, one that p rules out); after an
    accepted child the next token follows the p of that child's row."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 0.3, 0.15, 0.25, 0.2, 0.1],   # the root's row
                      [0.4, 0.1, 0.1, 0.1, 0.2, 0.1],     # after token 1 (node 0)
                      [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],     # after token 3 (node 1)
                      [0.2] * 5 + [0.0],                  # node 2: a duplicate of token 1
                      [0.0, 0.5, 0.0, 0.0, 0.5, 0.0],     # node 3: token 0, ruled out
                      [0.3, 0.1, 0.1, 0.1, 0.1, 0.3]])    # node 4, under node 0
    tokens, parents = [1, 3, 1, 0, 4], [-1, -1, -1, -1, 0]
    first = torch.zeros(6)
    after: dict[int, torch.Tensor] = {1: torch.zeros(6), 3: torch.zeros(6)}
    for _ in range(12_000):
        emitted, path = walk_sampled(p, tokens, parents, g)
        first[emitted[0]] += 1
        assert len(emitted) == len(path) + 1
        assert [tokens[n] for n in path] == emitted[:len(path)]
        if path:
            assert path[0] in (0, 1)  # never the duplicate (node 2)
            after[emitted[0]][emitted[1]] += 1
    assert first[0] == 0
    assert chi_square(first[1:], p[0, 1:]) < 18.47  # 4 degrees of freedom
    assert chi_square(after[3], p[2]) < CHI2_999[5]
    # after token 1 the walk may go on into node 4 (token 4): what leaves node 0 is still p[1]
    assert chi_square(after[1], p[1]) < CHI2_999[5]


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


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_tree_logprobs_are_the_targets(model, temperature):
    """Logprobs of tree-verified tokens are the target's raw ones at the rows of the accepted
    branch; at temperature 0.7 with top_k 1 the sampled walk emits the greedy tokens."""
    eng0 = make_engine(model, None)
    want = run_to_completion(eng0, [Request(request_id="a", prompt_token_ids=PROMPTS[1],
                                            sampling=greedy(16, logprobs=2))])["a"]
    ref = {tuple(PROMPTS[1]): tokens_of(want)}
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=5,
                                               min_acceptance=0.0))
    eng.spec.proposer = oracle = TreeOracle(ref, seed=1)
    params = SamplingParams(temperature=temperature, top_k=1, max_tokens=16, ignore_eos=True,
                            logprobs=2)
    got = run_to_completion(eng, [Request(request_id="b", prompt_token_ids=PROMPTS[1],
                                          sampling=params)])["b"]
    assert any(p and p != list(range(len(p))) for p in oracle.paths)
    assert tokens_of(got) == tokens_of(want)
    a = [lp for d in want for lp in d.logprobs]
    b = [lp for d in got for lp in d.logprobs]
    assert [x.sampled.token_id for x in a] == [x.sampled.token_id for x in b]
    for x, y in zip(a, b):
        assert abs(x.sampled.logprob - y.sampled.logprob) < 1e-4
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


def sampled_run(model, ref, proposer_seed: int, chain: bool = False, probs: bool = False,
                **params) -> tuple[list[list[int]], TreeOracle]:
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                               min_acceptance=0.0, max_step_tokens=64))
    eng.spec.proposer = oracle = TreeOracle(ref, seed=proposer_seed, chain=chain, probs=probs)
    reqs = [Request(request_id=f"s{i}", prompt_token_ids=p,
                    sampling=SamplingParams(max_tokens=16, seed=11 + i, ignore_eos=True,
                                            **params))
            for i, p in enumerate(PROMPTS)]
    out = run_to_completion(eng, reqs)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    return [tokens_of(out[r.request_id]) for r in reqs], oracle


def test_sampled_requests_walk_trees(model, baseline):
    """Sampled requests walk trees too (test_spec_sampling.py checks what they emit), and a
    seeded request's answer repeats. A proposal that comes with a draft distribution is
    verified on its first branch (Leviathan's test, which needs q): the same tokens as a
    proposer that gives that chain, under the same seed."""
    ref = {tuple(p): b for p, b in zip(PROMPTS, baseline)}
    params = dict(temperature=0.8, top_k=40, repetition_penalty=1.2)
    tree, oracle = sampled_run(model, ref, 5, **params)
    assert len(oracle.paths) > 10
    assert sampled_run(model, ref, 5, **params)[0] == tree
    with_q, oracle = sampled_run(model, ref, 5, probs=True, **params)
    assert not oracle.paths  # no tree was walked
    assert with_q == sampled_run(model, ref, 5, chain=True, probs=True, **params)[0]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_trees_with_penalties_and_min_tokens(model, temperature):
    """Each verify row is processed with its own branch's history: penalties and min_tokens
    give exactly what plain greedy decoding with them gives. At temperature 0.7 with top_k 1 the
    sampled walk (rejection sampling; p is a point mass at the argmax) must give the same
    tokens, its accepted branches' K/V moved as the greedy walk's are. Decoys are tokens of the
    answer itself, so a row processed with another branch's history picks other tokens."""
    params = dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                  min_tokens=10)

    def go(eng, temperature):
        reqs = [Request(request_id=f"p{i}", prompt_token_ids=p,
                        sampling=SamplingParams(temperature=temperature, top_k=1, max_tokens=24,
                                                **params))
                for i, p in enumerate(PROMPTS)]
        out = run_to_completion(eng, reqs)
        return [tokens_of(out[r.request_id]) for r in reqs]

    want = go(make_engine(model, None), 0.0)
    eng = make_engine(model, SpeculativeConfig(method="ngram", num_speculative_tokens=6,
                                               min_acceptance=0.0, max_step_tokens=64))
    eng.spec.proposer = oracle = TreeOracle({tuple(p): b for p, b in zip(PROMPTS, want)}, seed=9,
                                            answer_decoys=True)
    assert go(eng, temperature) == want
    assert sum(1 for p in oracle.paths if p and p != list(range(len(p)))) > 10
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
