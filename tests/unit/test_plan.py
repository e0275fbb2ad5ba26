"""The capacity planner's numbers, checked by hand for Llama-2-70B."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.plan import GiB, PlanInput, count_params, model_shape, plan


def test_llama2_70b_shape_and_kv_per_token() -> None:
    name, m = model_shape("llama-2-70b")
    # 80 x (attn 8192*128*(2*64 + 2*8) + mlp 3*8192*28672 + norms 2*8192) + 2*32000*8192 + 8192
    per_layer = 8192 * 128 * (128 + 16) + 3 * 8192 * 28672 + 2 * 8192
    assert count_params(m) == 80 * per_layer + 2 * 32000 * 8192 + 8192
    assert 68.9e9 < count_params(m) < 69.1e9  # ~69 B
    p = plan(name, m, PlanInput(tp=1))
    assert p.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680


@pytest.mark.parametrize(("tp", "pp", "kv_heads_per_rank", "layers_per_rank"),
                         [(1, 1, 8, 80), (4, 1, 2, 80), (8, 1, 1, 80), (16, 1, 1, 80),
                          (2, 4, 4, 20), (8, 3, 1, 27)])
def test_kv_split_over_tp_and_pp(tp: int, pp: int, kv_heads_per_rank: int,
                                 layers_per_rank: int) -> None:
    """KV heads split over TP until each rank has one (then replicated: tp=16 still stores one
    head per rank); layers split over PP, the largest stage counts."""
    p = plan(*model_shape("llama-2-70b"), PlanInput(tp=tp, pp=pp))
    assert p.kv_bytes_per_token_per_rank == 2 * layers_per_rank * kv_heads_per_rank * 128 * 2


def test_weights_per_rank_by_hand() -> None:
    name, m = model_shape("llama-2-70b")
    p = plan(name, m, PlanInput(tp=4, pp=1, dtype="float16"))
    # Per layer per rank: q 2048 + k,v 2*256 rows of 8192; o 8192 x 2048; gate_up 14336 x 8192;
    # down 8192 x 7168; two norms of 8192 replicated. Embedding and head: 8000 x 8192 each.
    layer = (2048 + 512) * 8192 + 8192 * 2048 + 14336 * 8192 + 8192 * 7168 + 2 * 8192
    assert p.weight_bytes_per_rank == 2 * (80 * layer + 2 * 8000 * 8192)
    q = plan(name, m, PlanInput(tp=4, quantization="int4", group_size=128))
    linears = (2048 + 512) * 8192 + 8192 * 2048 + 14336 * 8192 + 8192 * 7168
    # int4: half a byte per weight plus a 2-byte scale and 2-byte zero per 128 weights.
    expect = 80 * (linears * (0.5 + 4 / 128) + 2 * 8192 * 2) + 2 * 8000 * 8192 * 2
    assert q.weight_bytes_per_rank == int(expect)


def test_fit_capacity_and_cost() -> None:
    name, m = model_shape("llama-2-70b")
    alone = plan(name, m, PlanInput(tp=1, gpu="h100-80gb"))
    assert not alone.fits and alone.kv_tokens_capacity == 0  # 138 GB of bf16 weights
    p = plan(name, m, PlanInput(tp=4, max_model_len=4096, max_num_seqs=64, gpu="h100-80gb",
                                price_per_hour=2.0, tokens_per_s=1000))
    assert p.fits
    assert p.kv_tokens_capacity == p.kv_budget_bytes_per_rank // (2 * 80 * 2 * 128 * 2)
    assert p.max_seqs_at_max_len == p.kv_tokens_capacity // 4096
    # 4 GPUs x $2/h over 3.6 M tokens per hour
    assert p.cost_per_million_tokens == pytest.approx(8.0 / 3.6)
    assert p.usable_bytes_per_rank == int(79.6 * GiB * 0.9)


def test_cli_plan_table_json_and_errors(capsys, tiny_model_dir) -> None:
    assert main(["plan", "--model", "llama-3-8b", "--tp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    assert main(["plan", "--model", str(tiny_model_dir("llama-gqa"))]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-2-70b", "--tp", "3"]) == 2
    assert "cannot be split over tp=3" in capsys.readouterr().err
