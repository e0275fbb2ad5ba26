"""Sampler maths against plain, one-row-at-a-time references on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from protos.messages import Request, SamplingParams
from worker.sampler import Sampler, apply_penalties, apply_top_k_top_p_min_p, draw_rows
from worker.sequence import Sequence


def reference_filter(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Which token ids survive, computed the obvious way."""
    probs = torch.tensor(logits).softmax(-1).tolist()
    keep = set(range(len(logits)))
    if min_p > 0:
        keep = {i for i in keep if probs[i] >= min_p * max(probs)}
    order = sorted(keep, key=lambda i: -logits[i])
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1:
        z = sum(math.exp(logits[i]) for i in order)
        mass, kept = 0.0, []
        for i in order:
            if mass >= top_p and kept:
                break
            kept.append(i)
            mass += math.exp(logits[i]) / z
        order = kept
    return set(order)


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.7, 0.0),
                                                (5, 0.5, 0.0), (0, 1.0, 0.2), (4, 0.9, 0.05)])
def test_top_k_top_p_min_p_match_reference(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = torch.randn(3, 12, generator=gen) * 2
    n = logits.shape[0]
    out = apply_top_k_top_p_min_p(logits, torch.full((n,), top_k), torch.full((n,), top_p),
                                  torch.full((n,), min_p))
    for r in range(n):
        kept = {i for i in range(12) if out[r, i] != float("-inf")}
        assert kept == reference_filter(logits[r].tolist(), top_k, top_p, min_p)
        for i in kept:
            assert out[r, i] == logits[r, i]


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_partial_sort_keeps_what_a_full_sort_keeps(scale):
    """Rows of mixed settings over a 5000-token vocabulary: flat rows (scale 0.5) hold their
    nucleus far past the first TOP_CANDIDATES tokens, so they are widened (to 1024, then the
    whole row); peaky ones stop at the candidates. Every row keeps the reference's set."""
    gen = torch.Generator().manual_seed(int(scale * 10))
    n, vocab = 6, 5000
    logits = torch.randn(n, vocab, generator=gen) * scale
    top_k = torch.tensor([0, 0, 300, 0, 2000, 40])
    top_p = torch.tensor([0.9, 0.5, 0.95, 1.0, 0.8, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.01])
    out = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for r in range(n):
        kept = (out[r] != float("-inf")).nonzero().flatten().tolist()
        want = reference_filter(logits[r].tolist(), int(top_k[r]), float(top_p[r]),
                                float(min_p[r]))
        assert set(kept) == want, r
        assert torch.equal(out[r, kept], logits[r, kept])


@pytest.mark.parametrize("vocab", [8, 700])
def test_draw_rows_follows_the_weights_and_never_draws_a_zero(vocab):
    """Inverse-CDF draws from unnormalized weights with zeros at the ends and inside (700: a
    whole block of DRAW_BLOCK zeros, and a last block padded): the frequencies fit
    (chi-square, 4 degrees of freedom, significance 0.001) and no zero-weight token comes out,
    even at the extremes of u."""
    w = torch.zeros(vocab)
    nz = [1, 3, 4, 5, 6] if vocab == 8 else [1, 255, 513, 600, 650]
    w[nz] = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.5])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = draw_rows(w.expand(n, -1), u)
    counts = torch.bincount(got, minlength=vocab).double()
    assert counts.sum() == counts[nz].sum()
    expected = w[nz].double() / w.sum() * n
    assert float(((counts[nz] - expected) ** 2 / expected).sum()) < 18.47
    assert draw_rows(w[None], torch.zeros(1)).item() == nz[0]
    assert draw_rows(w[None], torch.full((1,), 1 - 1e-16, dtype=torch.float64)).item() == nz[-1]


def _seq(prompt, output, **params) -> Sequence:
    s = Sequence(Request(request_id="x", prompt_token_ids=prompt,
                         sampling=SamplingParams(**params)))
    s.token_ids.extend(output)
    return s


def test_penalties_match_reference():
    """Rows of one batch with their own penalties (applied to all rows at once): each row gets
    exactly its own, a row without penalties is left alone, ids past the vocabulary (a
    bigger tokenizer) are ignored."""
    logits = torch.tensor([[0.5, -1.0, 2.0, -0.5, 1.5, 0.3, 0.0]] * 4)
    cases = [  # prompt, output, repetition, presence, frequency
        ([1, 2, 3], [3, 4, 4, 5], 1.3, 0.4, 0.25),
        ([0, 0, 9], [6, 6, 6, 2], 0.8, 0.0, -0.5),
        ([4], [], 1.0, 0.7, 0.0),
        ([1, 2], [2, 2], 1.0, 0.0, 0.0),
    ]
    seqs = [_seq(p, o, repetition_penalty=r, presence_penalty=pr, frequency_penalty=f)
            for p, o, r, pr, f in cases]
    got = logits.clone()
    apply_penalties(got, seqs, [0, 1, 2])
    for row, (prompt, output, rep, pres, freq) in enumerate(cases):
        want = logits[row].tolist()
        for t in set(prompt + output) - {9}:
            if rep != 1.0:
                want[t] = want[t] / rep if want[t] > 0 else want[t] * rep
        for t in set(output):
            want[t] -= freq * output.count(t) + pres
        torch.testing.assert_close(got[row], torch.tensor(want))
    assert torch.equal(got[3], logits[3])


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    params = dict(temperature=0.8, top_k=4, top_p=0.9, max_tokens=1)
    seq = _seq([0], [], **params)
    sampler = Sampler([], seed=3)
    draws = 20_000
    counts = torch.zeros(6)
    batch = 500
    for _ in range(draws // batch):
        out = sampler(logits.repeat(batch, 1), [seq] * batch)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=6)
    scaled = (logits[0] / 0.8).tolist()
    kept = reference_filter(scaled, 4, 0.9, 0.0)
    z = sum(math.exp(scaled[i]) for i in kept)
    expected = torch.tensor([math.exp(scaled[i]) / z if i in kept else 0.0 for i in range(6)])
    freq = counts / draws
    assert counts[[i for i in range(6) if i not in kept]].sum() == 0
    # 4 sigma of a binomial proportion at 20k draws is < 0.015.
    assert (freq - expected).abs().max() < 0.015


def test_greedy_rows_ignore_noise_and_min_tokens_masks_eos():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    eos = 1
    s_min = _seq([0], [], temperature=0, min_tokens=2, max_tokens=4)
    s_free = _seq([0], [], temperature=0, max_tokens=4)
    out = Sampler([eos])(logits, [s_min, s_free])
    assert out.token_ids == [2, 1]
