"""The engine's greedy tokens and logits against Hugging Face transformers, float32."""

from __future__ import annotations

import pytest
import torch

from protos.messages import Request, StepPlan
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import EngineConfig
from worker.engine import Engine

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [3, 4],
    [100, 20, 30, 40, 50, 60, 70, 80, 90, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22],
    list(range(30, 63)),
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212],
]
NEW_TOKENS = 16


def hf_greedy(model_dir, prompts, new_tokens=NEW_TOKENS):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
        outs.append(ids[0, len(p):].tolist())
    return hf, outs


def engine_greedy(engine, prompts, new_tokens=NEW_TOKENS, tag=""):
    reqs = [Request(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=greedy(new_tokens))
            for i, p in enumerate(prompts)]
    out = run_to_completion(engine, reqs)
    return [tokens_of(out[r.request_id]) for r in reqs]


@pytest.fixture(scope="module", params=["llama-gqa", "llama-mha", "llama-linear", "qwen2",
                                        "mistral-window"])
def model_and_reference(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    hf, ref = hf_greedy(path, PROMPTS)
    return request.param, path, hf, ref


def test_greedy_equals_transformers(model_and_reference):
    kind, path, _, ref = model_and_reference
    engine = Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=1 << 22, block_size=4))
    assert engine_greedy(engine, PROMPTS) == ref, kind
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_logits_match_transformers(model_and_reference):
    _kind, path, hf, _ = model_and_reference
    engine = Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=1 << 22, block_size=4))
    prompt = PROMPTS[3]
    n = len(prompt)
    blocks = list(range(-(-n // 4)))
    plan = StepPlan(0, prompt, list(range(n)), list(range(n)), [0, n], [n], [blocks],
                    list(range(n)))
    ours = engine.runner.execute(plan)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_preemption_keeps_greedy_tokens(model_and_reference):
    kind, path, _, ref = model_and_reference
    # 2 layers x 2 (K,V) x 4 tokens x kv_heads x 16 dims x 4 bytes per block; room for ~26 blocks
    # (104 tokens): five requests of up to 49 tokens cannot all run at once.
    from worker.config import ModelConfig

    mc = ModelConfig.from_hf_dir(path)
    block_bytes = 2 * 2 * 4 * mc.num_kv_heads * 16 * 4
    engine = Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=26 * block_bytes, block_size=4,
                                 max_num_batched_tokens=64))
    assert engine_greedy(engine, PROMPTS) == ref, kind
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_chunked_prefill_keeps_greedy_tokens(model_and_reference):
    kind, path, _, ref = model_and_reference
    engine = Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
                                 max_num_batched_tokens=7, max_num_seqs=3))
    assert engine_greedy(engine, PROMPTS) == ref, kind
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
