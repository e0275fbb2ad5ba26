"""The CPU kernels (kernels/csrc/, compiled on first use) against the torch code they replace,
same inputs, same run, on the default model's shapes (SmolLM2-135M: hidden 576, 9 query heads,
3 KV heads, head dim 64, MLP 1536, vocabulary 49152).

    python -m bench.cpu_kernels [--dtype bfloat16] [--out bench-cpu-kernels.json]

Each row: median microseconds per call over --repeats runs for the kernel and for torch, the
speed-up, and for the weight-streaming matmuls the GB/s of weights read.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu_linear
from kernels.paged_attention import AttentionMetadata, paged_attention, paged_attention_reference
from kernels.quant_matmul import (
    _int8_linear_cpu,
    int4_linear_cpu,
    prepare_int4_for_cpu,
    quantize_int4,
    quantize_int8,
)
from kernels.rmsnorm import _rms_norm_fast_cpu, rms_norm, rms_norm_reference
from kernels.rotary import rotary_embedding, rotary_embedding_reference

HIDDEN, HQ, HKV, D, MLP, VOCAB, BS = 576, 9, 3, 64, 1536, 49152, 16
LINEARS = {"qkv": (HQ * D + 2 * HKV * D, HIDDEN), "o": (HIDDEN, HQ * D),
           "gate_up": (2 * MLP, HIDDEN), "down": (HIDDEN, MLP), "lm_head": (VOCAB, HIDDEN)}


def median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def row(op: str, case: str, kernel: Callable[[], object], torch_fn: Callable[[], object],
        repeats: int, weight_bytes: int = 0) -> dict:
    k, t = median_us(kernel, repeats), median_us(torch_fn, repeats)
    return dict(op=op, case=case, kernel_us=k, torch_us=t, speedup=t / k,
                kernel_gb_s=weight_bytes / k / 1e3 if weight_bytes else None)


def attention_rows(dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    for batch, ctx in ((1, 512), (64, 448)):
        gen = torch.Generator().manual_seed(batch)
        lens = torch.randint(ctx // 2, ctx * 3 // 2, (batch,), generator=gen)
        width = int(-(-lens.max() // BS))
        num_blocks = batch * width + 8
        kc = torch.randn(num_blocks, BS, HKV, D, generator=gen).to(dtype)
        vc = torch.randn(num_blocks, BS, HKV, D, generator=gen).to(dtype)
        tables = torch.randperm(num_blocks, generator=gen)[:batch * width].view(batch, width)
        meta = AttentionMetadata(
            query_start=torch.arange(batch + 1, dtype=torch.int32), seq_lens=lens.int(),
            block_tables=tables.int().contiguous(), block_size=BS, max_query_len=1,
            max_seq_len=int(lens.max()), query_start_host=list(range(batch + 1)),
            seq_lens_host=lens.tolist())
        q = torch.randn(batch, HQ, D, generator=gen).to(dtype)
        rows.append(row("decode attention", f"batch {batch}, ~{ctx} ctx",
                        functools.partial(paged_attention, q, kc, vc, meta, D ** -0.5),
                        functools.partial(paged_attention_reference, q, kc, vc, meta, D ** -0.5), repeats))
    return rows


def linear_rows(dtype: torch.dtype, rows_m: int, repeats: int) -> list[dict]:
    rows = []
    for name, (n, k) in LINEARS.items():
        gen = torch.Generator().manual_seed(n)
        w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
        x = torch.randn(rows_m, k, generator=gen).to(dtype)
        case = f"{name} {n}x{k}, {rows_m} row(s)"
        if dtype == torch.bfloat16 and cpu_linear.supports(cpu_linear.BF16):
            rows.append(row("linear bf16", case, functools.partial(cpu_linear.linear_bf16, x, w),
                            functools.partial(F.linear, x, w), repeats, n * k * 2))
        q, s = quantize_int8(w.float())
        rows.append(row("linear int8", case, functools.partial(cpu_linear.linear_int8, x, q, s),
                        functools.partial(_int8_linear_cpu, x, q, s, None), repeats, n * k))
        packed, sc, zr = quantize_int4(w.float(), 32)
        sm = cpu_linear.int4_scale_min(sc, zr)
        tw = prepare_int4_for_cpu(packed, sc.to(dtype), zr.to(dtype), 32)
        rows.append(row("linear int4 g32", case, functools.partial(cpu_linear.linear_int4, x, packed, sm, 32),
                        functools.partial(int4_linear_cpu, x, tw), repeats, n * k // 2 + sm.numel() * 4))
    return rows


def small_op_rows(dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    for tokens in (1, 64):
        x, r = torch.randn(tokens, HIDDEN).to(dtype), torch.randn(tokens, HIDDEN).to(dtype)
        w = torch.ones(HIDDEN).to(dtype)
        torch_norm = _rms_norm_fast_cpu if dtype == torch.float32 else rms_norm_reference
        rows.append(row("add + rms_norm", f"{tokens} token(s)", functools.partial(rms_norm, x, w, 1e-5, r),
                        functools.partial(torch_norm, x, w, 1e-5, r), repeats))
        qkv = torch.randn(tokens, (HQ + 2 * HKV) * D).to(dtype)
        q = qkv[:, :HQ * D].view(tokens, HQ, D)
        k = qkv[:, HQ * D:(HQ + HKV) * D].view(tokens, HKV, D)
        pos = torch.arange(tokens) + 100
        cache = torch.randn(2048, D)
        rows.append(row("rotary", f"{tokens} token(s)", functools.partial(rotary_embedding, pos, q, k, cache),
                        functools.partial(rotary_embedding_reference, pos, q, k, cache), repeats))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench-cpu-kernels.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.inference_mode():
        rows = (attention_rows(dtype, args.repeats) + linear_rows(dtype, 1, args.repeats)
                + linear_rows(dtype, 4, args.repeats) + small_op_rows(dtype, args.repeats))
    print(f"{'op':<18} {'case':<34} {'kernel us':>10} {'torch us':>10} {'speed-up':>9} {'GB/s':>6}")
    for r in rows:
        gb = f"{r['kernel_gb_s']:.1f}" if r["kernel_gb_s"] else ""
        print(f"{r['op']:<18} {r['case']:<34} {r['kernel_us']:>10.1f} {r['torch_us']:>10.1f} "
              f"{r['speedup']:>8.2f}x {gb:>6}")
    args.out.write_text(json.dumps(dict(dtype=args.dtype, threads=torch.get_num_threads(),
                                        rows=rows), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
