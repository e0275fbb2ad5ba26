"""Weight formats side by side on one model: memory, batch-1 decode, batched throughput and
perplexity for fp32, bf16, int8, int4, w4a8 and the GGUF's own blocks (and llama.cpp, if asked).

    python -m bench.quant [--model M] [--modes fp32,bf16,int8,int4,w4a8,gguf] [--max-tokens 20000]
                          [--llama-cpp] [--out bench-quant.json]

Every mode scores the same first --max-tokens tokens of --text (window 1024, stride 512) and
decodes the same prompts. Batch-1 decode speed is (time for 1 + N tokens - time for 1 token) / N,
so prefill is not counted. --llama-cpp builds llama-cpp-python into <cache>/llama_cpp (never into
this environment; 3-10 minutes, once) and times its batch-1 decode on the same .gguf file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from protos.messages import SamplingParams

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"
# label -> (activation dtype, quantization)
MODES: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None), "bf16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4"), "w4a8": ("bfloat16", "w4a8"),
    "gguf": ("bfloat16", "gguf"),
    "int8-fp32": ("float32", "int8"), "int4-fp32": ("float32", "int4"),
    "gguf-fp32": ("float32", "gguf"),
}
LLAMA_CPP = "llama-cpp-python==0.3.36"


def _decode_rate(llm, prompt: list[int], n: int) -> float:
    def timed(k: int) -> float:
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
        return time.perf_counter() - t0
    timed(2)  # warm caches
    runs = sorted(timed(1 + n) - timed(1) for _ in range(3))
    return n / runs[1]


def bench_mode(label: str, args, model_dir: Path, ids: list[int]) -> dict:
    from cluster.llm import LLM
    from cluster.perplexity import perplexity

    dtype, quant = MODES[label]
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), dtype=dtype, quantization=quant, quant_group_size=args.group_size,
              kv_cache_bytes=1 << 30, num_threads=args.threads, max_num_seqs=args.batch)
    startup = time.perf_counter() - t0
    runner = llm.engine.runner
    out = dict(mode=label, dtype=dtype, quantization=quant, weight_format=runner.weight_format,
               weight_mib=runner.weight_bytes() / 2**20, startup_s=startup)
    out["decode_b1_tok_s"] = _decode_rate(llm, ids[:64], args.decode_tokens)
    prompts = [ids[i * 997:i * 997 + 128 + (i * 37) % 128] for i in range(args.batch)]
    t0 = time.perf_counter()
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.decode_tokens,
                                               ignore_eos=True))
    out["batch"] = args.batch
    out["batch_tok_s"] = sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0)
    ppl = perplexity(llm.engine, ids[:args.max_tokens], progress=False)
    out["perplexity"] = ppl.perplexity
    out["ppl_tokens"] = ppl.tokens_scored
    print(f"  {label}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})}",
          file=sys.stderr)
    return out


# -- llama.cpp ----------------------------------------------------------------------------------

def llama_cpp_cmake_args() -> list[str]:
    """This CPU's vector extensions, named one by one instead of GGML_NATIVE: with -march=native
    ggml also compiles its AMX path, which segfaulted in ggml_backend_amx_mul_mat on an AMX
    Xeon VM here; without AMX llama.cpp takes its AVX-512 kernels, as on CPUs without AMX."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split())
    except (OSError, IndexError):
        flags = set()
    wanted = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f",
              "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
              "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni", "BMI2": "bmi2"}
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"]
    return args + [f"-DGGML_{opt}={'ON' if flag in flags else 'OFF'}"
                   for opt, flag in wanted.items()]


def build_llama_cpp(cache: Path) -> Path:
    target = cache / "llama_cpp"
    if (target / "llama_cpp" / "__init__.py").is_file():
        return target
    print(f"building {LLAMA_CPP} into {target} (once; minutes)", file=sys.stderr)
    env = {**os.environ, "CMAKE_ARGS": " ".join(llama_cpp_cmake_args())}
    for reqs in ([LLAMA_CPP, "--no-deps"], ["diskcache", "jinja2", "typing-extensions",
                                              "numpy"]):
        subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(target),
                        "--disable-pip-version-check", "--no-cache-dir", *reqs], check=True, env=env)
    return target


_LLAMA_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
prompt = llm.tokenize(b"It is a truth universally acknowledged, that a single man")
def timed(k):
    t0 = time.perf_counter()
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=k, temperature=0.0)
    return time.perf_counter() - t0
timed(2)
runs = sorted(timed(1 + n) - timed(1) for _ in range(3))
print(json.dumps({"decode_b1_tok_s": n / runs[1]}))
"""


def bench_llama_cpp(args, gguf_path: Path) -> dict:
    from cluster.default_model import default_cache_dir

    target = build_llama_cpp(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    env = {**os.environ, "PYTHONPATH": str(target)}
    threads = args.threads or os.cpu_count() or 1
    proc = subprocess.run([sys.executable, "-c", _LLAMA_SCRIPT, str(gguf_path), str(threads),
                           str(args.decode_tokens)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # report it beside the other rows instead of losing them
        print(f"llama.cpp failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}",
              file=sys.stderr)
        result = {"decode_b1_tok_s": float("nan"), "error": f"exit {proc.returncode}"}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(mode=f"llama.cpp ({gguf_path.name})", weight_mib=gguf_path.stat().st_size / 2**20,
                **result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("--modes", default="fp32,bf16,int8,int4,gguf",
                   help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--max-tokens", type=int, default=20000, help="perplexity tokens (all modes)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="requests in the throughput run")
    # 32: SmolLM2's weights come from a Q4_1 file (groups of 32); coarser int4 groups
    # re-quantize them onto a worse grid (+41% perplexity at 128 vs +0.3% at 32, measured).
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp on the .gguf")
    p.add_argument("--out", type=Path, default=Path("bench-quant.json"))
    args = p.parse_args(argv)

    import torch

    from cluster.default_model import resolve_model
    from text.tokenizer import Tokenizer
    from worker.quant.gguf import source_gguf

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
    ids = Tokenizer.from_dir(model_dir).encode(args.text.read_text()[:400_000])
    results = []
    for label in args.modes.split(","):
        if label not in MODES:
            p.error(f"unknown mode {label!r}; choose from {', '.join(MODES)}")
        results.append(bench_mode(label, args, model_dir, ids))
    if args.llama_cpp:
        results.append(bench_llama_cpp(args, source_gguf(model_dir)))

    base = next((r["perplexity"] for r in results if r["mode"] == "fp32"), None)
    print(f"\nmodel {model_dir.name}, {torch.get_num_threads()} threads, perplexity on the first "
          f"{args.max_tokens} tokens of {args.text.name}, batch run {args.batch} x "
          f"{args.decode_tokens} new tokens")
    print(f"{'mode':<34}{'MiB':>8}{'b1 tok/s':>10}{'batch tok/s':>12}{'ppl':>9}{'vs fp32':>9}")
    for r in results:
        ppl = r.get("perplexity")
        delta = f"{(ppl / base - 1) * 100:+.2f}%" if ppl and base else "-"
        label = r["mode"] if r.get("weight_format") is None else \
            f"{r['mode']} ({r['weight_format'].split(' (')[0][:18]})"
        print(f"{label:<34}{r['weight_mib']:>8.1f}{r['decode_b1_tok_s']:>10.1f}"
              f"{r.get('batch_tok_s', float('nan')):>12.1f}{ppl or float('nan'):>9.3f}{delta:>9}")
    args.out.write_text(json.dumps(dict(config={k: str(v) for k, v in vars(args).items()},
                                        results=results), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
