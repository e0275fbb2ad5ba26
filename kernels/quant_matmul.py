"""Weight-only quantized linear layers: y = x @ W.T + bias with W stored as int8 or int4.

int8, per output channel (symmetric):
    W[n, k] ~= q[n, k] * scale[n],      q: int8 [N, K] in [-127, 127], scale: [N]
int4, group-wise along K with zero points (asymmetric):
    W[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g],   g = k // group_size, q in [0, 15]
  Packed layout: qweight_packed uint8 [N, K // 2]; byte j of row n holds k = 2j in its low
  nibble and k = 2j + 1 in its high nibble (so a row is K/2 contiguous bytes, read along K like
  the activations). scales and zeros: [N, K // group_size], in the weight's float dtype; zeros are
  integers from `quantize_int4` but any float works (AWQ/GPTQ-style zero points convert directly).

Dispatch: Triton kernels on CUDA (dequantization fused into the GEMM tile loop). On CPU, int8
runs the weight-streaming kernel of kernels/cpu_linear.py (same layout), or torch's
`aten._weight_int8pack_mm` where that kernel cannot be built. int4 on CPU runs the same C kernels
on this packing (`cpu_linear.linear_int4`, scales and zeros folded into `int4_scale_min` at load
time); without them, torch's CPU int4 kernel, which wants its own tiled packing and the formula
(q - 8) * scale + bias (`prepare_int4_for_cpu` at load time, then `int4_linear_cpu`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import cpu_linear
from kernels._dispatch import use_triton

_CPU_INT8_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- quantizers (load time) -------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max|W[n]| / 127 (absmax; LLM.int8-style
    vector-wise quantization without the outlier split). Returns (q int8 [N, K], scales [N])."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group of `group_size` along K: scale = (max - min) / 15,
    zero = round(-min / scale), so min and max map to 0 and 15 up to rounding.
    Returns (qweight_packed uint8 [N, K/2], scales [N, K/g], zeros [N, K/g])."""
    n, k = w.shape
    assert k % group_size == 0 and group_size % 2 == 0, "K must be a multiple of group_size"
    g = w.float().view(n, k // group_size, group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)  # keep 0 representable: zero-padded rows stay exact
    hi = g.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(n, k)), scales.to(w.dtype), zeros.to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> uint8 [N, K/2], k = 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K], the inverse of `pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


# ---- references: dequantize, then F.linear ---------------------------------------------------

def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(
    qweight_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    q = unpack_int4(qweight_packed).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales).to(x.dtype), bias)


def int4_linear_reference(
    x: torch.Tensor, qweight_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_int4(qweight_packed, scales, zeros, group_size).to(x.dtype)
    return F.linear(x, w, bias)


# ---- CPU fast paths ---------------------------------------------------------------------------

def _int8_linear_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # aten._weight_int8pack_mm computes (x @ q.T) * scales on 2-D x, scales in x's dtype.
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], qweight.shape[0])


class Int4CpuWeight(NamedTuple):
    """An int4 weight in the layout of torch's CPU kernel (`aten._weight_int4pack_mm_for_cpu`)."""

    packed: torch.Tensor  # uint8 [N, K/2], torch's tiled packing
    scales_and_zeros: torch.Tensor  # [K/g, N, 2]: scale, bias with W = (q - 8) * scale + bias
    group_size: int
    out_features: int


def prepare_int4_for_cpu(
    qweight_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> Int4CpuWeight:
    """Convert our layout once at load time. torch's CPU kernel dequantizes as
    (q - 8) * scale + bias; ours is (q - zero) * scale = (q - 8) * scale + (8 - zero) * scale,
    so bias = (8 - zero) * scale."""
    n = qweight_packed.shape[0]
    # torch's packing wants N % 16 == 0: pad with rows of scale 0 and bias 0 (outputs 0), and
    # `int4_linear_cpu` slices them off.
    pad = -n % 16
    q = F.pad(unpack_int4(qweight_packed).to(torch.int32), (0, 0, 0, pad)).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    s = F.pad(scales.float(), (0, 0, 0, pad))
    bias = (8.0 - F.pad(zeros.float(), (0, 0, 0, pad), value=8.0)) * s
    sz = torch.stack((s.t(), bias.t()), dim=-1).to(scales.dtype).contiguous()
    return Int4CpuWeight(packed, sz, group_size, n)


def int4_linear_cpu(
    x: torch.Tensor, weight: Int4CpuWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2, weight.packed, weight.group_size, weight.scales_and_zeros.to(x.dtype))
    if y.shape[1] != weight.out_features:
        y = y[:, :weight.out_features]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.out_features)


# ---- ops --------------------------------------------------------------------------------------

def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_triton(x):
        from kernels.triton_quant_matmul import int8_linear_triton

        return int8_linear_triton(x, qweight, scales, bias)
    if x.device.type == "cpu" and qweight.is_contiguous():
        if x.dtype in (torch.float32, torch.bfloat16) and cpu_linear.supports(cpu_linear.INT8):
            return cpu_linear.linear_int8(x, qweight, scales, bias)
        if x.dtype in _CPU_INT8_DTYPES:
            return _int8_linear_cpu(x, qweight, scales, bias)
    return int8_linear_reference(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor, qweight_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """On CPU this is the reference (it dequantizes the whole weight per call): layers that run
    on CPU should hold `prepare_int4_for_cpu(...)` and call `int4_linear_cpu`."""
    if use_triton(x):
        from kernels.triton_quant_matmul import int4_linear_triton

        return int4_linear_triton(x, qweight_packed, scales, zeros, group_size, bias)
    return int4_linear_reference(x, qweight_packed, scales, zeros, group_size, bias)
