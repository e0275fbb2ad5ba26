"""Sliding-window perplexity, the yardstick for quantization and every later optimization.

Each window of `window` tokens is run as one prefill; only the tokens not scored by the previous
window (the last `stride` or fewer) count, so every token is predicted with at least
window - stride tokens of context (the Hugging Face recipe, so numbers compare).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from protos.messages import StepPlan
from worker.engine import Engine


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    tokens_per_s: float
    window: int
    stride: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(perplexity=self.perplexity, nll=self.nll, tokens_scored=self.tokens_scored,
                    tokens_per_s=self.tokens_per_s, window=self.window, stride=self.stride)


def perplexity(engine: Engine, token_ids: list[int], window: int = 1024, stride: int = 512,
               progress: bool = True) -> PerplexityResult:
    if len(token_ids) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    window = min(window, engine.max_model_len, len(token_ids))
    stride = min(stride, window)
    if engine.scheduler.has_unfinished():
        raise RuntimeError("perplexity needs an idle engine: it uses the KV cache directly")
    bs = engine.config.block_size
    blocks = list(range(-(-window // bs)))
    if len(blocks) > engine.kv.num_blocks:
        raise ValueError(f"window {window} needs {len(blocks)} KV blocks; the cache has "
                         f"{engine.kv.num_blocks}: lower --window or raise --kv-cache-bytes")
    starts = list(range(0, len(token_ids) - 1, stride))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(token_ids), desc="perplexity", unit="tok", file=sys.stderr)
    nll_sum, scored, prev_end = 0.0, 0, 0
    t0 = time.perf_counter()
    for begin in starts:
        end = min(begin + window, len(token_ids))
        ids = token_ids[begin:end]
        n = len(ids)
        first_target = max(prev_end, begin + 1)  # absolute index of the first token scored
        if first_target >= end:
            break
        sample = list(range(first_target - 1 - begin, n - 1))
        plan = StepPlan(0, ids, list(range(n)), list(range(n)), [0, n], [n], [blocks], sample)
        logits = engine.runner.execute(plan)
        targets = torch.tensor(token_ids[first_target:end])
        nll_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        scored += len(targets)
        if bar is not None:
            bar.update(end - prev_end)
        prev_end = end
        if end == len(token_ids):
            break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), nll, scored, prev_end / elapsed, window, stride)
