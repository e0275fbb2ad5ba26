"""Pipeline stages on two (simulated) nodes: custom resources pin stage 0 to one node and
stage 1 to the other, so the hidden states cross between Ray nodes; greedy tokens still equal
the single-process engine's. And a TP group that fits the cluster but no single node is refused
with a message that says so."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from cluster.llm import LLM
from cluster.placement import PlacementError
from cluster.remote_engine import RemoteEngine
from cluster.replica_actor import start_replica
from cluster.serve_config import ReplicaSettings
from protos.messages import Request, SamplingParams
from worker.config import EngineConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "resources": {"pool_a": 1}})
    cluster.add_node(num_cpus=1, resources={"pool_b": 1})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_pipeline_stages_on_two_nodes_match_single_process(two_nodes: Cluster,
                                                           tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama-kv4")
    config = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_bytes=1 << 20,
                          num_threads=1)
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30 + i for i in range(17)]]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 20, num_threads=1)
    want = [o.token_ids for o in reference.generate(prompts, greedy)]

    settings = ReplicaSettings(num_cpus=0.5, pipeline_parallel_size=2,
                               stage_resources=[{"pool_a": 0.01}, {"pool_b": 0.01}])
    engine = RemoteEngine(config, settings, "tiny")
    try:
        nodes = placement_group_table(engine.replica.placement_group)["bundles_to_node_id"]
        assert nodes[0] != nodes[1], "the two stages should sit on different nodes"
        for i, ids in enumerate(prompts):
            engine.add_request(Request(request_id=str(i), prompt_token_ids=ids, sampling=greedy))
        got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        while engine.has_unfinished():
            for d in engine.step():
                got[d.request_id] += d.token_ids
        assert [got[str(i)] for i in range(len(prompts))] == want
    finally:
        engine.shutdown()


def test_tp_group_that_fits_no_single_node_is_refused(two_nodes: Cluster,
                                                      tiny_model_dir) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama-kv4")), kv_cache_bytes=1 << 20)
    settings = ReplicaSettings(num_cpus=1, tensor_parallel_size=2, start_timeout_s=1.0)
    with pytest.raises(PlacementError, match="enough in the cluster but not on one node"):
        asyncio.run(start_replica("split", config, "tiny", settings))
