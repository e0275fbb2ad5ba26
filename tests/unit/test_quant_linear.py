"""Quantized linears against their dequantized references, including tensor-parallel shards."""

from __future__ import annotations

import pytest
import torch

from kernels import quant_matmul as qm
from worker.config import ConfigError, EngineConfig
from worker.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from worker.parallel import TPInfo
from worker.quant.apply import layer_group_size
from worker.quant.linear import (
    Int4Linear,
    Int4Part,
    Int8Linear,
    Int8Part,
    QuantLinearBase,
    quantize_int4_minmax,
)


def dense(layer: QuantLinearBase) -> torch.Tensor:
    """The weight a quantized layer applies, read back through its own kernel in fp32."""
    eye = torch.eye(layer.in_features)
    y = layer.matmul(eye)
    if layer.bias is not None:
        y = y - layer.bias
    return y.t()


def filled(layer: LinearBase, seed: int) -> LinearBase:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


LAYERS = {
    "column": lambda tp: ColumnParallelLinear(64, 48, bias=True, tp=tp),
    "merged": lambda tp: MergedColumnParallelLinear(64, [32, 32], tp=tp),
    "qkv": lambda tp: QKVParallelLinear(64, 16, 4, 2, bias=True, tp=tp),
    "row": lambda tp: RowParallelLinear(128, 32, tp=tp),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_from_float_equals_dequantized(kind: str, dtype: torch.dtype) -> None:
    base = filled(LAYERS[kind](TPInfo()), 1).to(dtype)
    w = base.weight.detach().clone()
    q, s = qm.quantize_int8(w)
    ref = qm.dequantize_int8(q, s)
    layer = Int8Linear.from_float(base)
    x = torch.randn(5, layer.in_features, dtype=dtype)
    expect = torch.nn.functional.linear(x.float(), ref, None if layer.bias is None
                                        else layer.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = (layer(x).float() - expect).abs().max() / expect.abs().max()
    assert err < tol


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_from_float_equals_dequantized(kind: str, dtype: torch.dtype) -> None:
    base = filled(LAYERS[kind](TPInfo()), 2).to(dtype)
    w = base.weight.detach().float().clone()
    packed, s, z = quantize_int4_minmax(w, 32)
    ref = qm.dequantize_int4(packed, s.to(dtype), z.to(dtype), 32)
    layer = Int4Linear.from_float(base, 32)
    x = torch.randn(5, layer.in_features, dtype=dtype)
    expect = torch.nn.functional.linear(x.float(), ref, None if layer.bias is None
                                        else layer.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = (layer(x).float() - expect).abs().max() / expect.abs().max()
    assert err < tol
    # Only the kernel layout is kept on CPU: 0.5 byte per weight plus scales/zeros.
    assert layer.packed.dtype == torch.uint8 and not hasattr(layer, "qweight")


def _split_parts(base: LinearBase, full: torch.Tensor) -> list[tuple[object, torch.Tensor]]:
    """The checkpoint matrices that make up a float layer's full (unsharded) weight."""
    if isinstance(base, QKVParallelLinear):
        q = base.num_heads * base.head_dim * base.tp.size
        kv = (full.shape[0] - q) // 2
        return list(zip("qkv", full.split([q, kv, kv])))
    if isinstance(base, MergedColumnParallelLinear):
        return list(enumerate(full.split(base.output_sizes)))
    return [(None, full)]


def _load(layer: LinearBase, tensor: torch.Tensor, shard_id: object) -> None:
    if shard_id is None:
        layer.weight.weight_loader(layer.weight, tensor)
    else:
        layer.weight.weight_loader(layer.weight, tensor, shard_id)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("tp_size", [2, 4])
def test_prequantized_parts_shard_like_float_weights(kind: str, tp_size: int) -> None:
    """Each rank's int4/int8 layer, loaded part by part, holds exactly the dequantized weight
    the float layer of the same rank holds after loading the dequantized checkpoint (so TP
    semantics, including KV-head replication when tp > kv heads, carry over)."""
    full_n = {"column": 48, "merged": 64, "qkv": (4 + 2 * 2) * 16, "row": 32}[kind]
    full_k = 128 if kind == "row" else 64
    g = torch.Generator().manual_seed(tp_size)
    for rank in range(tp_size):
        tp = TPInfo(rank=rank, size=tp_size)
        float_layer = LAYERS[kind](tp)
        q4_layer = Int4Linear(LAYERS[kind](tp), 32)
        q8_layer = Int8Linear(LAYERS[kind](tp))
        for layer in (q4_layer, q8_layer):
            if layer.bias is not None:
                layer.bias.data.zero_()  # biases load as floats; only weights are compared
        g.manual_seed(7)
        codes = torch.randint(0, 16, (full_n, full_k), generator=g, dtype=torch.uint8)
        scales = torch.rand(full_n, full_k // 32, generator=g) + 0.5
        zeros = torch.randint(0, 16, (full_n, full_k // 32), generator=g).float()
        c8 = torch.randint(-127, 128, (full_n, full_k), generator=g, dtype=torch.int8)
        s8 = torch.rand(full_n, generator=g) + 0.5
        deq4 = (codes.float() - zeros.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
        deq8 = c8.float() * s8[:, None]
        for deq in (deq4, deq8):
            parts4 = _split_parts(float_layer, deq)
            for shard_id, t in parts4:
                _load(float_layer, t, shard_id)
            expect = float_layer.weight.detach().clone()
            if deq is deq4:
                rows = [p[1].shape[0] for p in parts4]
                for (shard_id, _), c, s, z in zip(parts4, codes.split(rows), scales.split(rows),
                                                  zeros.split(rows)):
                    q4_layer.load_part(Int4Part(c, s, z, 32), shard_id)
                torch.testing.assert_close(dense(q4_layer), expect, rtol=1e-5, atol=1e-4)
            else:
                rows = [p[1].shape[0] for p in parts4]
                for (shard_id, _), c, s in zip(parts4, c8.split(rows), s8.split(rows)):
                    q8_layer.load_part(Int8Part(c, s), shard_id)
                torch.testing.assert_close(dense(q8_layer), expect, rtol=1e-5, atol=1e-4)


def test_minmax_int4_error_is_half_a_step_and_uses_the_group_range() -> None:
    w = torch.randn(16, 128) + 3.0  # one-signed groups: the range need not include 0
    packed, s, z = quantize_int4_minmax(w, 32)
    deq = qm.dequantize_int4(packed, s, z, 32)
    step = s.repeat_interleave(32, 1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()
    # The step is the group's own range / 15, not max(|w|) / 15 as with 0 forced into range.
    g = w.view(16, 4, 32)
    torch.testing.assert_close(s, (g.amax(-1) - g.amin(-1)) / 15)


def test_group_size_falls_back_where_it_does_not_divide() -> None:
    cpu = torch.device("cpu")
    assert layer_group_size(128, 1536, cpu) == 128
    assert layer_group_size(128, 576, cpu) == 64  # SmolLM2's hidden size
    assert layer_group_size(256, 96, cpu) == 32
    with pytest.raises(ConfigError, match="no int4 group size"):
        layer_group_size(64, 40, cpu)


def test_config_names_bad_values() -> None:
    with pytest.raises(ConfigError, match="quant_group_size must be one of 32, 64, 128, 256"):
        EngineConfig(model="m", quantization="int4", quant_group_size=48)
    with pytest.raises(Exception, match="int3"):
        EngineConfig(model="m", quantization="int3")  # type: ignore[arg-type]
