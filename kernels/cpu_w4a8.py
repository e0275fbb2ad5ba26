"""CPU binding of kernels/csrc/w4a8_linear.c: int4 weights against int8 activations.

The weights are Tandem's int4 (groups of 32 along K, W = q * scale + min), or 8-bit codes for
an LM head; x is split into two int8 planes per group of 32 and row inside the call (~15 bits),
and AVX512-VNNI integer dot products do the work at about a third of the int4 kernel's
instructions. `pack` / `pack8` lay weights out for the kernel (blocks of 16 rows, see the C
file); `reference` is the same arithmetic in torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu_library import load
from kernels.quant_matmul import unpack_int4

GROUP = 32  # the only group size: a group is one 32-bit lane's 4 features x 8 dot products
BLOCK = 16  # rows per block: the 16 lanes of a vector
# Steps of up to this many rows run the dot-product kernel; bigger ones (prefill) are compute
# bound and dequantize the weight for torch's GEMM.
MAX_ROWS = 256

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or not lib.w4a8_support():
        return None
    lib.w4a8_workspace_bytes.argtypes = [_i64, _i64]
    lib.w4a8_workspace_bytes.restype = ctypes.c_size_t
    lib.w4a8_linear.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _int, _ptr, _i64, _ptr, _ptr,
                                _i64, _ptr, _int, _int]
    lib.w4a8_linear.restype = None
    lib.w4a8_dequantize.argtypes = [_ptr, _int, _ptr, _i64, _i64, _ptr, _int, _int]
    lib.w4a8_dequantize.restype = None
    return lib


def available() -> bool:
    """Whether this CPU runs the kernel (AVX512-VNNI, and a compiler to build it)."""
    return _library() is not None


def _layout(codes: torch.Tensor, scale_min: torch.Tensor,
            bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = codes.shape
    if k % GROUP or scale_min.shape != (n, k // GROUP, 2):
        raise ValueError(f"the dot-product kernel needs groups of {GROUP} along K (got weight "
                         f"[{n}, {k}] with scales {tuple(scale_min.shape)})")
    nb, ng = -(-n // BLOCK), k // GROUP
    padded = torch.zeros(nb * BLOCK, k, dtype=torch.uint8)
    padded[:n] = codes
    sm = torch.zeros(nb * BLOCK, ng, 2, dtype=torch.float16)
    sm[:n] = scale_min
    if bits == 4:
        # [block, row, group, chunk, half, i] -> [block, group, chunk, row, i], the half in the
        # byte's nibbles: features 8c + i (low) and 8c + 4 + i (high)
        c = padded.view(nb, BLOCK, ng, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
        weights = (c[..., 0, :] | (c[..., 1, :] << 4)).contiguous()
    else:  # [block, row, group, chunk, i] -> [block, group, chunk, row, i]: feature 4c + i
        weights = padded.view(nb, BLOCK, ng, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    return weights, sm.view(nb, BLOCK, ng, 2).permute(0, 2, 3, 1).contiguous()


def pack(packed: torch.Tensor, scale_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tandem's int4 (`packed` uint8 [N, K/2], `scale_min` fp32 [N, K/32, 2]) -> this kernel's
    (weights uint8 [N/16, K/32, 4, 16, 4], scales fp16 [N/16, K/32, 2, 16]), N padded to 16."""
    return _layout(unpack_int4(packed), scale_min, 4)


def quantize8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes over each group of 32's own [min, max] (W = q * scale + min): (codes uint8
    [N, K], scale_min fp32 [N, K/32, 2])."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 255.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 255).to(torch.uint8)
    return q.view(n, k), torch.stack((scale, lo), dim=-1).contiguous()


def pack8(codes: torch.Tensor, scale_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize8`'s result -> this kernel's 8-bit layout (weights [N/16, K/32, 8, 16, 4])."""
    return _layout(codes, scale_min, 8)


def bits_of(weights: torch.Tensor) -> int:
    """4 or 8: the code width of a packed weight (its chunks per group)."""
    return weights.shape[2]


def linear(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, out_features: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32 / bf16) @ W.T -> [..., N] in x's dtype; steps of more than MAX_ROWS rows
    dequantize W and run torch's GEMM."""
    lib = _library()
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    assert x.dtype in (torch.float32, torch.bfloat16) and k == weights.shape[1] * GROUP
    if bias is not None:
        assert bias.dtype == x.dtype and bias.is_contiguous()
    if m > MAX_ROWS:
        return torch.nn.functional.linear(x, dequantize(weights, scales, out_features, x.dtype),
                                          bias)
    work = torch.empty(lib.w4a8_workspace_bytes(m, k), dtype=torch.uint8)
    y = x2.new_empty(m, out_features)
    lib.w4a8_linear(x2.data_ptr(), m, k, x2.stride(0), weights.data_ptr(), bits_of(weights),
                    scales.data_ptr(), out_features, None if bias is None else bias.data_ptr(),
                    y.data_ptr(), out_features, work.data_ptr(), int(x.dtype == torch.bfloat16),
                    torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def dequantize(weights: torch.Tensor, scales: torch.Tensor, out_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in dtype (fp32 or bf16)."""
    k = weights.shape[1] * GROUP
    out = torch.empty(out_features, k, dtype=dtype)
    _library().w4a8_dequantize(weights.data_ptr(), bits_of(weights), scales.data_ptr(),
                               out_features, k, out.data_ptr(), int(dtype == torch.bfloat16),
                               torch.get_num_threads())
    return out


def reference(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """What `linear` computes, in torch (fp32 result), for codes uint8 [N, K] and scale_min
    [N, K/32, 2] (rounded to fp16, as packed): per group of 32, x / s (s = max|x| / 127)
    rounded half away from zero to q1, the remainder times 254 rounded to q2; exact integer
    sums; then scale * s / 254 * (254 q1.q + q2.q) + min * sum(x)."""
    def rnd(t: torch.Tensor) -> torch.Tensor:
        return torch.sign(t) * torch.floor(t.abs() + 0.5)

    x2 = x.reshape(-1, x.shape[-1]).float()
    m, k = x2.shape
    g = x2.view(m, k // GROUP, GROUP)
    amax = g.abs().amax(dim=-1, keepdim=True)
    a = g * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q1 = rnd(a)
    q2 = rnd((a - q1) * 254.0).clamp(-127, 127)
    c = codes.double().view(-1, k // GROUP, GROUP)
    dots = (254 * torch.einsum("mgi,ngi->mng", q1.double(), c)
            + torch.einsum("mgi,ngi->mng", q2.double(), c)).float()  # exact integers
    s, mins = scale_min[..., 0].half().float(), scale_min[..., 1].half().float()
    y = (dots * (s[None] * (amax / 127.0 / 254.0).transpose(1, 2))).sum(-1) \
        + (mins[None] * g.sum(-1)[:, None, :]).sum(-1)
    return y.view(*x.shape[:-1], -1)
