"""Tandem's own engine on the default model against transformers on the same weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.default_model import resolve_model
from cluster.llm import LLM
from cluster.perplexity import perplexity
from protos.messages import SamplingParams

pytestmark = pytest.mark.slow

AUSTEN = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen.txt"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    return LLM(str(folder), dtype="float32", kv_cache_bytes=256 << 20)


@pytest.fixture(scope="module")
def hf(folder):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_greedy_tokens_equal_transformers(llm, hf):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([out.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt


def test_perplexity_matches_transformers_on_a_slice(llm, hf):
    ids = llm.tokenizer.encode(AUSTEN.read_text()[:6000])[:1024]
    ours = perplexity(llm.engine, ids, window=512, stride=256, progress=False)
    # The same sliding-window recipe with transformers.
    nll, count, prev = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, 256):
        end = min(begin + 512, len(ids))
        first = max(prev, begin + 1)
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0]
        tgt = torch.tensor(ids[first:end])
        nll += float(torch.nn.functional.cross_entropy(logits[first - 1 - begin:end - 1 - begin],
                                                       tgt, reduction="sum"))
        count += len(tgt)
        prev = end
        if end == len(ids):
            break
    assert ours.tokens_scored == count
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-3)


def test_cli_chat_answers_paris(folder):
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", str(folder), "--chat",
         "--prompt", "What is the capital of France?", "--max-tokens", "20", "--json",
         "--kv-cache-bytes", str(64 << 20)],
        capture_output=True, text=True, timeout=300, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in line["text"]
    assert line["num_prompt_tokens"] > 5 and line["finish_reason"] in ("stop", "length")


def test_cli_bad_model_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model",
                          str(tmp_path / "nope.gguf"), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("tandem: error:") and "Traceback" not in out.stderr
