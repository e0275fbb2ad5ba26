"""GGUF Q4_0 / Q4_1 / Q8_0 linears run from their blocks (--quantization gguf) against the same
model dequantized by the converter (the gguf package's reference dequantization)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from cluster.default_model import resolve_model
from protos.messages import Request, StepPlan
from tests.engine_utils import greedy, run_to_completion, tokens_of
from tests.gguf_utils import llama_gguf, random_llama, tokenizer_metadata, train_tokenizer
from worker.config import ConfigError, EngineConfig
from worker.engine import Engine

Q = gguf.GGMLQuantizationType
# Bounds on max|Δlogit| / max|logit| in fp32. Q4_0 maps exactly (same weights, summation order
# differs); Q4_1 exactly up to fp32 rounding of 8d + m; Q8_0 is re-quantized per channel (one
# extra rounding of up to half a per-channel step; measured 0.05 on this random model).
BOUNDS = {Q.Q4_0: 1e-4, Q.Q4_1: 1e-4, Q.Q8_0: 0.1}


def engine(folder: Path, quantization: str | None) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype="float32", kv_cache_bytes=1 << 22,
                               quantization=quantization))


def logits(e: Engine) -> torch.Tensor:
    n = 20
    plan = StepPlan(0, [(5 * i + 1) % 64 for i in range(n)], list(range(n)), list(range(n)),
                    [0, n], [n], [[0, 1]], list(range(n)))
    return e.runner.execute(plan)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_match_dequantized(tmp_path: Path, qtype: Q) -> None:
    tokenizer = train_tokenizer()
    model = random_llama(vocab_size=tokenizer.get_vocab_size(), tied=True)
    path = llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model, tokenizer_metadata(tokenizer),
                      matrix_type=qtype)
    folder = resolve_model(str(path), tmp_path / "cache")
    packed, dense = engine(folder, "gguf"), engine(folder, None)
    got, want = logits(packed), logits(dense)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < BOUNDS[qtype], err
    kind = "int8" if qtype == Q.Q8_0 else "int4"
    qkv = packed.runner.model.model.layers[0].self_attn.qkv_proj
    assert type(qkv).__name__ == ("Int8Linear" if kind == "int8" else "Int4Linear")
    assert packed.runner.weight_bytes() < dense.runner.weight_bytes()
    # The tied embedding's blocks also serve as the LM head, as llama.cpp reads the file.
    assert type(packed.runner.model.lm_head).__name__ == "QuantizedLMHead"
    if qtype != Q.Q8_0:  # same arithmetic: the same greedy tokens
        reqs = [Request(request_id="a", prompt_token_ids=[3, 9, 27, 17], sampling=greedy(12))]
        a = tokens_of(run_to_completion(packed, reqs)["a"])
        reqs = [Request(request_id="a", prompt_token_ids=[3, 9, 27, 17], sampling=greedy(12))]
        assert a == tokens_of(run_to_completion(dense, reqs)["a"])


def test_gguf_mode_needs_a_gguf_source(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match="was not converted from one"):
        engine(tiny_model_dir("llama-gqa"), "gguf")
