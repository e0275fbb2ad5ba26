"""Benchmark the hot-path kernels on a CUDA GPU: time per call (triton.testing.do_bench, median
of many runs), achieved GB/s against the bytes each op must move at minimum, and TFLOP/s against
the FLOPs it must do, beside the torch reference (and SDPA / a dense F.linear where comparable).

    python -m bench.gpu_kernels --out bench_kernels.json

Without a GPU it says so and exits 0. Sizes are Llama-3-8B-like (32 query heads, 8 KV heads,
head dim 128, hidden 4096) in fp16 and fit one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels import quant_matmul as qm
from kernels.kv_store import store_kv, store_kv_reference
from kernels.paged_attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_reference,
)
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rotary import rotary_embedding, rotary_embedding_reference

DT = torch.float16
HQ, HKV, D, BS = 32, 8, 128, 16


@dataclass
class Row:
    op: str
    case: str
    impl: str
    ms: float
    gbps: float
    tflops: float


def timed(op: str, case: str, impls: dict[str, Callable[[], object]], nbytes: float,
          flops: float) -> list[Row]:
    import triton.testing

    rows = []
    for impl, fn in impls.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        rows.append(Row(op, case, impl, ms, nbytes / ms / 1e6, flops / ms / 1e9))
    return rows


def bench_small_ops(dev: torch.device) -> list[Row]:
    rows: list[Row] = []
    t, hidden = 4096, 4096
    x, r = torch.randn(t, hidden, device=dev, dtype=DT), torch.randn(t, hidden, device=dev, dtype=DT)
    w = torch.randn(hidden, device=dev, dtype=DT)
    rows += timed("rms_norm+residual", f"T={t} H={hidden}", {
        "triton": lambda: rms_norm(x, w, 1e-6, r),
        "torch ref": lambda: rms_norm_reference(x, w, 1e-6, r),
    }, nbytes=4 * t * hidden * 2, flops=4 * t * hidden)
    q, k = torch.randn(t, HQ, D, device=dev, dtype=DT), torch.randn(t, HKV, D, device=dev, dtype=DT)
    pos = torch.randint(0, 8192, (t,), device=dev)
    cache = torch.randn(8192, D, device=dev)
    rows += timed("rotary", f"T={t} Hq={HQ} Hkv={HKV} D={D}", {
        "triton": lambda: rotary_embedding(pos, q, k, cache),
        "torch ref": lambda: rotary_embedding_reference(pos, q, k, cache),
    }, nbytes=2 * t * (HQ + HKV) * D * 2 + t * D * 4, flops=3 * t * (HQ + HKV) * D)
    blocks = 2 * t // BS
    kc = torch.randn(blocks, BS, HKV, D, device=dev, dtype=DT)
    vc = torch.randn_like(kc)
    slots = torch.randperm(blocks * BS, device=dev)[:t]
    rows += timed("store_kv", f"T={t} Hkv={HKV} D={D}", {
        "triton": lambda: store_kv(k, k, kc, vc, slots),
        "torch ref": lambda: store_kv_reference(k, k, kc, vc, slots),
    }, nbytes=4 * t * HKV * D * 2, flops=0)
    return rows


def make_meta(seqs: list[tuple[int, int]], dev: torch.device) -> tuple[AttentionMetadata, int]:
    pages = [math.ceil(c / BS) for c, _ in seqs]
    perm = torch.randperm(sum(pages)).tolist()
    tables, used = [], 0
    for n in pages:
        tables.append(perm[used:used + n])
        used += n
    width = max(pages)
    qs = [0]
    for _, ql in seqs:
        qs.append(qs[-1] + ql)
    lens = [c for c, _ in seqs]
    meta = AttentionMetadata(
        torch.tensor(qs, dtype=torch.int32, device=dev),
        torch.tensor(lens, dtype=torch.int32, device=dev),
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        BS, max(ql for _, ql in seqs), max(lens), qs, lens)
    return meta, sum(pages)


def bench_attention(dev: torch.device) -> list[Row]:
    rows: list[Row] = []
    scale = D ** -0.5
    cases = {
        "decode B=64 ctx=2048": [(2048, 1)] * 64,
        "decode B=4 ctx=16384 (split-K)": [(16384, 1)] * 4,
        "prefill 4 x 2048 fresh": [(2048, 2048)] * 4,
        "prefill chunk 512 after 3584 past": [(4096, 512)] * 2,
        "mixed 1 chunk 1024 + 64 decodes": [(3072, 1024)] + [(1024, 1)] * 64,
    }
    for name, seqs in cases.items():
        meta, blocks = make_meta(seqs, dev)
        kc = torch.randn(blocks, BS, HKV, D, device=dev, dtype=DT)
        vc = torch.randn_like(kc)
        q = torch.randn(meta.query_start_host[-1], HQ, D, device=dev, dtype=DT)
        # Minimum traffic: each KV head's visible K/V once, queries in, outputs out.
        kv_tokens = sum(c for c, _ in seqs)
        nbytes = 2 * kv_tokens * HKV * D * 2 + 2 * q.numel() * 2
        # QK^T and PV over the causally visible keys: 4 * D FLOPs per (query head, key) pair.
        pairs = sum(ql * (c - ql) + ql * (ql + 1) / 2 for c, ql in seqs)
        flops = 4 * HQ * D * pairs
        impls: dict[str, Callable[[], object]] = {
            "triton": lambda q=q, kc=kc, vc=vc, meta=meta: paged_attention(q, kc, vc, meta, scale),
            "torch ref": lambda q=q, kc=kc, vc=vc, meta=meta: paged_attention_reference(
                q, kc, vc, meta, scale),
        }
        if len({s for s in seqs}) == 1:  # uniform batch: dense SDPA on contiguous K/V
            c, ql = seqs[0]
            qd = q.view(len(seqs), ql, HQ, D).transpose(1, 2)
            kd = torch.randn(len(seqs), HKV, c, D, device=dev, dtype=DT)
            vd = torch.randn_like(kd)
            mask = None
            if 1 < ql < c:  # chunk after a past: bottom-right causal mask
                mask = (torch.arange(c, device=dev)[None, :]
                        <= torch.arange(c - ql, c, device=dev)[:, None])
            impls["sdpa (dense)"] = lambda qd=qd, kd=kd, vd=vd, mask=mask, causal=(ql == c): (
                F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=causal,
                                               scale=scale, enable_gqa=True))
        rows += timed("paged_attention", name, impls, nbytes, flops)
    return rows


def bench_quant(dev: torch.device) -> list[Row]:
    rows: list[Row] = []
    n, k = 14336, 4096  # Llama-3-8B MLP up projection
    w = torch.randn(n, k, device=dev, dtype=DT) * 0.02
    q8, s8 = qm.quantize_int8(w)
    p4, s4, z4 = qm.quantize_int4(w, 128)
    for m in (1, 16, 2048):
        x = torch.randn(m, k, device=dev, dtype=DT)
        act = (m * k + m * n) * 2
        flops = 2 * m * n * k
        rows += timed("int8_linear", f"M={m} N={n} K={k}", {
            "triton": lambda x=x: qm.int8_linear(x, q8, s8),
            "torch ref": lambda x=x: qm.int8_linear_reference(x, q8, s8),
        }, nbytes=n * k + act, flops=flops)
        rows += timed("int4_linear g128", f"M={m} N={n} K={k}", {
            "triton": lambda x=x: qm.int4_linear(x, p4, s4, z4, 128),
            "torch ref": lambda x=x: qm.int4_linear_reference(x, p4, s4, z4, 128),
        }, nbytes=n * k // 2 + 2 * s4.numel() * 2 + act, flops=flops)
        rows += timed("fp16 F.linear", f"M={m} N={n} K={k}", {
            "torch": lambda x=x: F.linear(x, w),
        }, nbytes=n * k * 2 + act, flops=flops)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_kernels.json", help="JSON results path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU (Triton kernels); nothing to measure here.")
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = bench_small_ops(dev) + bench_attention(dev) + bench_quant(dev)
    print(f"{'op':<18} {'case':<36} {'impl':<13} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r.op:<18} {r.case:<36} {r.impl:<13} {r.ms:>9.4f} {r.gbps:>8.1f} {r.tflops:>8.2f}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "dtype": str(DT),
                   "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
