"""How well EAGLE heads draft on the speculative benchmark's own prompts, offline, in seconds.

    python -m bench.eval_eagle [--heads DIR,DIR,...] [--json PATH]

The target (transformers, bf16) answers each batch-1 prompt of bench/speculative.py greedily (up
to 96 tokens, as the benchmark does), scores the whole sequence once, and each head drafts from
those features as the proposer does at run time. Per prompt: how often the first draft token is
the target's greedy token, and the mean number of draft tokens accepted in a row (of k). These
prompts are outside the heads' training data, so this is the number that predicts the
benchmark's speed-up; a head's held-out score in its eagle.json is measured in distribution.
Several heads are compared on the same answers in one run.

A calibration table follows: how often the head's three likeliest first draft tokens are right,
by the probability it gives them. The proposer verifies tree nodes down to
`eagle_tree_keep_prob` on the strength of this (docs/speculative.md).

`--temperatures 0.7,1` adds, per temperature T, the chance that the first draft token is
accepted when the request samples at T, for three ways to draft it: one point mass (the head's
top token x1: p_T(x1)), two sibling point masses as a width-2 tree walks them (p_T(x1) +
p_T(x2)), and a draw from the head's own distribution q_T checked by Leviathan's test
(sum of min(p_T, q_T)), with p_T the target's distribution at T (docs/speculative.md).
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

import torch

from bench.speculative import PROMPTS, austen_prompt
from bench.train_eagle import (
    calibration,
    chain_acceptance,
    first_token_accuracy,
    sampled_acceptance,
    teacher,
)
from worker.spec.eagle_head import SHIPPED_HEADS, load_eagle_head


@torch.inference_mode()
def answers(model, tok, max_tokens: int) -> dict[str, tuple[list[int], int]]:
    """prompt name -> (prompt + greedy answer token ids, where the answer starts)."""
    out = {}
    for name, (text, chat) in PROMPTS.items():
        if name == "austen":
            text = austen_prompt()
        if chat:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}])
            ids = tok.encode(rendered, add_special_tokens=False)
        else:
            ids = tok.encode(text)
        gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_ids if chat else None)
        out[name] = (gen[0].tolist(), len(ids))
    return out


CALIBRATION_EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


def print_calibration(rows: list[dict], heads: list[str]) -> None:
    """How often the head's top-3 first draft tokens are right, by the probability the head
    gives them (all prompts but the copy task): the price of a tree node."""
    edges = CALIBRATION_EDGES
    print("\n| head | head's probability | tokens | right | right / tokens |")
    print("| --- | --- | --- | --- | --- |")
    for folder in heads:
        pairs = [pair for r in rows if r["head"] == folder and r["prompt"] != "repetitive"
                 for pair in r["calibration"]]
        for lo, hi in pairwise(edges):
            inside = [hit for q, hit in pairs if lo <= q < hi or (hi == edges[-1] and q == hi)]
            if inside:
                print(f"| {Path(folder).name} | {lo:.2f}-{hi:.2f} | {len(inside)} | "
                      f"{sum(inside)} | {sum(inside) / len(inside):.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target folder (default: the default model)")
    p.add_argument("--heads", default=str(SHIPPED_HEADS / "SmolLM2-135M-Instruct"),
                   help="comma-separated head folders (default: the shipped head)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperatures", default="",
                   help="comma-separated sampling temperatures for the first-token acceptance "
                        "per drafting scheme (0: greedy)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    temperatures = [float(t) for t in args.temperatures.split(",") if t]
    if any(t < 0 for t in temperatures):
        p.error("--temperatures must be >= 0")
    torch.set_num_threads(args.threads)

    import transformers as tf

    from cluster.default_model import resolve_model
    from text.tokenizer import Tokenizer

    target_dir = Path(args.target) if args.target else resolve_model(None)
    tok = Tokenizer.from_dir(target_dir)
    model = tf.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).eval()
    seqs = answers(model, tok, args.max_tokens)
    names = list(seqs)
    embed, lm_head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    rows = []
    feats: dict[tuple[int, ...], list] = {}  # by the layers a head reads
    for folder in args.heads.split(","):
        head = load_eagle_head(Path(folder), embed, lm_head, torch.float32)
        layers = head.cfg.feature_layers
        if layers not in feats:
            feats[layers] = teacher(model, [seqs[n][0] for n in names], layers=layers)
        for name, (ids, h) in zip(names, feats[layers], strict=True):
            item = [(ids, h, seqs[name][1])]
            runs = chain_acceptance(head, item, args.k)
            rows.append({"head": folder, "prompt": name, "answer_tokens": len(ids) - seqs[name][1],
                         "first_token": first_token_accuracy(head, item),
                         "mean_run": sum(runs) / max(1, len(runs)),
                         "sampled": sampled_acceptance(head, item[0], lm_head, temperatures),
                         "calibration": calibration(head, item[0])})
    print(f"\n| head | prompt | answer tokens | first draft token right | mean run of {args.k} |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {Path(r['head']).name} | {r['prompt']} | {r['answer_tokens']} | "
              f"{r['first_token']:.3f} | {r['mean_run']:.2f} |")
    for folder in args.heads.split(","):
        chats = [r for r in rows if r["head"] == folder and r["prompt"].startswith("chat")]
        print(f"{Path(folder).name}: chat mean first token "
              f"{sum(r['first_token'] for r in chats) / len(chats):.3f}, mean run "
              f"{sum(r['mean_run'] for r in chats) / len(chats):.2f}")
    if temperatures:
        print("\n| head | T | one point mass | two siblings | a draw from q_T |")
        print("| --- | --- | --- | --- | --- |")
        for folder in args.heads.split(","):
            mine = [r for r in rows if r["head"] == folder and r["prompt"] != "repetitive"]
            for t in temperatures:
                mean = [sum(r["sampled"][t][j] for r in mine) / len(mine) for j in range(3)]
                print(f"| {Path(folder).name} | {t:g} | {mean[0]:.3f} | {mean[1]:.3f} | "
                      f"{mean[2]:.3f} |")
        print("(means over all prompts but the copy task)")
    print_calibration(rows, args.heads.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
