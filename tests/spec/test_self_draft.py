"""The self-draft: `draft` without a draft model runs the target's own weights in w4a8 over the
target's KV cache (worker/spec/self_draft.py). Greedy output stays exactly the target's,
sampled output follows the target's distribution, and the draft keeps no cache of its own."""

from __future__ import annotations

import msgspec
import pytest
import torch

from kernels import cpu_w4a8
from protos.messages import Request, SamplingParams
from tests.conftest import _make_hf_model
from tests.engine_utils import greedy, run_to_completion, tokens_of
from tests.spec.test_spec_sampling import CHI2_999, chi_square
from worker.config import EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig
from worker.spec.rescored_head import RescoredHead, top_candidates
from worker.spec.self_draft import SelfDraftProposer

pytestmark = pytest.mark.skipif(not cpu_w4a8.available(), reason="needs AVX512-VNNI")

PROMPTS = [[5, 6, 7, 8, 5, 6, 7], list(range(20, 45)), [9, 3, 9, 3, 11], [100, 101, 102]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def make_engine(model, spec: SpeculativeConfig | None, **kw) -> Engine:
    if spec is not None:  # every step speculates: a tiny target is too cheap for the gate
        spec = msgspec.structs.replace(spec, measure_gate=False, min_acceptance=0.0)
    cfg = dict(model=str(model), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
               speculative=spec)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def run(engine: Engine, sampling=None, tag: str = "r") -> list[list[int]]:
    reqs = [Request(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=sampling or greedy(20))
            for i, p in enumerate(PROMPTS)]
    out = run_to_completion(engine, reqs)
    return [tokens_of(out[r.request_id]) for r in reqs]


@pytest.fixture(scope="module")
def baseline(model):
    return run(make_engine(model, None))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_self_draft_is_exact_and_shares_the_cache(model, baseline, k) -> None:
    eng = make_engine(model, SpeculativeConfig(method="draft", num_speculative_tokens=k))
    proposer = eng.spec.proposer
    assert isinstance(proposer, SelfDraftProposer) and "w4a8" in proposer.weight_format
    assert isinstance(proposer.runner.model.lm_head, RescoredHead)
    for mine, theirs in zip(proposer.runner.attn_layers, eng.runner.attn_layers, strict=True):
        assert mine.k_cache is theirs.k_cache and mine.v_cache is theirs.v_cache
    assert run(eng) == baseline
    m = eng.spec.metrics
    # the same weights in int4 agree with the target most of the time, even on a random model
    assert m.proposed_tokens > 0 and m.accepted_tokens >= 0.25 * m.proposed_tokens
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_self_draft_with_prefix_hits_and_preemption(model, baseline) -> None:
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=4)
    eng = make_engine(model, spec)
    assert run(eng, tag="a") == baseline
    assert run(eng, tag="b") == baseline  # the prompts now come from the prefix cache
    assert eng.stats().prefix_hits_total > 0
    # 4 sequences of up to 45 tokens in 4-token blocks need ~48 blocks; give ~24
    small = make_engine(model, spec, kv_cache_bytes=24 * 2 * 2 * 4 * 2 * 16 * 4)
    assert run(small) == baseline
    assert small.scheduler.num_preemptions > 0
    assert small.kv.num_free_blocks == small.kv.num_blocks


def test_penalties_and_min_tokens_apply_to_the_draft_as_to_the_target(model) -> None:
    """Greedy with a repetition penalty: the draft penalizes its own proposals as the target
    will (worker/spec/processing.py), and the output is plain decoding's."""
    sampling = greedy(20, repetition_penalty=1.3, presence_penalty=0.4, min_tokens=5)
    plain = run(make_engine(model, None), sampling)
    eng = make_engine(model, SpeculativeConfig(method="draft", num_speculative_tokens=4,
                                               draft_ngram_min_tokens=0))
    assert run(eng, sampling) == plain
    m = eng.spec.metrics
    assert m.accepted_tokens >= 0.25 * m.proposed_tokens > 0


def test_ngram_lookup_before_the_self_draft_is_exact(model, baseline) -> None:
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_ngram_min_tokens=2)
    eng = make_engine(model, spec)
    assert run(eng) == baseline
    counts = eng.spec.proposer.proposals
    assert counts["ngram"] > 0 and counts["draft"] > 0  # the repetitive prompts take the lookup
    off = make_engine(model, msgspec.structs.replace(spec, draft_ngram_min_tokens=0))
    assert run(off) == baseline and off.spec.proposer.proposals["ngram"] == 0


def test_the_draft_head_picks_what_the_float_head_picks() -> None:
    """4-bit logits for all rows, the best candidates recomputed from the float rows: the
    argmax is the float head's wherever it is among them (here always), with its exact logit;
    4 bits alone flip some."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 64, generator=gen) * 0.05
    hidden = torch.randn(64, 64, generator=gen)
    exact = hidden @ rows.T
    head = RescoredHead(rows, vocab_size=500, candidates=8)
    got = head.compute_logits(hidden)
    assert got.shape == (64, 500)
    want = exact[:, :500].argmax(-1)
    assert torch.equal(got.argmax(-1), want)
    torch.testing.assert_close(got.gather(-1, want[:, None]), exact.gather(-1, want[:, None]))
    coarse = RescoredHead(rows, vocab_size=500, candidates=1).compute_logits(hidden)
    assert not torch.equal(coarse.argmax(-1), want)


@pytest.mark.parametrize("vocab", [49152, 5000, 300])
def test_top_candidates_are_topks(vocab) -> None:
    """The block-wise search finds the same set as torch.topk (ties included: repeated
    values), with vocabularies that leave a partial block and one small enough for topk."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen).round(decimals=1)
    got = top_candidates(logits, 16)
    want = logits.topk(16, dim=-1).values
    assert torch.equal(logits.gather(1, got).sort(-1).values, want.sort(-1).values)
    assert all(len(set(r)) == 16 for r in got.tolist())


def test_self_draft_in_bf16_and_through_llm(model) -> None:
    from cluster.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(dtype="bfloat16", kv_cache_bytes=1 << 22, block_size=4)
    plain = [o.token_ids for o in LLM(str(model), **kw).generate(PROMPTS, params)]
    llm = LLM(str(model), speculative="draft", num_speculative_tokens=5,
              speculative_options={"measure_gate": False}, **kw)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    assert llm.engine.stats().spec_accepted_tokens_total > 0


def test_sampled_tokens_follow_the_target(tmp_path) -> None:
    """The draft's q (its own quantized logits, processed like the target's) differs from p;
    rejection sampling must still give the target's distribution: token 2 (the first one
    verified) overall, and given the likeliest token 1. Drawing proposals with a generator
    seeded like the sampler's broke both (chi-square 29 and 154 against a 0.999 bound of 24)."""
    model_dir = _make_hf_model("llama-gqa", tmp_path / "v8", vocab_size=8)
    prompt = [3, 5, 1, 4]
    n = 2000
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=2, max_batch_size=4096,
                             max_step_tokens=1 << 16)
    eng = make_engine(model_dir, spec, max_num_seqs=400)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    out = run_to_completion(eng, [Request(request_id=str(i), prompt_token_ids=prompt,
                                          sampling=params) for i in range(n)])
    pairs = torch.tensor([tokens_of(d)[:2] for d in out.values()])
    m = eng.spec.metrics
    assert m.verifications >= n // 2 and 0 < m.accepted_tokens < m.proposed_tokens

    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = hf(torch.tensor([[*prompt, t] for t in range(8)])).logits[:, -1].softmax(-1)
    second = torch.bincount(pairs[:, 1], minlength=8).float()
    assert chi_square(second, (p1.unsqueeze(-1) * p2).sum(0)) < CHI2_999[7]
    top = int(p1.argmax())
    given = torch.bincount(pairs[pairs[:, 0] == top, 1], minlength=8).float()
    assert chi_square(given, p2[top]) < CHI2_999[7]
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
