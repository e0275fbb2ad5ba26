"""Weight-only quantized linears that take the place of the float parallel linears.

A quantized linear is built from the float layer it replaces (worker/layers/linear.py) and keeps
that layer's `weight_loader` as its *sharder*: the float loaders only narrow dim 0 (output
features; column-parallel, merged and QKV layers) or dim 1 (input features; row-parallel), so the
same code shards int4 codes [N, K], scales [N, G] and zeros [N, G] of a pre-quantized
checkpoint with exactly the TP semantics of the float weight.

Two ways in:
- `from_float`: quantize a layer whose float weight (this rank's shard) is already loaded.
- `load_part`: receive one checkpoint part (q/k/v, gate/up, or the whole matrix) already in
  the int4 or int8 layout; the layer converts to the kernel layout once every part has arrived,
  so unpacked staging buffers live for one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from kernels import cpu_decode_layer as fused
from kernels import cpu_linear, cpu_w4a8
from kernels.quant_matmul import (
    Int4CpuWeight,
    int4_linear,
    int4_linear_cpu,
    int8_linear,
    pack_int4,
    prepare_int4_for_cpu,
    quantize_int8,
)
from worker.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

# Group sizes torch's CPU int4 kernel accepts; the Triton kernel takes any multiple of 16.
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)

Sharder = Callable[..., None]


class Int4Part(NamedTuple):
    """One checkpoint matrix (not yet sharded) in the engine's int4 convention:
    W[n, k] = (codes[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15, unpacked
    scales: torch.Tensor  # float [N, G]
    zeros: torch.Tensor  # float [N, G] (need not be integers: GGUF Q4_1 mins map to -m/d)
    group_size: int
    in_perm: torch.Tensor | None = None  # act-order: the layer computes x[..., in_perm] @ W.T


class Int8Part(NamedTuple):
    """One checkpoint matrix in per-output-channel int8: W[n, k] = codes[n, k] * scales[n]."""

    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float [N]


def part_ids(base: LinearBase) -> set[object]:
    """The shard ids a checkpoint delivers for this layer (None: one whole matrix)."""
    if isinstance(base, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(base, MergedColumnParallelLinear):
        return set(range(len(base.output_sizes)))
    return {None}


def quantize_int4_minmax(w: torch.Tensor, group_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 over each group's own [min, max] with a fractional zero point, the
    grid of llama.cpp's Q4_1 (w = q * d + m, zero = -m / d). kernels' `quantize_int4` keeps 0 in
    every range and rounds the zero to an integer, which wastes up to half the 16 levels on
    groups of one sign: on SmolLM2 it cost +23% perplexity at group 32, this grid +0.3%.
    Returns (packed uint8 [N, K/2], scales [N, G], zeros [N, G]) in fp32."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = -lo / scales
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(n, k)), scales, zeros


def regroup(t: torch.Tensor, factor: int) -> torch.Tensor:
    """Scales/zeros of groups of size g as groups of size g / factor (each repeated): exact."""
    return t if factor == 1 else t.repeat_interleave(factor, dim=1)


def cpu_group_size(group_size: int, in_features: int) -> int | None:
    """The largest CPU-kernel group size that divides `group_size` (and so `in_features`)."""
    for g in reversed(CPU_INT4_GROUP_SIZES):
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


class QuantLinearBase(nn.Module):
    """What every quantized linear shares: the float layer's shape, bias, TP role and sharder."""

    def __init__(self, base: LinearBase) -> None:
        super().__init__()
        self.tp = base.tp
        self.in_features = base.in_features  # this rank's sizes
        self.out_features = base.out_features
        self.reduce = isinstance(base, RowParallelLinear)
        self.bias = base.bias  # stays float; keeps its own weight_loader
        self.sharder: Sharder = base.weight_loader
        self.shard_ids = part_ids(base)
        self.pending: set[object] = set(self.shard_ids)
        self.dtype = base.weight.dtype if base.weight is not None else torch.get_default_dtype()
        self.device = base.weight.device if base.weight is not None else torch.device("cpu")
        # Drop the float weight now: the sharder only needs the layer's TP facts, not its data.
        base.weight = None

    def _shard(self, local: torch.Tensor, full: torch.Tensor, shard_id: object) -> None:
        if shard_id is None:
            self.sharder(local, full)
        else:
            self.sharder(local, full, shard_id)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's x @ W.T + bias, before any all-reduce."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return self.tp.all_reduce(y) if self.reduce else y

    def fused_spec(self) -> fused.LinearSpec | None:
        """This matmul for the CPU fused decode layer; None where that kernel cannot run it."""
        return None


class Int8Linear(QuantLinearBase):
    """int8 weights, one scale per output channel; `int8_linear` dispatches to torch's CPU
    `_weight_int8pack_mm` or the Triton kernel."""

    def __init__(self, base: LinearBase) -> None:
        super().__init__(base)
        n, k = self.out_features, self.in_features
        self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=self.device))
        self.register_buffer("scales", torch.zeros(n, dtype=self.dtype, device=self.device))

    @classmethod
    def from_float(cls, base: LinearBase) -> Int8Linear:
        w = base.weight.data
        layer = cls(base)
        layer.qweight, scales = quantize_int8(w)
        layer.scales = scales.to(layer.dtype)
        layer.pending.clear()
        return layer

    def load_part(self, part: Int8Part, shard_id: object = None) -> None:
        self._shard(self.qweight, part.codes, shard_id)
        scales = part.scales.to(self.dtype)
        if self.reduce:  # row-parallel: every rank has all output channels, so all scales
            self.scales.copy_(scales)
        else:
            self._shard(self.scales[:, None], scales[:, None], shard_id)
        self.pending.discard(shard_id)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)

    def fused_spec(self) -> fused.LinearSpec | None:
        if self.tp.size != 1 or self.qweight.device.type != "cpu":
            return None
        return fused.LinearSpec(fused.LIN_INT8, self.qweight, self.out_features,
                                self.in_features, scales=self.scales.float().contiguous(),
                                bias=self.bias)


class GroupInt8Linear(QuantLinearBase):
    """8-bit codes over each group of 32 inputs' own [min, max], run by the integer dot-product
    kernel (kernels/cpu_w4a8.py) on CPUs that have it: w4a8's LM head. Quantized at load only,
    tensor-parallel size 1 (the LM head of a w4a8 engine; elsewhere it is an Int8Linear)."""

    @classmethod
    def from_float(cls, base: LinearBase) -> GroupInt8Linear:
        w = base.weight.data
        layer = cls(base)
        weights, scales = cpu_w4a8.pack8(*cpu_w4a8.quantize8(w))
        layer.register_buffer("weights", weights)
        layer.register_buffer("scales", scales)
        layer.pending.clear()
        return layer

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_w4a8.linear(x, self.weights, self.scales, self.out_features, self.bias)


class Int4Linear(QuantLinearBase):
    """int4 weights, group-wise scales and zero points along K.

    On CPU the weight stays in the packed layout with scales and zeros folded into (scale, min)
    pairs for the C kernels (kernels/cpu_linear.py); where those cannot be built, in torch's int4
    kernel layout (`prepare_int4_for_cpu`). On CUDA, in the packed layout the Triton kernel
    reads. Act-order (GPTQ desc_act) checkpoints are
    run by permuting the input features once per call (`in_perm`), which makes every group a
    contiguous run of K again, so the same kernels apply.

    With `int8_activations` (quantization "w4a8") and groups of 32 on a CPU with AVX512-VNNI,
    the weight is kept in the integer dot-product kernel's layout instead
    (kernels/cpu_w4a8.py): x goes in as two int8 planes per group, ~2.5x faster at decode.
    """

    def __init__(self, base: LinearBase, group_size: int, int8_activations: bool = False) -> None:
        super().__init__(base)
        self.group_size = group_size
        self.int8_activations = int8_activations
        self.in_perm: torch.Tensor | None = None
        self._staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, base: LinearBase, group_size: int,
                   int8_activations: bool = False) -> Int4Linear:
        w = base.weight.data
        layer = cls(base, group_size, int8_activations)
        packed, scales, zeros = quantize_int4_minmax(w, group_size)
        layer._set_weight(packed, scales, zeros)
        return layer

    def load_part(self, part: Int4Part, shard_id: object = None) -> None:
        if part.group_size % self.group_size:
            raise ValueError(f"group size {part.group_size} is not a multiple of the layer's "
                             f"{self.group_size}")
        if part.in_perm is not None:
            if self.reduce and self.tp.size > 1:
                raise ValueError("act-order (desc_act) int4 weights cannot be split over the "
                                 f"input features with tp={self.tp.size}; use tp=1 or a "
                                 "checkpoint quantized with desc_act=false")
            if self.in_perm is not None and not torch.equal(self.in_perm, part.in_perm):
                raise ValueError("the merged projections (q/k/v or gate/up) of this checkpoint "
                                 "use different act-order permutations; Tandem needs them equal")
            self.in_perm = part.in_perm
        factor = part.group_size // self.group_size
        if self._staged is None:
            n, k, g = self.out_features, self.in_features, self.in_features // self.group_size
            self._staged = (torch.zeros(n, k, dtype=torch.uint8),
                            torch.zeros(n, g, dtype=torch.float32),
                            torch.zeros(n, g, dtype=torch.float32))
        codes, scales, zeros = self._staged
        self._shard(codes, part.codes, shard_id)
        self._shard(scales, regroup(part.scales.float(), factor), shard_id)
        self._shard(zeros, regroup(part.zeros.float(), factor), shard_id)
        self.pending.discard(shard_id)
        if not self.pending:
            self._staged = None
            self._set_weight(pack_int4(codes), scales, zeros)

    def _set_weight(self, packed: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> None:
        self.pending.clear()
        if self.in_perm is not None:
            self.in_perm = self.in_perm.to(self.device)
        if (self.int8_activations and self.device.type == "cpu" and self.in_perm is None
                and self.group_size == cpu_w4a8.GROUP and cpu_w4a8.available()):
            w4a8 = cpu_w4a8.pack(packed, cpu_linear.int4_scale_min(scales, zeros))
            self.register_buffer("w4a8_weight", w4a8[0])
            self.register_buffer("w4a8_scales", w4a8[1])
        elif self.device.type == "cpu" and self.group_size % cpu_linear.INT4_GROUP_MULTIPLE == 0 \
                and cpu_linear.supports(cpu_linear.INT4):
            self.register_buffer("packed", packed)
            self.register_buffer("scale_min", cpu_linear.int4_scale_min(scales, zeros))
        elif self.device.type == "cpu":
            if self.group_size not in CPU_INT4_GROUP_SIZES:
                raise ValueError(f"int4 group size {self.group_size} has no CPU kernel "
                                 f"(supported: {', '.join(map(str, CPU_INT4_GROUP_SIZES))})")
            cpu = prepare_int4_for_cpu(packed, scales.to(self.dtype), zeros.to(self.dtype),
                                       self.group_size)
            self.register_buffer("packed", cpu.packed)
            self.register_buffer("scales_and_zeros", cpu.scales_and_zeros)
        else:
            self.register_buffer("packed", packed.to(self.device))
            self.register_buffer("scales", scales.to(self.device, self.dtype))
            self.register_buffer("zeros", zeros.to(self.device, self.dtype))

    # -- running -------------------------------------------------------------------------------

    def fused_spec(self) -> fused.LinearSpec | None:
        if self.tp.size != 1 or self.in_perm is not None:
            return None
        if hasattr(self, "w4a8_weight"):
            return fused.LinearSpec(fused.LIN_W4A8, self.w4a8_weight, self.out_features,
                                    self.in_features, scales=self.w4a8_scales,
                                    group=cpu_w4a8.bits_of(self.w4a8_weight), bias=self.bias)
        if not hasattr(self, "scale_min"):
            return None
        return fused.LinearSpec(fused.LIN_INT4, self.packed, self.out_features,
                                self.in_features, scales=self.scale_min, group=self.group_size,
                                bias=self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        if hasattr(self, "w4a8_weight"):
            return cpu_w4a8.linear(x, self.w4a8_weight, self.w4a8_scales, self.out_features,
                                   self.bias)
        if hasattr(self, "scale_min"):
            return cpu_linear.linear_int4(x, self.packed, self.scale_min, self.group_size,
                                          self.bias)
        if self.packed.device.type == "cpu":
            w = Int4CpuWeight(self.packed, self.scales_and_zeros, self.group_size,
                              self.out_features)
            return int4_linear_cpu(x, w, self.bias)
        return int4_linear(x, self.packed, self.scales, self.zeros, self.group_size, self.bias)
