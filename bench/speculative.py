"""Speculative decoding on the default model: batch-1 decode speed with and without each
proposer (same greedy output required), acceptance, and batch-32 throughput.

    python -m bench.speculative [--draft-model DIR] [--max-tokens 96] [--json out.json]
    python -m bench.speculative --methods "none,eagle,eagle{eagle_tree_width=1}"
    python -m bench.speculative --methods "none,eagle,eagle{draft_model=DIR}"  (two heads)
    python -m bench.speculative --temperature 0.7 --batch ""   # sampled answers
    python -m bench.speculative --held-out-chats CHATS.json:24   # also a head's held-out chats

A method may carry SpeculativeConfig options in braces, separated by ";" (values are JSON,
else strings), to compare settings of one proposer in the same run; `draft_model` picks that
method's head or draft model folder instead of --draft-model's.

Each configuration is one LLM (one engine) over the same prompts; outputs are compared token
for token with the first method (none). Runs alternate between the engines; timings are medians
over `--repeats` runs. With `--temperature` > 0 every row samples (unseeded, so the measured
gate decides as it does for users): each answer is a different draw, so only
tokens/s compare, and "same output" is not checked (tests/spec/test_spec_sampling.py checks
that speculation leaves the distribution alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cluster.llm import LLM
from protos.messages import SamplingParams

AUSTEN = Path(__file__).parents[1].parent / "shared" / "data" / "austen.txt"

# name -> (prompt, chat?): a copy-heavy prompt, open chat questions, and a novel to continue.
PROMPTS: dict[str, tuple[str, bool]] = {
    "repetitive": ("Repeat this list three times, one item per line:\napples, pears, plums, "
                   "cherries, grapes, lemons, oranges, melons, peaches, figs", True),
    "chat": ("Explain in a few sentences why the sky is blue.", True),
    # More open questions: how much a proposer helps chat varies a lot between prompts.
    "chat-france": ("What is the capital of France and why is it famous?", True),
    "chat-poem": ("Write a short poem about autumn leaves.", True),
    "chat-tea": ("How do I make a cup of tea?", True),
    "chat-engine": ("Explain how a car engine works.", True),
    "austen": ("", False),  # filled from austen.txt
}


def austen_prompt(chars: int = 1200) -> str:
    text = AUSTEN.read_text() if AUSTEN.is_file() else "It is a truth universally acknowledged"
    start = len(text) // 3
    return text[start:start + chars]


def run_one(llm: LLM, prompt: str | list[int], chat: bool,
            params: SamplingParams) -> tuple[list[int], float]:
    """One request; a prompt of token ids is sent as is (a chat already rendered)."""
    t0 = time.perf_counter()
    if chat and isinstance(prompt, str):
        out = llm.chat([{"role": "user", "content": prompt}], params)[0]
    else:
        out = llm.generate([prompt], params)[0]
    return out.token_ids, time.perf_counter() - t0


def held_out_chats(spec: str) -> dict[str, tuple[list[int], bool]]:
    """"CACHE[:N]" -> the first N (default 24) chat prompts of a bench.train_eagle chat cache,
    as token ids. A head trained on that cache never saw its first --held-out (40) chats, so
    these measure it on the kind of request it was trained for, where the benchmark's own
    chats are off its training topics."""
    path, _, n = spec.partition(":")
    try:
        count = int(n) if n else 24
        chats = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--held-out-chats {spec}: give a chat cache of bench.train_eagle "
                         f"(--cache) and optionally :N, the number of its first chats "
                         f"({e})") from None
    return {f"held-out-{i}": (prompt, True) for i, (prompt, _) in enumerate(chats[:count])}


def spec_counts(llm: LLM) -> tuple[int, int, int, int, float]:
    s = llm.engine.stats()
    return (s.spec_proposed_tokens_total, s.spec_accepted_tokens_total,
            s.spec_verifications_total, s.spec_emitted_tokens_total,
            s.spec_proposer_seconds_total)


def parse_method(entry: str) -> tuple[str, dict]:
    """"eagle{eagle_tree_width=3;num_speculative_tokens=15}" -> ("eagle", {...})."""
    name, _, rest = entry.partition("{")
    options: dict = {}
    for item in filter(None, rest.rstrip("}").split(";")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft-model", default=None,
                    help="eagle head or draft model folder (default: the shipped head)")
    ap.add_argument("--methods", default="none,ngram,eagle")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", default="2,4,8,32",
                    help="batch sizes for the throughput rows, comma-separated (2 and 4: k is "
                         "cut to 7 and 3; 8: the largest that speculates by default, k = 1; "
                         "32: speculation stands down)")
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default): bit-identical outputs are expected; with bfloat16 "
                         "a k+1-token forward rounds differently from a 1-token one")
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="which batch-1 prompts")
    ap.add_argument("--held-out-chats", default=None, metavar="CACHE[:N]",
                    help="also run the first N (24) chats of a bench.train_eagle chat cache, "
                         "which a head trained on it held out, and report their mean")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: every row samples at this temperature")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="for every row (greedy outputs must still be identical)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    PROMPTS["austen"] = (austen_prompt(), False)
    prompts: dict[str, tuple[str | list[int], bool]] = {
        name: PROMPTS[name] for name in filter(None, args.prompts.split(","))}
    if args.held_out_chats:
        prompts |= held_out_chats(args.held_out_chats)
    # Chat answers stop at their end of turn: past it the model loops, which any proposer
    # predicts, and ignore_eos would count that as speed-up. The novel has no end to stop at.
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        ap.error("--temperature must be >= 0, --top-p in (0, 1] and --repetition-penalty > 0")
    sampling = dict(temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)
    chat_params = SamplingParams(max_tokens=args.max_tokens, **sampling)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **sampling)
    sampled = args.temperature > 0
    batch_params = SamplingParams(max_tokens=args.batch_tokens, ignore_eos=True, **sampling)
    batch_sizes = [int(b) for b in args.batch.split(",") if b]
    notes = [f"Write a short note number {i} about {w}." for i, w in
             enumerate(["tea", "rain", "ships", "bread", "maps", "owls", "clocks",
                        "bees"] * (max(batch_sizes, default=0) // 8 + 1))]

    # All engines live side by side and runs alternate between them, so that load from other
    # work on the machine hits every method alike (../shared/FACTS.md: compare inside one run).
    methods = args.methods.split(",")
    llms: dict[str, LLM] = {}
    for method in methods:
        base, options = parse_method(method)
        spec = None if base == "none" else base
        llms[method] = LLM(None, num_threads=args.threads, dtype=args.dtype, speculative=spec,
                           kv_cache_bytes=256 << 20,
                           draft_model=options.pop("draft_model", args.draft_model)
                           if spec in ("eagle", "draft", "pool") else None,
                           num_speculative_tokens=options.pop("num_speculative_tokens", args.k)
                           if spec else None,
                           speculative_options=options or None)
        run_one(llms[method], "Hello", True, SamplingParams(max_tokens=4, temperature=0.0))

    rows: list[dict] = []
    for name, (prompt, chat) in prompts.items():
        rates: dict[str, list[float]] = {m: [] for m in methods}  # tokens/s of each run
        counts: dict[str, list[int]] = {m: [] for m in methods}
        tokens: dict[str, list[int]] = {}
        before = {m: spec_counts(llms[m]) for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                tokens[m], dt = run_one(llms[m], prompt, chat,
                                        chat_params if chat else params)
                rates[m].append(len(tokens[m]) / dt)
                counts[m].append(len(tokens[m]))
        for m in methods:
            d = [a - b for a, b in zip(spec_counts(llms[m]), before[m])]
            rows.append({
                # sampled answers differ in length from run to run: the median run's count
                "method": m, "prompt": name, "batch": 1, "tokens": statistics.median(counts[m]),
                "tokens_per_s": statistics.median(rates[m]),
                "identical": None if sampled else tokens[m] == tokens[methods[0]],
                "acceptance": d[1] / d[0] if d[0] else None,
                "mean_accepted_length": d[3] / d[2] if d[2] else None,
                "proposer_s_per_token": d[4] / sum(counts[m]) if m != "none" else None,
            })
            print(rows[-1], flush=True)
    for size in batch_sizes:
        batch_times: dict[str, list[float]] = {m: [] for m in methods}
        batch_out: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for m in methods:
                t0 = time.perf_counter()
                batch_out[m] = [t for o in llms[m].generate(notes[:size], batch_params)
                                for t in o.token_ids]
                batch_times[m].append(time.perf_counter() - t0)
        for m in methods:
            n = len(batch_out[m])
            rows.append({"method": m, "prompt": f"{size} notes", "batch": size,
                         "tokens": n, "tokens_per_s": n / statistics.median(batch_times[m]),
                         "identical": None if sampled else batch_out[m] == batch_out[methods[0]],
                         "acceptance": None, "mean_accepted_length": None,
                         "proposer_s_per_token": None})
            print(rows[-1], flush=True)

    # speed-ups and outputs are against the first method (plain decoding unless told otherwise)
    base = {(r["prompt"], r["batch"]): r["tokens_per_s"] for r in rows
            if r["method"] == methods[0]}
    print(f"\n| method | prompt | batch | tokens | tokens/s | speed-up over {methods[0]} | "
          "same output | acceptance | tokens/verify |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base[(r["prompt"], r["batch"])]
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        mal = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] is not None else "-"
        same = "-" if r["identical"] is None else r["identical"]
        print(f"| {r['method']} | {r['prompt']} | {r['batch']} | {r['tokens']} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {same} | {acc} | "
              f"{mal} |")
    for kind in ("chat", "held-out"):
        chats = {r["prompt"] for r in rows if r["prompt"].startswith(kind) and r["batch"] == 1}
        if not chats:
            continue
        print(f"\ngeometric mean speed-up over {methods[0]} on the {len(chats)} {kind} prompts:")
        for m in methods:
            ups = [r["speedup"] for r in rows if r["method"] == m and r["prompt"] in chats]
            print(f"  {m}: {statistics.geometric_mean(ups):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
