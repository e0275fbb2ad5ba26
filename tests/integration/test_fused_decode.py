"""The CPU fused decode layer (kernels/csrc/decode_layer.c): decode steps of up to 4 sequences
run each decoder layer in one C call. Greedy tokens against Hugging Face transformers (fp32), and
against the unfused torch path of the same engine for bf16 and int8/int4 weights."""

from __future__ import annotations

import pytest

from kernels import cpu_decode_layer as fused
from kernels import cpu_w4a8
from tests.integration.test_engine_vs_hf import PROMPTS, engine_greedy, hf_greedy
from worker.config import EngineConfig
from worker.engine import Engine
from worker.models.llama import LlamaModel

KINDS = ["llama-gqa", "llama-mha", "llama-linear", "qwen2", "mistral-window"]
BATCH = PROMPTS[:3]  # decode steps of 3, then fewer as none finish early: all fused


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts layers run fused (a stage's layers go in one run_layers call); fails the test if
    the C kernels are not available here."""
    import torch

    if not fused.available(torch.float32):
        pytest.fail("the fused CPU decode layer did not build on this machine")
    calls = [0]
    run = fused.run_layers

    def counting(stack, *args, **kw):
        calls[0] += len(stack.specs)
        return run(stack, *args, **kw)

    monkeypatch.setattr(fused, "run_layers", counting)
    return calls


def _engine(path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), kv_cache_bytes=1 << 22, block_size=4, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_greedy_equals_transformers(kind: str, tiny_model_dir, fused_calls) -> None:
    path = tiny_model_dir(kind)
    _, ref = hf_greedy(path, BATCH)
    engine = _engine(path, dtype="float32")
    assert engine_greedy(engine, BATCH) == ref, kind
    assert fused_calls[0] >= 2 * 15, "decode steps did not take the fused layer"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window"])
def test_fused_short_prefill_and_mixed_steps(kind: str, tiny_model_dir, fused_calls) -> None:
    """Steps of several tokens per sequence (short prompts prefilled in one step, 8 tokens in
    all) run fused too: causal attention from per-row lengths over a shared block table."""
    prompts = [[3, 4], [5, 6, 7], [9, 8, 7]]
    path = tiny_model_dir(kind)
    _, ref = hf_greedy(path, prompts)
    engine = _engine(path, dtype="float32")
    assert engine_greedy(engine, prompts) == ref, kind
    assert fused_calls[0] == 2 * (1 + 15), "the 8-token prefill step was not fused"


@pytest.mark.parametrize(("dtype", "quantization"), [
    ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int8"), ("float32", "int4"),
    ("bfloat16", "int4"), ("float32", "w4a8"), ("bfloat16", "w4a8")])
def test_fused_equals_unfused(dtype: str, quantization: str | None, tiny_model_dir, fused_calls,
                              monkeypatch) -> None:
    path = tiny_model_dir("qwen2")  # QKV bias: the fused layer adds it in the model dtype
    kw = dict(dtype=dtype, quantization=quantization, quant_group_size=32)
    if quantization == "w4a8" and not cpu_w4a8.available():
        pytest.skip("needs AVX512-VNNI")
    engine = _engine(path, **kw)
    if quantization == "w4a8":  # the integer dot-product layout in the fused layer
        specs = [layer.fused_spec() for layer in engine.runner.model.model.layers]
        assert all(s.struct.qkv.kind == fused.LIN_W4A8 for s in specs)
    with_fused = engine_greedy(engine, BATCH, tag="f")
    assert fused_calls[0] > 0
    monkeypatch.setattr(LlamaModel, "fused_layers", lambda self, x, meta: None)
    without = engine_greedy(_engine(path, **kw), BATCH, tag="u")
    assert with_fused == without


def _need_amx() -> None:
    from kernels import cpu_linear

    if not cpu_linear.amx_available():
        pytest.skip("AMX is not available here: fused steps stop at 8 tokens")


@pytest.mark.parametrize("prompts", [
    [[3, 4, 5, 6, 7], [5, 6, 7, 8], [9, 8, 7, 6, 5, 4]],  # a 15-token prefill step
    [[(7 * i) % 200 + 3 for i in range(180)], [(11 * i) % 190 + 5 for i in range(120)]],  # 300
], ids=["15-token-step", "300-token-step"])
def test_bf16_prefill_steps_run_fused_with_amx(prompts: list[list[int]], tiny_model_dir,
                                               fused_calls, monkeypatch) -> None:
    """With AMX the bf16 matmuls cost the same up to 16 rows and run on tiles beyond, so a
    prefill step of up to MAX_ROWS_AMX tokens (all prompts at once here) takes the fused layer;
    its tokens equal the unfused path's."""
    _need_amx()
    path = tiny_model_dir("llama-gqa")
    engine = _engine(path, dtype="bfloat16")
    fused_calls[0] = 0  # the start-up warm-up step may run fused too
    with_fused = engine_greedy(engine, prompts, tag="f")
    assert fused_calls[0] == 2 * (1 + 15), "the prefill step was not fused"
    monkeypatch.setattr(LlamaModel, "fused_layers", lambda self, x, meta: None)
    assert with_fused == engine_greedy(_engine(path, dtype="bfloat16"), prompts, tag="u")


@pytest.mark.parametrize("length", [37, 203])
def test_a_prompt_answers_the_same_with_its_prefix_cached(tiny_model_dir, length) -> None:
    """The second time a prompt comes, its full blocks are cached and only its last tokens run;
    the first time the whole prompt runs in one step. Both go through the fused layer, which
    computes a row the same whatever else its step holds, so the logprobs agree bit for bit
    (before, a prefill past 16 tokens took torch's path and near-ties flipped greedy answers
    between a cold and a warm cache)."""
    from cluster.llm import LLM
    from protos.messages import SamplingParams

    _need_amx()
    llm = LLM(str(tiny_model_dir("llama-gqa")), dtype="bfloat16", kv_cache_bytes=1 << 24)
    prompt = [(13 * i) % 240 + 3 for i in range(length)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=4)
    cold, warm = (llm.generate([prompt], params)[0] for _ in range(2))
    assert (cold.num_cached_tokens, warm.num_cached_tokens) == (0, length // 16 * 16)
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == cold.logprobs


def test_run_layers_equals_layer_by_layer_for_odd_and_even_stacks(tiny_model_dir,
                                                                   monkeypatch) -> None:
    """run_layers alternates between two output pairs; for 1, 2 and 3 layers its result must be
    what run_layer gives layer by layer, bit for bit."""
    import torch

    path = tiny_model_dir("llama-gqa")
    seen = []
    run = fused.run_layers

    def capture(stack, step, x, residual=None):
        seen.append((stack, step, x.clone()))
        return run(stack, step, x, residual)

    monkeypatch.setattr(fused, "run_layers", capture)
    engine_greedy(_engine(path, dtype="float32"), BATCH[:1], tag="c")
    stack, step, x = seen[-1]
    s0, s1 = stack.specs
    for specs in ([s0], [s0, s1], [s0, s1, s0]):
        # Each run stores the step's K/V again, identically in both orders.
        together = run(fused.LayerStack(specs), step, x)
        y, r = x, None
        for spec in specs:
            y, r = fused.run_layer(spec, step, y, r)
        assert torch.equal(together[0], y) and torch.equal(together[1], r), len(specs)
