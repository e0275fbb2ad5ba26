"""Linear layers that know their tensor-parallel shard.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies its own slice
out of the full checkpoint tensor, so the checkpoint loader stays a short loop (nano-vllm's
shape). With tp.size == 1 every loader is a plain copy.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_decode_layer as fused
from kernels.linear import linear
from worker.parallel import SINGLE, TPInfo


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised: every value is overwritten by the loader, so random init would be wasted time.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(out_features)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def fused_spec(self) -> fused.LinearSpec | None:
        """This matmul for the CPU fused decode layer; None where that kernel cannot run it."""
        kind = {torch.float32: fused.LIN_F32, torch.bfloat16: fused.LIN_BF16}.get(
            self.weight.dtype)
        if kind is None or self.tp.size != 1 or not self.weight.is_contiguous():
            return None
        return fused.LinearSpec(kind, self.weight.data, self.out_features, self.in_features,
                                bias=None if self.bias is None else self.bias.data)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPInfo = SINGLE) -> None:
        super().__init__(in_features, out_features, bias, tp)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPInfo = SINGLE) -> None:
        if out_features % tp.size:
            raise ValueError(f"output size {out_features} is not divisible by tp={tp.size}")
        super().__init__(in_features, out_features // tp.size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate_proj + up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp: TPInfo = SINGLE) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        size = self.output_sizes[shard_id] // self.tp.size
        shard = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj as one matrix, split by heads.

    With fewer KV heads than ranks, each KV head is replicated on tp.size / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPInfo = SINGLE) -> None:
        if num_heads % tp.size:
            raise ValueError(f"{num_heads} attention heads cannot be split over tp={tp.size}")
        if num_kv_heads >= tp.size and num_kv_heads % tp.size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tp={tp.size}")
        if num_kv_heads < tp.size and tp.size % num_kv_heads:
            raise ValueError(f"tp={tp.size} must be a multiple of the {num_kv_heads} KV heads")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp.rank
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums all-reduced in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPInfo = SINGLE) -> None:
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tp={tp.size}")
        super().__init__(in_features // tp.size, out_features, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0's partial sum
            param.data.copy_(loaded if self.tp.rank == 0 else torch.zeros_like(loaded))
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight, self.bias))
