"""Pieces of tensor/pipeline parallelism that need no process group: layer splits, micro-batch
plans, weight-loader shards, stage checkpoint names, config checks."""

from __future__ import annotations

import pytest
import torch

from cluster.serve_config import ReplicaSettings
from protos.messages import StepPlan, decoder, encode
from worker.layers.embedding import VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.models.llama import LlamaForCausalLM
from worker.parallel import StageInfo, TPInfo, split_layers
from worker.pipeline import split_plan


def test_split_layers_even_uneven_and_given() -> None:
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(7, 3) == [(0, 2), (2, 4), (4, 7)]  # the remainder goes to later stages
    assert split_layers(8, 2, [3, 5]) == [(0, 3), (3, 8)]
    with pytest.raises(ValueError, match="add up to 7"):
        split_layers(8, 2, [3, 4])
    with pytest.raises(ValueError, match="cannot be split"):
        split_layers(2, 3)


def _plan() -> StepPlan:
    # seq 0: 5-token prefill chunk without sampling; seq 1: decode; seq 2: 3-token prefill.
    return StepPlan(step_id=3, input_ids=[1, 2, 3, 4, 5, 6, 7, 8, 9],
                    positions=[0, 1, 2, 3, 4, 9, 0, 1, 2],
                    slot_mapping=[10, 11, 12, 13, 14, 29, 40, 41, 42],
                    query_start=[0, 5, 6, 9], seq_lens=[5, 10, 3],
                    block_tables=[[2, 3], [5, 6, 7], [10]], sample_indices=[5, 8])


def test_split_plan_keeps_whole_sequences_and_rebases_indices() -> None:
    parts = split_plan(_plan(), 2)
    assert [p.seq_lens for p in parts] == [[5], [10, 3]]
    a, b = parts
    assert a.input_ids == [1, 2, 3, 4, 5] and a.sample_indices == []
    assert b.input_ids == [6, 7, 8, 9] and b.query_start == [0, 1, 4]
    assert b.slot_mapping == [29, 40, 41, 42] and b.sample_indices == [0, 3]
    assert b.block_tables == [[5, 6, 7], [10]]
    assert split_plan(_plan(), 1) == [_plan()]
    assert len(split_plan(_plan(), 8)) == 3  # never more pieces than sequences


def test_step_plan_round_trips_as_msgspec_bytes() -> None:
    payload = encode(_plan())
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    assert decoder(StepPlan).decode(tensor.numpy().tobytes()) == _plan()


def _shards(make, full: torch.Tensor, size: int, load) -> list[torch.Tensor]:
    out = []
    for rank in range(size):
        layer = make(TPInfo(rank=rank, size=size))
        load(layer)
        out.append(layer.weight.data.clone())
    return out


@pytest.mark.parametrize(("kv_heads", "tp"), [(4, 2), (2, 4), (1, 2)])
def test_qkv_shards_hold_their_heads(kv_heads: int, tp: int) -> None:
    heads, dim, hidden = 4, 3, 8
    q = torch.randn(heads * dim, hidden)
    k, v = torch.randn(kv_heads * dim, hidden), torch.randn(kv_heads * dim, hidden)

    def load(layer: QKVParallelLinear) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, t, name)

    shards = _shards(lambda t: QKVParallelLinear(hidden, dim, heads, kv_heads, tp=t), q, tp, load)
    local_q, local_kv = heads // tp * dim, max(1, kv_heads // tp) * dim
    for rank, w in enumerate(shards):
        assert torch.equal(w[:local_q], q[rank * local_q:(rank + 1) * local_q])
        kv_rank = rank // max(1, tp // kv_heads)  # replicated when fewer KV heads than ranks
        rows = slice(kv_rank * local_kv, (kv_rank + 1) * local_kv)
        assert torch.equal(w[local_q:local_q + local_kv], k[rows])
        assert torch.equal(w[local_q + local_kv:], v[rows])


def test_gate_up_and_row_shards_reassemble() -> None:
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)

    def load_gu(layer: MergedColumnParallelLinear) -> None:
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)

    gu = _shards(lambda t: MergedColumnParallelLinear(4, [6, 6], tp=t), gate, 2, load_gu)
    assert torch.equal(torch.cat([gu[0][:3], gu[1][:3]]), gate)
    assert torch.equal(torch.cat([gu[0][3:], gu[1][3:]]), up)
    rows = _shards(lambda t: RowParallelLinear(6, 4, tp=t), down, 2,
                   lambda layer: layer.weight.weight_loader(layer.weight, down))
    assert torch.equal(torch.cat(rows, dim=1), down)


def test_vocab_shards_pad_an_uneven_vocabulary() -> None:
    full = torch.randn(5, 3)
    shards = _shards(lambda t: VocabParallelEmbedding(5, 3, tp=t), full, 2,
                     lambda layer: layer.weight.weight_loader(layer.weight, full))
    assert torch.equal(torch.cat(shards)[:5], full)
    assert torch.equal(shards[1][2], torch.zeros(3))  # the padding row


def test_stage_loads_only_its_tensors(tiny_model_dir) -> None:
    from worker.config import ModelConfig

    cfg = ModelConfig.from_hf_dir(tiny_model_dir("llama-kv1"))  # 4 layers, tied embeddings
    with torch.device("meta"):
        first = LlamaForCausalLM(cfg, stage=StageInfo(rank=0, size=2, start=0, end=1))
        last = LlamaForCausalLM(cfg, stage=StageInfo(rank=1, size=2, start=1, end=4))
    assert len(first.attention_layers()) == 1 and len(last.attention_layers()) == 3
    assert first.checkpoint_target("model.layers.0.mlp.up_proj.weight") is not None
    assert first.checkpoint_target("model.layers.1.mlp.up_proj.weight") is None
    assert first.checkpoint_target("model.norm.weight") is None
    assert first.checkpoint_target("model.embed_tokens.weight") == "model.embed_tokens.weight"
    # The last stage has no embedding; with tied weights the embedding is its LM head.
    assert last.checkpoint_target("model.embed_tokens.weight") == "lm_head.weight"
    assert last.checkpoint_target("model.layers.3.self_attn.q_proj.weight") is not None


def test_replica_settings_check_parallel_fields() -> None:
    ReplicaSettings(tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_layers=[1, 3])
    with pytest.raises(ValueError, match="one layer count per stage"):
        ReplicaSettings(pipeline_parallel_size=2, pipeline_layers=[4])
    with pytest.raises(ValueError, match="one entry per stage"):
        ReplicaSettings(pipeline_parallel_size=2, stage_resources=[{"a": 1}])
    with pytest.raises(ValueError, match=">= 1"):
        ReplicaSettings(tensor_parallel_size=0)
