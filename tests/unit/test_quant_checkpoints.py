"""GPTQ (with and without act-order g_idx, v1 and v2 zero formats) and AWQ checkpoints: the
engine's logits equal those of the same model with the reference-dequantized float weights.

The packing here is written from the tools' layouts (AutoGPTQ's / GPTQModel's pack(), AutoAWQ's
WQLinear_GEMM.from_linear), independently of worker/quant/checkpoint.py's unpacking.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from protos.messages import StepPlan
from worker.config import ConfigError, EngineConfig
from worker.engine import Engine
from worker.quant.checkpoint import read_checkpoint_quant

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GS = 32


def to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((words & 0xFFFFFFFF).astype(np.uint32).view(np.int32))


def pack_rows(vals: np.ndarray) -> np.ndarray:
    """[R, C] nibbles -> int64 [R/8, C]: row 8r + i at bits 4i (GPTQ qweight, along K)."""
    r, c = vals.shape
    out = np.zeros((r // 8, c), dtype=np.int64)
    for i in range(8):
        out |= vals[i::8].astype(np.int64) << (4 * i)
    return out


def pack_cols(vals: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """[R, C] nibbles -> int64 [R, C/8]: column 8c + order[i] at bits 4i."""
    r, c = vals.shape
    out = np.zeros((r, c // 8), dtype=np.int64)
    for i in range(8):
        out |= vals[:, order[i]::8].astype(np.int64) << (4 * i)
    return out


def quantize(w: np.ndarray, g_idx: np.ndarray, groups: int):
    """Min/max 4-bit per (group, output) as GPTQ/AWQ store it: codes [K, N], zeros [G, N]
    integers in 1..15, fp16 scales [G, N]; returns also the dequantized weight [N, K]."""
    wt = w.T  # [K, N]
    scales = np.zeros((groups, wt.shape[1]), np.float32)
    zeros = np.zeros((groups, wt.shape[1]), np.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        scales[g] = np.maximum((hi - lo) / 14, 1e-4)
        zeros[g] = np.clip(np.round(-lo / scales[g]), 1, 15)
    scales = scales.astype(np.float16).astype(np.float32)
    codes = np.clip(np.round(wt / scales[g_idx] + zeros[g_idx]), 0, 15).astype(np.int64)
    deq = (codes - zeros[g_idx]) * scales[g_idx]
    return codes, zeros, scales, deq.T


def write_quantized(src: Path, dst: Path, method: str, act_order: bool = False,
                    fmt: str = "gptq") -> Path:
    """`dst`: `src` quantized in `method`'s layout; `dst`-ref: the dequantized float model."""
    ref = dst.with_name(dst.name + "-ref")
    for d in (dst, ref):
        shutil.copytree(src, d)
        (d / "model.safetensors").unlink()
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    quant, floats = {}, {}
    perms: dict[tuple[str, int], np.ndarray] = {}
    for name, t in tensors.items():
        mod = name.rsplit(".", 2)
        if len(mod) < 3 or mod[1] not in PROJ:
            quant[name] = floats[name] = t
            continue
        w = t.float().numpy()
        k = w.shape[1]
        groups = k // GS
        g_idx = np.arange(k) // GS
        if act_order:  # one permutation per input: q/k/v share one, gate/up share one
            key = (mod[0], k)
            if key not in perms:
                perms[key] = rng.permutation(k)
            g_idx = np.empty(k, np.int64)
            g_idx[perms[key]] = np.arange(k) // GS  # GPTQ: group i // gs in quantization order
        codes, zeros, scales, deq = quantize(w, g_idx, groups)
        base = name.removesuffix(".weight")
        floats[name] = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))
        if method == "gptq":
            stored = zeros - 1 if fmt == "gptq" else zeros
            quant[f"{base}.qweight"] = to_int32(pack_rows(codes))
            quant[f"{base}.qzeros"] = to_int32(pack_cols(stored))
            quant[f"{base}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            quant[f"{base}.qweight"] = to_int32(pack_cols(codes, order))
            quant[f"{base}.qzeros"] = to_int32(pack_cols(zeros, order))
        quant[f"{base}.scales"] = torch.from_numpy(scales).half()
    save_file(quant, dst / "model.safetensors")
    save_file(floats, ref / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    if method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GS,
                                      "desc_act": act_order, "sym": False,
                                      "checkpoint_format": fmt}
    else:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GS,
                                      "version": "gemm", "zero_point": True}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def logits(model_dir: Path, dtype: str = "float32") -> tuple[torch.Tensor, Engine]:
    engine = Engine(EngineConfig(model=str(model_dir), dtype=dtype, kv_cache_bytes=1 << 22))
    n = 24
    plan = StepPlan(0, [(7 * i + 3) % 256 for i in range(n)], list(range(n)), list(range(n)),
                    [0, n], [n], [[0, 1]], list(range(n)))
    return engine.runner.execute(plan), engine


@pytest.mark.parametrize(("method", "act_order", "fmt"), [
    ("gptq", False, "gptq"), ("gptq", True, "gptq"), ("gptq", False, "gptq_v2"),
    ("awq", False, "gemm")])
def test_quantized_checkpoint_matches_dequantized_reference(
        tiny_model_dir, tmp_path: Path, method: str, act_order: bool, fmt: str) -> None:
    src = tiny_model_dir("llama-mha")  # untied: every projection and the LM head are present
    dst = write_quantized(src, tmp_path / f"{method}-{act_order}-{fmt}", method, act_order, fmt)
    got, engine = logits(dst)
    want, ref_engine = logits(dst.with_name(dst.name + "-ref"))
    # Same products in a different order (int4 kernel vs dense GEMM): fp32 rounding only.
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, err
    assert "int4" in engine.runner.weight_format
    assert engine.runner.weight_bytes() < 0.6 * ref_engine.runner.weight_bytes()
    if act_order:
        layer = engine.runner.model.model.layers[0].self_attn.qkv_proj
        assert layer.in_perm is not None


def test_bad_quantization_configs_name_the_value(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama-gqa")
    cases = [({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
             ({"quant_method": "gptq", "bits": 4, "group_size": 48}, "group_size=48"),
             ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'"),
             ({"quant_method": "bitsandbytes"}, "'bitsandbytes'")]
    for i, (qc, text) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(ConfigError, match=text):
            read_checkpoint_quant(d)


def test_quantizing_a_quantized_checkpoint_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    dst = write_quantized(tiny_model_dir("llama-mha"), tmp_path / "g", "gptq")
    with pytest.raises(ConfigError, match="already quantized"):
        Engine(EngineConfig(model=str(dst), dtype="float32", kv_cache_bytes=1 << 22,
                            quantization="int8"))
