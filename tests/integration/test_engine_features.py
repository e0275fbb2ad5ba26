"""Prefix caching, aborts, limits and seeded sampling through the whole engine."""

from __future__ import annotations

import pytest

from protos.messages import Request, SamplingParams
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import ConfigError, EngineConfig
from worker.engine import Engine, RequestError


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def make_engine(model, **kw) -> Engine:
    cfg = dict(model=str(model), dtype="float32", kv_cache_bytes=1 << 22, block_size=4)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def test_prefix_cache_computes_fewer_tokens_and_same_output(model):
    prefix = list(range(10, 50))  # 40 tokens = 10 full blocks
    prompts = [[*prefix, 60 + i, 70 + i, 80 + i] for i in range(4)]
    reqs = lambda tag: [Request(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=greedy(8))  # noqa: E731
                        for i, p in enumerate(prompts)]

    cold = make_engine(model, enable_prefix_caching=False)
    base = run_to_completion(cold, reqs("a"))

    warm = make_engine(model)
    first = run_to_completion(warm, reqs("a")[:1])
    computed_before = warm.prompt_tokens_total
    second = run_to_completion(warm, reqs("b"))
    computed_second = warm.prompt_tokens_total - computed_before

    assert tokens_of(first["a0"]) == tokens_of(base["a0"])
    for i in range(4):
        assert tokens_of(second[f"b{i}"]) == tokens_of(base[f"a{i}"])
        assert second[f"b{i}"][-1].num_cached_tokens == 40
    # Without the cache the second batch would compute 4 * 43 prompt tokens.
    assert computed_second == 4 * 3
    assert warm.kv.num_free_blocks == warm.kv.num_blocks
    assert warm.stats().prefix_hits_total == 4 * 40


def test_prefix_cache_salt_separates_tenants(model):
    eng = make_engine(model)
    prompt = list(range(10, 30))
    run_to_completion(eng, [Request(request_id="a", prompt_token_ids=prompt, sampling=greedy(2),
                                    cache_salt="tenant-a")])
    out = run_to_completion(eng, [Request(request_id="b", prompt_token_ids=prompt,
                                          sampling=greedy(2), cache_salt="tenant-b")])
    assert out["b"][-1].num_cached_tokens == 0


def test_abort_frees_blocks_at_once(model):
    eng = make_engine(model)
    for i in range(3):
        eng.add_request(Request(request_id=str(i), prompt_token_ids=list(range(5, 40)),
                                sampling=greedy(50)))
    for _ in range(3):
        eng.step()
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    eng.abort(["0", "1", "2", "unknown"])
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    deltas = eng.step()
    assert sorted(d.request_id for d in deltas) == ["0", "1", "2"]
    assert all(d.finish_reason == "abort" for d in deltas)
    assert not eng.has_unfinished()


def test_over_long_prompt_and_bad_ids_are_clear_errors(model):
    eng = make_engine(model, max_model_len=32)
    with pytest.raises(RequestError, match="max_model_len is 32"):
        eng.add_request(Request(request_id="x", prompt_token_ids=list(range(40))))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request(Request(request_id="y", prompt_token_ids=[1, 999_999]))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request(Request(request_id="z", prompt_token_ids=[]))
    # The engine keeps serving.
    out = run_to_completion(eng, [Request(request_id="ok", prompt_token_ids=[1, 2, 3],
                                          sampling=greedy(4))])
    assert len(tokens_of(out["ok"])) == 4


def test_generation_stops_at_max_model_len(model):
    eng = make_engine(model, max_model_len=20)
    out = run_to_completion(eng, [Request(request_id="r", prompt_token_ids=list(range(1, 16)),
                                          sampling=greedy(100))])
    assert len(tokens_of(out["r"])) == 5
    assert out["r"][-1].finish_reason == "length"


def test_max_model_len_beyond_kv_capacity_is_a_config_error(model):
    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        make_engine(model, kv_cache_bytes=4096, max_model_len=200)


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=12,
                            ignore_eos=True)
    alone = run_to_completion(make_engine(model), [
        Request(request_id="s", prompt_token_ids=[4, 5, 6], sampling=params)])
    crowd = [Request(request_id=f"o{i}", prompt_token_ids=[7 + i, 8, 9],
                     sampling=SamplingParams(temperature=1.0, max_tokens=12)) for i in range(4)]
    mixed = run_to_completion(make_engine(model, seed=99), [
        *crowd[:2], Request(request_id="s", prompt_token_ids=[4, 5, 6], sampling=params),
        *crowd[2:]])
    assert tokens_of(alone["s"]) == tokens_of(mixed["s"])
    other = run_to_completion(make_engine(model), [
        Request(request_id="s", prompt_token_ids=[4, 5, 6],
                sampling=SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=8,
                                        max_tokens=12, ignore_eos=True))])
    assert tokens_of(other["s"]) != tokens_of(alone["s"])


def test_stop_token_ids_min_tokens_and_eos(model):
    eng = make_engine(model)
    probe = run_to_completion(eng, [Request(request_id="p", prompt_token_ids=[5, 6, 7],
                                            sampling=greedy(10))])
    toks = tokens_of(probe["p"])
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = run_to_completion(eng, [Request(
        request_id="q", prompt_token_ids=[5, 6, 7],
        sampling=SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,)))])
    assert tokens_of(out["q"]) == toks[:first + 1]
    assert out["q"][-1].finish_reason == "stop" and out["q"][-1].stop_reason == stop_at
    # min_tokens: the stop token is masked until enough tokens exist, so generation goes on.
    out = run_to_completion(eng, [Request(
        request_id="m", prompt_token_ids=[5, 6, 7],
        sampling=SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 3,
                                stop_token_ids=(stop_at,)))])
    got = tokens_of(out["m"])
    assert stop_at not in got[:first + 3]
    assert len(got) >= first + 3


def test_resubmission_continues_without_repeating(model):
    eng = make_engine(model)
    full = tokens_of(run_to_completion(eng, [Request(request_id="a", prompt_token_ids=[9, 8, 7],
                                                     sampling=greedy(12))])["a"])
    resumed = run_to_completion(eng, [Request(request_id="b", prompt_token_ids=[9, 8, 7],
                                              prior_output_token_ids=full[:5],
                                              sampling=greedy(12))])
    assert tokens_of(resumed["b"]) == full[5:]
    assert resumed["b"][-1].num_output_tokens == 12


def test_logprobs_are_returned(model):
    eng = make_engine(model)
    out = run_to_completion(eng, [Request(request_id="l", prompt_token_ids=[3, 4, 5],
                                          sampling=greedy(3, logprobs=5))])
    lps = [lp for d in out["l"] for lp in (d.logprobs or [])]
    assert len(lps) == 3
    for d, lp in zip(out["l"], lps):
        assert lp.sampled.token_id == d.token_ids[0]
        assert lp.sampled.rank == 1  # greedy picks the argmax
        assert lp.top[0].token_id == lp.sampled.token_id
        assert len(lp.top) == 5
        assert lp.top[0].logprob >= lp.top[-1].logprob
