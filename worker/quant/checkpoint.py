"""GPTQ and AWQ 4-bit safetensors checkpoints, read into the engine's int4 convention.

Layouts, as AutoGPTQ / GPTQModel (format "gptq", i.e. v1) and AutoAWQ (GEMM kernels) write them,
for a linear with K input and N output features, G = K / group_size groups, 8 nibbles per int32
with nibble i at bits 4i..4i+3:

GPTQ  qweight int32 [K/8, N]  packed along K: nibble i of qweight[r, n] is code[k = 8r + i, n]
      qzeros  int32 [G, N/8]  packed along N: nibble i of qzeros[g, c] is zero[g, n = 8c + i]
      scales  fp16  [G, N]
      g_idx   int32 [K]       group of input feature k (act-order makes it a permutation of
                              k // group_size)
      W[n, k] = scales[g_idx[k], n] * (code[k, n] - (zero[g_idx[k], n] + 1))
      The "+ 1" is v1's historical offset (stored zero = zero - 1); GPTQModel's
      checkpoint_format "gptq_v2" stores the zero itself.
AWQ   qweight int32 [K, N/8]  packed along N in the interleaved order of AWQ's GEMM kernel:
      nibble i of qweight[k, c] is code[k, n = 8c + AWQ_ORDER[i]], AWQ_ORDER = 0 2 4 6 1 3 5 7
      qzeros  int32 [G, N/8]  same packing as qweight
      scales  fp16  [G, N]
      W[n, k] = scales[k // group_size, n] * (code[k, n] - zero[k // group_size, n])

Act-order: the engine's kernels need each group to be one contiguous run of K. Sorting the input
features by g_idx (a stable argsort, `in_perm`) makes it so: the layer computes
x[..., in_perm] @ W[:, in_perm].T, which is the same product. The permutation is per layer and
the merged projections (q/k/v, gate/up) must share it, which GPTQ guarantees since they quantize
against the same inputs. (The alternative, a per-column group index inside the kernel, would cost
a gather per weight element on every call.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from worker.config import ConfigError
from worker.quant.linear import Int4Part

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointQuant(NamedTuple):
    """What a checkpoint's quantization_config says, reduced to what loading needs."""

    method: Literal["gptq", "awq"]
    bits: int
    group_size: int  # -1: one group over all input features
    desc_act: bool
    sym: bool
    zero_offset: int  # added to stored zeros: 1 for GPTQ v1, 0 otherwise

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        order = ", act-order" if self.desc_act else ""
        return f"{self.method.upper()} int{self.bits} ({group}{order})"


def read_checkpoint_quant(model_dir: Path) -> CheckpointQuant | None:
    """The quantization of a Hugging Face folder, from config.json's quantization_config or
    AutoGPTQ's quantize_config.json; None for a float checkpoint."""
    cfg: dict = {}
    config_file = model_dir / "config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text()).get("quantization_config") or {}
    legacy = model_dir / "quantize_config.json"
    if not cfg and legacy.is_file():
        cfg = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    if not cfg:
        return None
    method = str(cfg.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise ConfigError(f"{model_dir}: quantization method {method!r} is not supported; "
                          "Tandem reads 4-bit GPTQ and AWQ checkpoints")
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    if bits != 4:
        raise ConfigError(f"{model_dir}: {method.upper()} with bits={bits} is not supported "
                          "(supported: bits=4)")
    group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise ConfigError(f"{model_dir}: {method.upper()} group_size={group_size} is not "
                          "supported (supported: -1 or a multiple of 32, e.g. 32, 64, 128)")
    if method == "awq":
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"{model_dir}: AWQ version {version!r} is not supported "
                              "(supported: gemm)")
        if not cfg.get("zero_point", True):
            raise ConfigError(f"{model_dir}: AWQ without zero points is not supported")
        return CheckpointQuant("awq", bits, group_size, False, False, 0)
    fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{model_dir}: GPTQ checkpoint_format {fmt!r} is not supported "
                          "(supported: gptq, gptq_v2)")
    return CheckpointQuant("gptq", bits, group_size, bool(cfg.get("desc_act", False)),
                           bool(cfg.get("sym", True)), 1 if fmt == "gptq" else 0)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., C, 8]: nibble i of each word at index i."""
    return ((packed.to(torch.int32)[..., None] >> _SHIFTS) & 0xF).to(torch.uint8)


def _group_size(spec: CheckpointQuant, in_features: int) -> int:
    return in_features if spec.group_size == -1 else spec.group_size


def gptq_part(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, spec: CheckpointQuant) -> Int4Part:
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [K, N]
    k, n = codes.shape
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1)[:, :n].float() + spec.zero_offset
    gs = _group_size(spec, k)
    perm = None
    if g_idx is not None:
        g_idx = g_idx.long()
        if not torch.equal(g_idx, torch.arange(k) // gs):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k) // gs):
                raise ConfigError("GPTQ g_idx does not give every group exactly group_size "
                                  f"({gs}) input features; Tandem cannot run this layout")
            codes = codes[perm]
    return Int4Part(codes.t().contiguous(), scales.t().float().contiguous(),
                    zeros.t().contiguous(), gs, perm)


def awq_part(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             spec: CheckpointQuant) -> Int4Part:
    # Position i of every 8-column group holds column AWQ_ORDER[i]; undo it with the inverse.
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    codes = _nibbles(qweight)[..., inverse].reshape(qweight.shape[0], -1)  # [K, N]
    zeros = _nibbles(qzeros)[..., inverse].reshape(qzeros.shape[0], -1).float()  # [G, N]
    gs = _group_size(spec, codes.shape[0])
    return Int4Part(codes.t().contiguous(), scales.t().float().contiguous(),
                    zeros.t().contiguous(), gs)


def to_int4_part(tensors: dict[str, torch.Tensor], spec: CheckpointQuant) -> Int4Part:
    if spec.method == "awq":
        return awq_part(tensors["qweight"], tensors["qzeros"], tensors["scales"], spec)
    return gptq_part(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                     tensors.get("g_idx"), spec)


def is_complete(tensors: dict[str, torch.Tensor], spec: CheckpointQuant) -> bool:
    need = {"qweight", "qzeros", "scales"}
    if spec.method == "gptq" and spec.desc_act:
        need.add("g_idx")
    return need <= tensors.keys()
