"""Offline throughput: Tandem's engine against Hugging Face transformers `generate`, same model,
same prompts, same run.

    python -m bench.offline [--model M] [--num-prompts 64] [--dtype float32] [--out out.json]

Prompts are windows of ../shared/data/austen.txt (or --text) of 128-512 tokens; every request
generates exactly --max-tokens tokens (ignore_eos), so all systems do the same work. transformers
runs (a) one request at a time and (b) static batches of 16 (left-padded); each on a subset of the
prompts (--hf-prompts) since it is slow, and its throughput is extrapolated per token. Engine
overhead is the share of step time spent outside the model forward.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from protos.messages import SamplingParams

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"


def make_prompts(tokenizer, text_path: Path, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    text = text_path.read_text()[:400_000]
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(ids[start:start + length])
    return prompts


def bench_tandem(args, model_dir: Path, prompts: list[list[int]]) -> dict:
    from cluster.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(str(model_dir), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_bytes=args.kv_cache_bytes, num_threads=args.threads,
              quantization=args.quantization)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=2))  # warm caches
    eng = llm.engine
    steps0, total0, model0 = eng.times.steps, eng.times.total, eng.times.model
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    total = eng.times.total - total0
    model = eng.times.model - model0
    return dict(system="tandem", quantization=args.quantization,
                weight_mib=eng.runner.weight_bytes() / 2**20, requests=len(prompts), generated_tokens=gen,
                prompt_tokens=sum(map(len, prompts)), seconds=elapsed,
                output_tokens_per_s=gen / elapsed, startup_s=startup,
                steps=eng.times.steps - steps0,
                engine_overhead=1 - model / total if total else 0.0,
                token_ids=[o.token_ids for o in outs])


def bench_hf(args, model_dir: Path, prompts: list[list[int]], batch: int) -> dict:
    import transformers as tf

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    gen_tokens, out_ids = 0, []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False,
                                 pad_token_id=pad)
        new = out[:, width:]
        gen_tokens += new.numel()
        out_ids += new.tolist()
        print(f"  transformers batch={batch}: {i + len(chunk)}/{len(prompts)} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    return dict(system=f"transformers batch={batch}", requests=len(prompts),
                generated_tokens=gen_tokens, prompt_tokens=sum(map(len, prompts)),
                seconds=elapsed, output_tokens_per_s=gen_tokens / elapsed, token_ids=out_ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=2 << 30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "gguf"],
                   help="Tandem's weight format (transformers always runs --dtype)")
    p.add_argument("--hf-prompts", type=int, default=16,
                   help="how many prompts transformers runs (it is slow); 0 skips it")
    p.add_argument("--hf-single-prompts", type=int, default=2,
                   help="how many prompts transformers runs one at a time; 0 skips it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-offline.json"))
    args = p.parse_args(argv)

    from cluster.default_model import resolve_model
    from text.tokenizer import Tokenizer

    model_dir = resolve_model(args.model)
    tok = Tokenizer.from_dir(model_dir)
    prompts = make_prompts(tok, args.text, args.num_prompts, args.min_len, args.max_len,
                           args.seed)
    results = [bench_tandem(args, model_dir, prompts)]
    if args.hf_single_prompts:
        results.append(bench_hf(args, model_dir, prompts[:args.hf_single_prompts], 1))
    if args.hf_prompts:
        results.append(bench_hf(args, model_dir, prompts[:args.hf_prompts], 16))

    # Exactness where the same greedy work was done: per-request, compared to batch-1 HF.
    tandem_ids = results[0]["token_ids"]
    for r in results[1:]:
        same = sum(a == b for a, b in zip(tandem_ids, r["token_ids"]))
        r["identical_to_tandem"] = f"{same}/{len(r['token_ids'])}"
    base = results[0]["output_tokens_per_s"]
    print(f"\nmodel {model_dir.name}, dtype {args.dtype}, {args.num_prompts} prompts of "
          f"{args.min_len}-{args.max_len} tokens, {args.max_tokens} new tokens each, "
          f"{torch.get_num_threads()} threads")
    print(f"{'system':<26}{'requests':>9}{'tok/s':>10}{'tandem x':>10}{'same ids':>10}")
    for r in results:
        ratio = base / r["output_tokens_per_s"]
        print(f"{r['system']:<26}{r['requests']:>9}{r['output_tokens_per_s']:>10.1f}"
              f"{ratio:>10.2f}{r.get('identical_to_tandem', '-'):>10}")
    t = results[0]
    print(f"tandem weights: {t['quantization'] or args.dtype}, {t['weight_mib']:.1f} MiB")
    print(f"tandem: {t['steps']} steps, engine overhead {t['engine_overhead'] * 100:.1f}% of step "
          f"time, start-up {t['startup_s']:.1f} s")
    for r in results:
        r.pop("token_ids")
    args.out.write_text(json.dumps(dict(config={k: str(v) for k, v in vars(args).items()},
                                        results=results), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
