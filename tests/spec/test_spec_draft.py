"""Draft-model proposers: in process, and a pool of Ray actors that survives losing one."""

from __future__ import annotations

import msgspec
import pytest

from protos.messages import Request, SamplingParams
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig

PROMPTS = [[5, 6, 7, 8, 5, 6, 7], list(range(20, 45)), [9, 3, 9, 3, 11], [100, 101, 102]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def make_engine(model, spec=None, draft_actors=None, **kw) -> Engine:
    if spec is not None:  # every step speculates (tests/spec/test_spec_greedy.py: make_engine)
        spec = msgspec.structs.replace(spec, measure_gate=False)
    cfg = dict(model=str(model), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
               speculative=spec)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), draft_actors=draft_actors)


def requests(ids: list[str], sampling) -> list[Request]:
    return [Request(request_id=r, prompt_token_ids=p, sampling=sampling)
            for r, p in zip(ids, PROMPTS)]


def outputs(engine: Engine, reqs: list[Request]) -> list[list[int]]:
    out = run_to_completion(engine, reqs)
    return [tokens_of(out[r.request_id]) for r in reqs]


@pytest.fixture(scope="module")
def baseline(model):
    return outputs(make_engine(model), requests(["a", "b", "c", "d"], greedy(20)))


def draft_spec(draft, k: int = 3) -> SpeculativeConfig:
    return SpeculativeConfig(method="draft", draft_model=str(draft), num_speculative_tokens=k,
                             draft_dtype="float32", draft_kv_cache_bytes=1 << 20,
                             min_acceptance=0.0)


def test_self_draft_accepts_everything(model, baseline):
    eng = make_engine(model, draft_spec(model, k=4))
    assert outputs(eng, requests(["a", "b", "c", "d"], greedy(20))) == baseline
    m = eng.spec.metrics
    assert m.proposed_tokens > 0 and m.accepted_tokens == m.proposed_tokens
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.spec.proposer.worker.states  # freed with their sequences


@pytest.mark.parametrize("k", [1, 3])
def test_other_draft_is_exact(model, baseline, tiny_model_dir, k):
    eng = make_engine(model, draft_spec(tiny_model_dir("llama-mha"), k))
    assert outputs(eng, requests(["a", "b", "c", "d"], greedy(20))) == baseline
    m = eng.spec.metrics
    assert m.proposed_tokens > 0 and m.accepted_tokens < m.proposed_tokens


def test_sampled_requests_run_with_draft_distributions(model, tiny_model_dir):
    eng = make_engine(model, draft_spec(tiny_model_dir("llama-mha"), 3))
    params = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.2, max_tokens=12,
                            ignore_eos=True, seed=7)
    out = outputs(eng, requests(["a", "b", "c", "d"], params))
    assert [len(o) for o in out] == [12] * 4
    assert eng.spec.metrics.verifications > 0


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_pool_survives_a_dead_draft_actor(model, baseline, ray_local):
    from worker.spec.draft_actor import start_draft_pool, stop_draft_pool
    from worker.spec.pool import actor_index

    spec = SpeculativeConfig(method="pool", draft_model=str(model), draft_replicas=2,
                             num_speculative_tokens=3, draft_dtype="float32",
                             draft_kv_cache_bytes=1 << 20, min_acceptance=0.0,
                             draft_num_cpus=0.5)
    actors = start_draft_pool(spec, model, 256)
    try:
        # Request ids that land on both actors.
        ids = ["a", "b", "c", "d"]
        assert {actor_index(r, 2) for r in ids} == {0, 1}
        eng = make_engine(model, spec, draft_actors=actors)
        for r in requests(ids, greedy(20)):
            eng.add_request(r)
        got: dict[str, list[int]] = {r: [] for r in ids}
        for step in range(200):
            if not eng.has_unfinished():
                break
            if step == 4:
                ray_local.kill(actors[0], no_restart=True)
            for d in eng.step():
                got[d.request_id].extend(d.token_ids)
        assert [got[r] for r in ids] == baseline
        assert eng.spec.proposer.dead == {0}
        assert eng.spec.metrics.accepted_tokens > 0
        stats = eng.stats()
        assert stats.spec_acceptance_rate == 1.0 and stats.spec_mean_accepted_length > 1
    finally:
        stop_draft_pool(actors)
