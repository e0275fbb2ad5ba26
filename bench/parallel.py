"""Per-step compute vs communication for each parallel layout on a small random Llama.

    python -m bench.parallel [--layouts tp1,tp2,pp2,tp2pp2] [--out parallel.json]

Each layout serves the same greedy batch (prefill, then decode). For every rank the step time
is split into compute, TP collectives (all-reduce / all-gather, host time), pipeline waits (the
receive of a stage's input or of the logits: link time plus the upstream stages' compute, i.e.
the bubble) and the plan broadcast (rank 0). On CPU with gloo over loopback this measures
Tandem's overheads and the shape of the costs, not GPU speed: docs/parallelism.md has the
arithmetic for H100s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from cluster.llm import LLM
from protos.messages import SamplingParams

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


def make_model(root: Path) -> Path:
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(root, safe_serialization=True)
    return root


def run_layout(model: Path, name: str, prompts: list[list[int]], max_tokens: int,
               threads: int) -> dict:
    tp, pp = LAYOUTS[name]
    llm = LLM(str(model), dtype="float32", kv_cache_bytes=64 << 20, num_threads=threads,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    try:
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm
        before = _timings(llm)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        after = _timings(llm)
    finally:
        llm.shutdown()
    ranks = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before)]
    steps = max(r["steps"] for r in ranks) or 1
    per_step = {k: statistics.fmean(r[k] for r in ranks) / steps * 1e3
                for k in ("total_s", "compute_s", "tp_comm_s", "pp_wait_s", "plan_s")}
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"layout": name, "tp": tp, "pp": pp, "steps": steps, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ms_per_step_mean_over_ranks": per_step,
            "ranks": ranks}


def _timings(llm: LLM) -> list[dict[str, float]]:
    if hasattr(llm.engine, "timings"):
        return llm.engine.timings()
    t = llm.engine.times  # single process: everything is compute
    return [{"steps": t.steps, "total_s": t.model, "compute_s": t.model, "tp_comm_s": 0.0,
             "pp_wait_s": 0.0, "plan_s": 0.0}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=max(4, os.cpu_count() or 1))
    prompts = [[(7 * i + 13 * j) % 4000 + 3 for j in range(args.prompt_len)]
               for i in range(args.num_prompts)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model")
        for name in args.layouts.split(","):
            results.append(run_layout(model, name, prompts, args.max_tokens, args.threads))
    ray.shutdown()
    print(f"{'layout':8} {'steps':>5} {'ms/step':>8} {'compute':>8} {'tp comm':>8} "
          f"{'pp wait':>8} {'plan':>6} {'tok/s':>7}")
    for r in results:
        m = r["ms_per_step_mean_over_ranks"]
        print(f"{r['layout']:8} {r['steps']:5d} {m['total_s']:8.2f} {m['compute_s']:8.2f} "
              f"{m['tp_comm_s']:8.2f} {m['pp_wait_s']:8.2f} {m['plan_s']:6.2f} "
              f"{r['tokens_per_s']:7.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
