"""CPU binding of the skinny-matmul kernels in kernels/csrc/skinny_linear.c.

Decode steps multiply a few activation rows by every weight of the model, so they are bound by
streaming the weights. torch streams bf16 weights at about a third of memory bandwidth when x
has one row (no AMX on this class of CPU), its int8 kernel falls off at larger batches, and its
int4 kernel needs its own packing. These kernels read the weights once per call in the layouts
Tandem keeps anyway; `kernels/linear.py` and `kernels/quant_matmul.py` decide when to use them.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu_library import load

_ABI = 2
BF16, INT8, INT4 = 1, 2, 4
INT4_GROUP_MULTIPLE = 32  # the kernel unpacks 32 nibbles at a time within a group
# Quantized matmuls with more activation rows than this are compute bound: they dequantize the
# weight once per call and run torch's blocked GEMM (bench/cpu_kernels.py measures both sides).
QUANT_SKINNY_MAX_ROWS = 8
# bf16 matmuls of up to this many rows go to AMX where the CPU has it (see bf16_max_rows).
AMX_MAX_ROWS = 256
# Without AMX the AVX-512 kernel takes steps of up to this many rows (see bf16_max_rows).
AVX512_MAX_ROWS = 8

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None or lib.skinny_linear_abi() != _ABI:
        return None
    mask = lib.skinny_linear_support()
    if mask & BF16:
        lib.skinny_linear_bf16.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64,
                                           _int]
        lib.skinny_linear_bf16.restype = None
        lib.amx_linear_bf16.argtypes = lib.skinny_linear_bf16.argtypes
        lib.amx_linear_bf16.restype = _i64
        lib.amx_linear_available.argtypes = []
        lib.amx_linear_available.restype = _int
    if mask & INT8:
        lib.skinny_linear_int8.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr,
                                           _i64, _ptr, _int, _int]
        lib.skinny_linear_int8.restype = None
    if mask & INT8:
        lib.dequantize_int8.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _int, _int]
        lib.dequantize_int8.restype = None
    if mask & INT4:
        lib.dequantize_int4.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _int, _int]
        lib.dequantize_int4.restype = None
    if mask & INT4:
        lib.skinny_linear_int4.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr,
                                           _ptr, _i64, _ptr, _int, _int]
        lib.skinny_linear_int4.restype = None
    return lib


def supports(kind: int) -> bool:
    """Whether this machine has the compiled kernel for `kind` (BF16, INT8 or INT4)."""
    lib = _library()
    return lib is not None and bool(lib.skinny_linear_support() & kind)


@functools.cache
def amx_available() -> bool:
    """Whether bf16 matmuls run on AMX tiles here (compiled in, and the kernel
    granted the tile-data permission)."""
    lib = _library()
    return lib is not None and bool(lib.skinny_linear_support() & BF16) \
        and bool(lib.amx_linear_available())


def bf16_max_rows() -> int:
    """Rows up to which linear_bf16 runs instead of torch's bf16 GEMM here.

    With AMX the cost stays flat up to 16 rows (a model's matmuls: 19 ms at 16 rows against
    torch's 24-35 ms). From 65 rows on, a register-blocked tile loop reuses weights and packed
    rows from cache; at 128-256 rows it measured 1.0-1.5x torch's GEMM, at 512-2048 0.6-1.4x, so
    prefill chunks up to 256 rows come here. Its blocks are scheduled dynamically: when another
    process preempts one OpenMP thread, the other takes over its blocks instead of waiting at a
    barrier. The offline engine beside a process burning 2 ms in every 20: 281-299 tok/s against
    254-262 with torch's statically split GEMM (idle: 295-297 against 269-290).

    Without AMX the AVX-512 kernel takes up to 8 rows, every step the fused decode layer runs
    (kernels/cpu_decode_layer.py: MAX_ROWS). Each row's result is then what it is alone, so a
    speculative verify's LM head scores its rows exactly as plain decodes are scored. On a
    2-vCPU Zen 5 (AVX512-BF16, no AMX) the LM head (49152 x 576, cache cold) took 3.7-4.1 ms at
    1-8 rows against torch's 5.0-5.6 ms, and the kernel stayed ahead up to 32 rows (8.4 against
    9.5 ms). On a Sapphire Rapids Xeon with AMX left unused, the same kernel was compute bound
    past 2-4 rows (bench/cpu_kernels.py); CPUs with AVX512-BF16 and no AMX are AMD's Zen 4/5
    and Intel's Cooper Lake."""
    return AMX_MAX_ROWS if amx_available() else AVX512_MAX_ROWS


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _finish(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.view(*x.shape[:-1], y.shape[1])


def _bias_ptr(bias: torch.Tensor | None, dtype: torch.dtype) -> int | None:
    if bias is None:
        return None
    assert bias.dtype == dtype and bias.is_contiguous(), "bias must match x's dtype"
    return bias.data_ptr()


def _bf16_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               amx_only: bool) -> tuple[torch.Tensor, int]:
    lib = _library()
    x2 = _rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    assert weight.dtype == x.dtype == torch.bfloat16 and weight.is_contiguous()
    y = x2.new_zeros(m, n) if amx_only else x2.new_empty(m, n)
    fn = lib.amx_linear_bf16 if amx_only else lib.skinny_linear_bf16
    done = fn(x2.data_ptr(), m, k, x2.stride(0), weight.data_ptr(), n, _bias_ptr(bias, x.dtype),
              y.data_ptr(), n, torch.get_num_threads())
    return y, int(done) if amx_only else n


def linear_bf16(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 @ weight [N, K] bf16 (contiguous) -> [..., N] bf16, fp32 accumulation."""
    y, _ = _bf16_call(x, weight, bias, amx_only=False)
    return _finish(x, y)


def amx_part_bf16(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The AMX kernel alone, as linear_bf16 calls it first: (y [rows, N], done) where only y's
    first `done` columns are written; done is 0 without AMX or for shapes it leaves to AVX-512."""
    return _bf16_call(x, weight, bias, amx_only=True)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32/bf16) @ (qweight int8 [N, K] * scales [N]).T -> [..., N] in x's dtype."""
    lib = _library()
    x2 = _rows(x)
    m, k = x2.shape
    n = qweight.shape[0]
    assert x.dtype in (torch.float32, torch.bfloat16) and qweight.is_contiguous()
    scales32 = scales.to(torch.float32).contiguous()
    if m > QUANT_SKINNY_MAX_ROWS and k % 16 == 0:
        return torch.nn.functional.linear(x, dequantize_int8(qweight, scales, x.dtype), bias)
    work = torch.empty(m * k, dtype=torch.float32)
    y = x2.new_empty(m, n)
    lib.skinny_linear_int8(x2.data_ptr(), m, k, x2.stride(0), qweight.data_ptr(),
                           scales32.data_ptr(), n, _bias_ptr(bias, x.dtype), y.data_ptr(), n,
                           work.data_ptr(), int(x.dtype == torch.bfloat16),
                           torch.get_num_threads())
    return _finish(x, y)


def int4_scale_min(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and zero points -> [N, G, 2] fp32 (scale, min) with W = q * scale + min."""
    s, z = scales.float(), zeros.float()
    return torch.stack((s, -s * z), dim=-1).contiguous()


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T with W in Tandem's int4 packing (kernels/quant_matmul.py) and
    `int4_scale_min` per group; group_size a multiple of 32."""
    lib = _library()
    x2 = _rows(x)
    m, k = x2.shape
    n = packed.shape[0]
    assert x.dtype in (torch.float32, torch.bfloat16) and packed.is_contiguous()
    assert group_size % INT4_GROUP_MULTIPLE == 0 and k % group_size == 0
    assert scale_min.dtype == torch.float32 and scale_min.shape == (n, k // group_size, 2)
    if m > QUANT_SKINNY_MAX_ROWS:
        w = dequantize_int4(packed, scale_min, group_size, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    work = torch.empty(m * k, dtype=torch.float32)
    y = x2.new_empty(m, n)
    lib.skinny_linear_int4(x2.data_ptr(), m, k, x2.stride(0), packed.data_ptr(),
                           scale_min.data_ptr(), group_size, n, _bias_ptr(bias, x.dtype),
                           y.data_ptr(), n, work.data_ptr(), int(x.dtype == torch.bfloat16),
                           torch.get_num_threads())
    return _finish(x, y)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] int8 * [N] scales -> [N, K] in dtype (fp32 or bf16)."""
    n, k = qweight.shape
    assert k % 16 == 0 and qweight.is_contiguous()
    out = torch.empty(n, k, dtype=dtype)
    scales32 = scales.to(torch.float32).contiguous()
    _library().dequantize_int8(qweight.data_ptr(), scales32.data_ptr(), n, k, out.data_ptr(),
                               int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


def dequantize_int4(packed: torch.Tensor, scale_min: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Tandem's int4 packing with (scale, min) pairs -> [N, K] in dtype (fp32 or bf16)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    assert packed.is_contiguous() and k % group_size == 0 and group_size % INT4_GROUP_MULTIPLE == 0
    out = torch.empty(n, k, dtype=dtype)
    _library().dequantize_int4(packed.data_ptr(), scale_min.data_ptr(), group_size, n, k,
                               out.data_ptr(), int(dtype == torch.bfloat16),
                               torch.get_num_threads())
    return out
