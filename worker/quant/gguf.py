"""GGUF quantized blocks run as the engine's int4 / int8 weights instead of being dequantized.

ggml blocks of 32 weights along a row (the input features), as llama.cpp lays them out:
  Q4_0  18 bytes: d fp16, qs[16]; weight j = qs[j] & 0xF, weight j + 16 = qs[j] >> 4
        w = (q - 8) * d           -> int4 group 32, scale d, zero 8: exact
  Q4_1  20 bytes: d fp16, m fp16, qs[16] as Q4_0
        w = q * d + m             -> int4 group 32, scale d, zero -m / d: exact in real
        arithmetic; the kernels see (8 - zero) * scale = 8d + m, rounded once to the
        activation dtype (fp32: ~1 ulp; bf16: the bias carries bf16's 8 mantissa bits)
  Q8_0  34 bytes: d fp16, qs int8[32]; w = q * d
        -> no group-wise int8 kernel here, so the row is dequantized exactly and re-quantized to
        per-channel int8: one extra rounding (not exact; up to half a per-channel step)
Other types (F32/F16/BF16, K-quants, Q5_*) are not mapped: those layers load their dequantized
float weights from the converted folder as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from worker.config import ConfigError
from worker.gguf import MARKER_FILE, PackedTensor
from worker.quant.linear import Int4Part, Int8Part

INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1})
INT8_TYPES = frozenset({Q.Q8_0})
_BLOCK = 32


def source_gguf(model_dir: Path) -> Path:
    """The .gguf a converted folder was made from (recorded in its conversion marker)."""
    marker = model_dir / MARKER_FILE
    try:
        source = Path(json.loads(marker.read_text())["source"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--quantization gguf needs a model given as a .gguf file (or the "
                          f"default model); {model_dir} was not converted from one") from exc
    if not source.is_file():
        raise ConfigError(f"--quantization gguf: {model_dir} was converted from {source}, which "
                          "no longer exists; pass the .gguf file again")
    return source


def _blocks(t: PackedTensor, block_bytes: int) -> torch.Tensor:
    rows, cols = t.shape
    # A writable copy of one tensor: torch refuses read-only memory maps without a warning.
    data = np.array(t.data, copy=True).reshape(rows, cols // _BLOCK, block_bytes)
    return torch.from_numpy(data)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block -> the fp16 value they hold (little endian), as float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [rows, blocks, 16] -> codes [rows, blocks * 32]: low nibbles first, then high."""
    codes = torch.cat((qs & 0xF, qs >> 4), dim=-1)
    return codes.reshape(qs.shape[0], -1)


def int4_part(t: PackedTensor) -> Int4Part:
    if t.quant_type == Q.Q4_0:
        b = _blocks(t, 18)
        scales = _f16(b[..., 0:2])
        return Int4Part(_nibbles(b[..., 2:]), scales, torch.full_like(scales, 8.0), _BLOCK)
    if t.quant_type == Q.Q4_1:
        b = _blocks(t, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        # A constant block has d = 0 and every weight equal to m; llama.cpp's quantizer then
        # stores q = 0. (q - z) * s cannot carry an offset with s = 0, so such a block gets
        # s = |m|, z = -sign(m), which gives (0 - z) * s = m exactly.
        tiny = d == 0
        d = torch.where(tiny, torch.where(m == 0, 1.0, m.abs()), d)
        zeros = torch.where(tiny, -torch.sign(m), -m / d)
        return Int4Part(_nibbles(b[..., 4:]), d, zeros, _BLOCK)
    raise ValueError(f"{t.quant_type.name} is not an int4 GGUF type")


def int8_part(t: PackedTensor) -> Int8Part:
    if t.quant_type != Q.Q8_0:
        raise ValueError(f"{t.quant_type.name} is not an int8 GGUF type")
    b = _blocks(t, 34)
    d = _f16(b[..., 0:2])
    q = b[..., 2:].contiguous().view(torch.int8).float()
    w = (q * d[..., None]).reshape(t.shape[0], -1)  # exact in fp32: 8-bit x 11-bit products
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Part(codes, scales)
