"""Tensor and pipeline parallelism on a local Ray with gloo: greedy tokens of every layout equal
the single-process engine's (fp32), with prefix-cache hits and forced preemption; placement
errors; a killed rank fails its replica without hanging. One Ray instance for the module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import ray

from cluster.llm import LLM
from cluster.placement import PlacementError
from cluster.replica_actor import start_replica
from cluster.serve_config import ReplicaSettings
from protos.messages import PollResult, Request, SamplingParams, encode
from worker.config import EngineConfig, ModelConfig

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 24  # 96 token slots: four 36-token sequences cannot all fit -> preemption
PREFIX = [7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29]
PROMPTS = [[*PREFIX, 40, 41, 42, 43, 44, 45, 46, 47],
           [*PREFIX, 50, 51, 52, 53, 54, 55, 56, 57],
           [60 + i for i in range(20)],
           [100 + 3 * i for i in range(20)]]
LATER = [[*PREFIX, 40, 41, 42, 43, 44, 45, 46, 47, 90], [*PREFIX, 91, 92]]  # prefix-cache hits
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def kv_bytes(model_dir: Path, tp: int, pp_layers: list[int]) -> int:
    """Per-rank KV bytes that give every layout exactly NUM_BLOCKS blocks (the biggest rank's
    block decides), so that all layouts schedule and preempt identically."""
    cfg = ModelConfig.from_hf_dir(model_dir)
    kv_heads = max(1, cfg.num_kv_heads // tp)
    block_bytes = 2 * max(pp_layers) * BLOCK * kv_heads * cfg.head_dim * 4
    return NUM_BLOCKS * block_bytes


def run(llm: LLM) -> tuple[list[list[int]], list[list[int]], object]:
    first = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    later = [o.token_ids for o in llm.generate(LATER, GREEDY)]
    return first, later, llm.engine.stats()


def make_llm(model_dir: Path, tp: int = 1, pp: int = 1,
             pp_layers: list[int] | None = None, speculative: str | None = None) -> LLM:
    layers = pp_layers or [ModelConfig.from_hf_dir(model_dir).num_layers // pp] * pp
    return LLM(str(model_dir), dtype="float32", block_size=BLOCK, num_threads=1,
               kv_cache_bytes=kv_bytes(model_dir, tp, layers), tensor_parallel_size=tp,
               pipeline_parallel_size=pp, pipeline_layers=pp_layers, speculative=speculative,
               # every step speculates: the gate would turn it off for a model this cheap
               speculative_options={"measure_gate": False} if speculative else None)


# KV heads matter only for TP: 4 KV heads are split over 2 ranks; 1 KV head is replicated.
LAYOUTS = [
    ("llama-kv4", 2, 1, None),
    ("llama-kv4", 1, 2, [1, 3]),  # uneven stages
    ("llama-kv4", 2, 2, None),
    ("llama-kv1", 2, 1, None),
    ("llama-kv1", 1, 2, None),
    ("llama-kv1", 2, 2, None),
]


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[str, tuple]:
    out = {}
    for kind in ("llama-kv4", "llama-kv1"):
        llm = make_llm(tiny_model_dir(kind))
        out[kind] = run(llm)
        stats = out[kind][2]
        assert stats.num_preempted_total > 0 and stats.prefix_hits_total > 0, stats
    return out


def test_ngram_speculation_under_tensor_parallelism_is_exact(tiny_model_dir, reference) -> None:
    # Rank 0 builds the whole StepPlan, proposals included; rank 1 runs the same forward.
    llm = make_llm(tiny_model_dir("llama-kv4"), tp=2, speculative="ngram")
    try:
        first, later, stats = run(llm)
    finally:
        llm.shutdown()
    want_first, want_later, _ = reference["llama-kv4"]
    assert first == want_first and later == want_later
    assert stats.spec_verifications_total > 0 and stats.spec_accepted_tokens_total > 0


@pytest.mark.parametrize(("kind", "tp", "pp", "pp_layers"), LAYOUTS,
                         ids=[f"{k}-tp{t}-pp{p}" for k, t, p, _ in LAYOUTS])
def test_greedy_tokens_equal_single_process(tiny_model_dir, reference, kind: str, tp: int,
                                            pp: int, pp_layers: list[int] | None) -> None:
    llm = make_llm(tiny_model_dir(kind), tp, pp, pp_layers)
    try:
        first, later, stats = run(llm)
    finally:
        llm.shutdown()
    want_first, want_later, want_stats = reference[kind]
    assert first == want_first
    assert later == want_later
    # Same block count on every rank and in the reference: the same schedule, preemptions
    # and prefix-cache hits.
    assert stats.kv_blocks_total == want_stats.kv_blocks_total == NUM_BLOCKS
    assert stats.num_preempted_total == want_stats.num_preempted_total
    assert stats.prefix_hits_total == want_stats.prefix_hits_total


def test_unsatisfiable_placement_says_what_is_missing(tiny_model_dir) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama-kv4")), kv_cache_bytes=1 << 20)
    settings = ReplicaSettings(num_cpus=3, tensor_parallel_size=2, start_timeout_s=1.0)
    with pytest.raises(PlacementError, match=r"2 bundles .*STRICT_PACK.*CPU: 6 needed, \d+ free "
                                             r"of 4.*--tp/--pp"):
        asyncio.run(start_replica("too-big", config, "tiny", settings))


def test_a_killed_rank_fails_the_replica_without_hanging(tiny_model_dir) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama-kv4")), kv_cache_bytes=1 << 20,
                          dtype="float32", num_threads=1)
    settings = ReplicaSettings(num_cpus=0.5, tensor_parallel_size=2, collective_timeout_s=20)
    replica = asyncio.run(start_replica("victim", config, "tiny", settings))
    rank0 = replica.actor
    try:
        assert ray.get(rank0.health.remote()) is None
        (rank1,) = ray.get(rank0.rank_actors.remote())
        request = Request(request_id="r", prompt_token_ids=[5, 6, 7],
                          sampling=SamplingParams(temperature=0.0, max_tokens=200,
                                                  ignore_eos=True))
        ray.get(rank0.submit.remote(encode([request])))
        decode = msgspec.msgpack.Decoder(PollResult)
        got = decode.decode(ray.get(rank0.poll.remote(5.0)))
        assert got.deltas and got.stats.healthy
        ray.kill(rank1, no_restart=True)
        t0 = time.monotonic()
        while True:  # the step in flight fails as soon as the peer's sockets close
            result = decode.decode(ray.get(rank0.poll.remote(1.0)))
            if not result.stats.healthy:
                break
            assert time.monotonic() - t0 < 15, "rank 0 did not notice the dead rank"
        # No error deltas: the request did nothing wrong, the router moves it elsewhere.
        assert all(d.finish_reason != "error" for d in result.deltas)
        error = ray.get(rank0.health.remote())
        assert error is not None and "gone" in error, error
        assert time.monotonic() - t0 < 15
    finally:
        ray.kill(rank0, no_restart=True)
        ray.util.remove_placement_group(replica.placement_group)
