"""At temperature > 0 speculation must not change the distribution of what is sampled.

Chi-square goodness of fit (Pearson) against the target's own distribution p, with a draft
distribution q chosen far from p. Critical values are for significance 0.001, so a correct
implementation fails about once in a thousand runs; seeds are fixed, so these runs are stable.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from protos.messages import Request, SamplingParams
from tests.conftest import _make_hf_model
from tests.engine_utils import run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig
from worker.spec.processing import RowProbabilities, probabilities
from worker.spec.proposer import Proposal, Proposer
from worker.spec.verifier import verify_sampled

# Upper 0.1% points of chi-square with 5 and 7 degrees of freedom.
CHI2_999 = {5: 20.52, 7: 24.32}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("point_mass", [False, True])
def test_verifier_first_token_follows_p(point_mass):
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1]] * 3, dtype=torch.float64)
    q = torch.tensor([[0.5, 0.02, 0.3, 0.08, 0.05, 0.05]] * 2, dtype=torch.float64)
    counts = torch.zeros(6)
    for _ in range(10_000):
        proposal = [int(torch.multinomial(q[0], 1, generator=g)),
                    int(torch.multinomial(q[1], 1, generator=g))]
        emitted = verify_sampled(p, None if point_mass else q, proposal, g)
        counts[emitted[0]] += 1
    assert chi_square(counts, p[0].float()) < CHI2_999[5]


def test_rows_past_the_first_rejection_are_not_processed():
    """Filtering a row for top-p is the dear part of verification: a rejection at the first
    draft reads the first row only, and a processed row equals the block's."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2)) * 3
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20)
    rows = RowProbabilities(logits, params)
    p0 = rows[0]
    ruled_out = int(p0.argmin())  # p = 0 after top-k: always rejected
    verify_sampled(rows, None, [ruled_out, 1, 2, 3], torch.Generator().manual_seed(0))
    assert sorted(rows._rows) == [0]
    torch.testing.assert_close(rows[3], probabilities(logits, params)[3], rtol=0, atol=0)


class FixedQ(Proposer):
    """Draws each proposal from a fixed q (point-heavy, unlike the model's p) and says so."""

    def __init__(self, q: torch.Tensor, seed: int = 1) -> None:
        self.q = q
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, seqs, ks):
        out = []
        for k in ks:
            toks = torch.multinomial(self.q, k, replacement=True, generator=self.g).tolist()
            out.append(Proposal(toks, self.q.expand(k, -1).clone()))
        return out


def test_engine_sampled_tokens_follow_the_target(tmp_path):
    """The second output token is the first one that goes through verification."""
    model_dir = _make_hf_model("llama-gqa", tmp_path / "v8", vocab_size=8)
    prompt = [3, 5, 1, 4]
    n = 1500
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=2, min_acceptance=0.0,
                             max_batch_size=4096, max_step_tokens=1 << 16)
    eng = Engine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_bytes=1 << 22,
                              block_size=4, max_num_seqs=512, speculative=spec))
    eng.spec.proposer = FixedQ(torch.tensor([0.6, 0.01, 0.01, 0.3, 0.02, 0.02, 0.02, 0.02]))
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    out = run_to_completion(eng, [Request(request_id=str(i), prompt_token_ids=prompt,
                                          sampling=params) for i in range(n)])
    second = torch.bincount(torch.tensor([tokens_of(d)[1] for d in out.values()]), minlength=8)
    assert eng.spec.metrics.verifications >= n  # every second token was verified

    # The target's p(t2) = sum_t1 p(t1) p(t2 | t1), from the same model in fp32.
    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        ctx = torch.tensor([[*prompt, t] for t in range(8)])
        p2 = hf(ctx).logits[:, -1].softmax(-1)
    marginal = (p1.unsqueeze(-1) * p2).sum(0)
    assert chi_square(second.float(), marginal) < CHI2_999[7]


class FixedTree(Proposer):
    """Trees of point masses: two siblings drawn from q without replacement, a child of the
    second and one of the first, each drawn from q, so that every branch gets accepted now and
    then (the engine cuts a tree to k tokens; parents come first)."""

    def __init__(self, q: torch.Tensor, seed: int = 1) -> None:
        self.q = q
        self.g = torch.Generator().manual_seed(seed)
        self.paths: list[list[int]] = []

    def propose(self, seqs, ks):
        out = []
        for _ in ks:
            a, b = torch.multinomial(self.q, 2, generator=self.g).tolist()
            c, d = torch.multinomial(self.q, 2, replacement=True, generator=self.g).tolist()
            out.append(Proposal([a, b, c, d], parents=[-1, -1, 1, 0]))
        return out

    def on_tree_accept(self, seq, path):
        self.paths.append(path)


def test_engine_sampled_tree_tokens_follow_the_target(tmp_path):
    """Sampled tree verification (worker/spec/tree.py: walk_sampled) in the engine: each of the
    output tokens 2-5 follows the target's marginal. Many come after an accepted second branch,
    whose K/V were moved into a chain's slots before the next step read them."""
    model_dir = _make_hf_model("llama-gqa", tmp_path / "v8", vocab_size=8)
    prompt = [3, 5, 1, 4]
    n, length = 1500, 5
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, min_acceptance=0.0,
                             max_batch_size=4096, max_step_tokens=1 << 16, measure_gate=False)
    eng = Engine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_bytes=1 << 23,
                              block_size=4, max_num_seqs=512, speculative=spec))
    eng.spec.proposer = tree = FixedTree(torch.tensor([0.3, 0.05, 0.05, 0.3, 0.1, 0.1, 0.05,
                                                       0.05]))
    params = SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True)
    out = run_to_completion(eng, [Request(request_id=str(i), prompt_token_ids=prompt,
                                          sampling=params) for i in range(n)])
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    seqs = torch.tensor([tokens_of(d) for d in out.values()])
    assert sum(1 for p in tree.paths if p[:1] == [1]) > n / 10  # the second sibling
    assert sum(1 for p in tree.paths if p == [1, 2]) > n / 150  # and its child

    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    joint = torch.ones(())  # P(t_1 .. t_j) over all 8^j prefixes
    with torch.no_grad():
        for j in range(length):
            prefixes = torch.tensor(list(itertools.product(range(8), repeat=j)),
                                    dtype=torch.long).view(8 ** j, j)
            ctx = torch.cat([torch.tensor(prompt).expand(8 ** j, -1), prefixes], 1)
            nxt = hf(ctx).logits[:, -1].softmax(-1).view(*[8] * j, 8)
            joint = joint.unsqueeze(-1) * nxt
            if j:
                seen = torch.bincount(seqs[:, j], minlength=8).float()
                marginal = joint.sum(tuple(range(j)))
                assert chi_square(seen, marginal) < CHI2_999[7], f"output token {j + 1}"
