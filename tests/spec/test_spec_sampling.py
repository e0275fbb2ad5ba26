"""At temperature > 0 speculation must not change the distribution of what is sampled.

Chi-square goodness of fit (Pearson) against the target's own distribution p, with a draft
distribution q chosen far from p. Critical values are for significance 0.001, so a correct
implementation fails about once in a thousand runs; seeds are fixed, so these runs are stable.
"""

from __future__ import annotations

import pytest
import torch

from protos.messages import Request, SamplingParams
from tests.conftest import _make_hf_model
from tests.engine_utils import run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig
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
