"""A tiny model quantized at load (int8, int4) runs end to end through the Engine.

Two checks per mode: (1) exact arithmetic — the logits equal those of the float engine loaded
with the dequantized weights (quantized once by the kernels' own quantizers, which quantize each
row independently, so quantizing q/k/v apart equals quantizing the merged matrix); (2) quality —
the logits stay within a stated distance of the fp32 model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import quant_matmul as qm
from protos.messages import Request, StepPlan
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine
from worker.quant.linear import quantize_int4_minmax

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 32
# max|Δlogit| / max|logit| against fp32, measured on this random model (initializer 0.1, so
# weights are far less regular than a trained model's): int8 0.02, int4 (group 32) 0.30.
QUALITY = {"int8": 0.05, "int4": 0.45}


def dequantized_copy(src: Path, dst: Path, mode: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name, w in tensors.items():
        if name.rsplit(".", 2)[-2] in PROJ:
            if mode == "int8":
                tensors[name] = qm.dequantize_int8(*qm.quantize_int8(w.float()))
            else:
                tensors[name] = qm.dequantize_int4(*quantize_int4_minmax(w, GROUP), GROUP)
    save_file(tensors, dst / "model.safetensors")
    return dst


def make(folder: Path, mode: str | None, dtype: str = "float32") -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype=dtype, kv_cache_bytes=1 << 22,
                               quantization=mode, quant_group_size=GROUP))


def logits(e: Engine) -> torch.Tensor:
    n = 24
    plan = StepPlan(0, [(11 * i + 5) % 256 for i in range(n)], list(range(n)), list(range(n)),
                    [0, n], [n], [[0, 1]], list(range(n)))
    return e.runner.execute(plan)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_matches_dequantized_and_stays_close(
        tiny_model_dir, tmp_path: Path, mode: str) -> None:
    src = tiny_model_dir("llama-gqa")
    quant, full = make(src, mode), make(src, None)
    ref = make(dequantized_copy(src, tmp_path / mode, mode), None)
    got = logits(quant)
    assert rel(got, logits(ref)) < 1e-4  # same weights, same arithmetic up to rounding
    assert rel(got, logits(full)) < QUALITY[mode]
    # Greedy decoding through the scheduler, batched with prefix caching, agrees with the
    # dequantized reference token for token.
    prompts = {"a": [5, 6, 7, 8, 9], "b": [100, 3, 44]}
    def run(e: Engine) -> dict[str, list[int]]:
        reqs = [Request(request_id=k, prompt_token_ids=v, sampling=greedy(10))
                for k, v in prompts.items()]
        return {k: tokens_of(d) for k, d in run_to_completion(e, reqs).items()}
    assert run(quant) == run(ref)
    # int8: 1 byte per linear weight (plus scales); int4: about half a byte.
    assert quant.runner.weight_bytes() < full.runner.weight_bytes()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_runs_in_bf16(tiny_model_dir, mode: str) -> None:
    src = tiny_model_dir("llama-gqa")
    got = logits(make(src, mode, "bfloat16"))
    want = logits(make(src, None, "float32"))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 activations add ~1e-2 relative rounding on top of the weight rounding.
    assert rel(got, want) < QUALITY[mode] + 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a8_engine_tracks_int4(tiny_model_dir, dtype: str) -> None:
    """w4a8 runs the int4 weights by integer dot products (x in two int8 planes, ~15 bits),
    scales in fp16 and the LM head in 8 bits per group of 32: its logits stay next to the int4
    engine's, whose activations are float and whose head is the float one."""
    from kernels import cpu_w4a8

    if not cpu_w4a8.available():
        pytest.skip("needs AVX512-VNNI")
    src = tiny_model_dir("llama-gqa")
    w4a8, int4 = make(src, "w4a8", dtype), make(src, "int4", dtype)
    assert "w4a8" in w4a8.runner.weight_format
    got, ref = logits(w4a8), logits(int4)
    assert rel(got, ref) < (0.01 if dtype == "float32" else 0.03)
    assert rel(got, logits(make(src, None, dtype))) < QUALITY["int4"]
