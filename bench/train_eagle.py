"""Train an EAGLE draft head (worker/spec/eagle_head.py) for a Llama-family target, on CPU.

    python -m bench.train_eagle --out DIR [--chats 600] [--self-written 0] [--train-seconds 900]
    python -m bench.train_eagle --generate-only --cache MORE.json --chats 0 --self-written N --seed S
    python -m bench.train_eagle --out DIR --cache CHATS.json,MORE.json [--resume DIR] ...

Data is the target's own: its greedy answers to templated chat prompts and to user queries it
writes itself (Magpie: given the chat template up to a user turn, it writes the request),
generated here with Tandem's engine, and Jane Austen's novels (../shared/data/austen.txt). The
templates' topics and the kept queries stay off the benchmark's questions. The target scores
every sequence once (teacher forcing) and keeps its last hidden state per position; labels are
its next-token distribution over the head's vocabulary, which the frozen head computes from
those features, so nothing of vocabulary size is stored.

Training follows EAGLE: a classification loss (soft cross-entropy against the target) plus a
feature regression loss (smooth L1 towards the target's hidden state). A second pass feeds the
head's own feature guesses back in (as later draft steps do), so drafts past the first token are
trained on what they will see. Held-out chats measure what matters: how many draft tokens in a
row match the target's greedy tokens.

Writes DIR/eagle.safetensors (the head's trained weights) and DIR/eagle.json (its config, the
training record and the held-out numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from itertools import zip_longest
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from worker.config import ConfigError
from worker.spec.eagle_head import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EagleHead,
    EagleHeadConfig,
    check_feature_layers,
    save_eagle_head,
)

AUSTEN = Path(__file__).parents[1].parent / "shared" / "data" / "austen.txt"

TEMPLATES = [
    "Explain in a few sentences {}.", "Why does {} matter? Answer briefly.",
    "Write a short paragraph about {}.", "What should I know about {}?",
    "Give me three tips about {}.", "Describe {} to a child.",
    "Summarize the main ideas of {}.", "What are the pros and cons of {}?",
    "Write a short email to a friend about {}.", "Tell me a short story involving {}.",
    "How would you teach {} to a beginner?", "List some common mistakes people make with {}.",
    "Write a haiku about {}.", "What is a fun fact about {}?",
    "Compare {} with something from everyday life.", "Answer in one sentence: what is {}?",
    "How does {} work?", "What is the history of {}?", "Can you explain {} in simple terms?",
    "Write the opening of a blog post about {}.", "Give me five facts about {}.",
    "I am new to {}. Where should I start?", "Write a short dialogue between two friends about {}.",
    "What questions do people often ask about {}?",
]
# The benchmark asks about the sky; no topic here is about the sky, light or colour.
TOPICS = [
    "how plants grow", "the history of the printing press", "learning to play the guitar",
    "saving money", "how vaccines work", "the water cycle", "training a puppy",
    "making bread at home", "the French revolution", "black holes", "climate change",
    "how computers store data", "running a marathon", "the Roman empire", "healthy sleep habits",
    "how airplanes fly", "the stock market", "writing a resume", "volcanoes",
    "the importance of bees", "learning a new language", "photosynthesis", "the internet",
    "electric cars", "meditation", "the moon landing", "recycling", "cooking rice", "friendship",
    "time management", "the human heart", "earthquakes", "chess openings", "ocean tides",
    "renewable energy", "public speaking", "the solar system", "gardening in small spaces",
    "how memory works", "the invention of the telephone", "coffee", "dinosaurs", "team work",
    "the immune system", "artificial intelligence", "rainforests", "how bridges are built",
    "the Olympic games", "bicycles", "music theory", "honey", "deserts", "owls", "city planning",
    "fishing", "mountains", "penguins", "libraries", "job interviews", "knitting",
    "ancient Egypt", "the human brain", "starting a small business", "yoga", "tea ceremonies",
    "the history of jazz", "wind turbines", "caring for houseplants", "the Great Wall of China",
    "first aid", "recursion in programming", "sorting algorithms", "databases", "taxes",
    "mortgages", "the printing of books", "the life of Marie Curie", "Shakespeare's plays",
    "the theory of evolution", "coral reefs", "the Amazon river", "hiking safety", "camping",
    "baking cookies", "wine making", "the history of chess", "board games", "video game design",
    "photography basics", "learning to swim", "the metric system", "fractions", "prime numbers",
    "probability", "the scientific method", "gravity", "magnets", "electricity at home",
    "nuclear power", "the periodic table", "the Industrial Revolution", "the Vikings",
    "medieval castles", "the Silk Road", "volunteering", "parenting teenagers", "online privacy",
    "passwords", "remote work", "negotiating a salary", "writing poetry",
    "the history of medicine", "glaciers", "sharks", "the French language", "origami",
    "how batteries work", "the Renaissance", "the Egyptian pyramids", "soccer", "basketball",
    "the history of the bicycle", "how elevators work", "smartphones", "social media",
    "climbing", "skiing", "bird migration", "whales", "ants", "spiders", "mushrooms",
    "the history of writing", "how maps are made", "navigation at sea", "canals",
    "trains", "the history of aviation", "submarines", "space stations", "Mars", "comets",
    "the Big Bang", "quantum computers", "encryption", "open source software", "spreadsheets",
    "learning to code", "debugging a program", "the Python language", "web browsers",
    "email etiquette", "writing a cover letter", "starting a podcast", "journaling",
    "minimalism", "budget travel", "packing for a trip", "learning to drive", "public transport",
    "saving energy at home", "composting", "beekeeping", "raising chickens", "vegetable gardens",
    "growing tomatoes", "making pasta", "pizza", "chocolate", "cheese making", "fermentation",
    "vitamins", "drinking enough water", "stretching", "strength training", "walking every day",
    "stress", "procrastination", "habits", "motivation", "kindness", "gratitude",
    "handling criticism", "making friends as an adult", "moving to a new city", "retirement",
    "insurance", "credit cards", "inflation", "supply and demand", "the history of money",
    "democracy", "the United Nations", "human rights", "the printing of newspapers",
    "ancient Greece", "the Aztecs", "the samurai", "the history of the Olympic marathon",
    "opera", "ballet", "pottery", "sculpture", "film making",
    "the history of cinema", "stand-up comedy", "magic tricks", "puzzles", "crossword puzzles",
    "math anxiety", "geometry", "algebra", "statistics", "the number zero", "infinity",
    "the speed of sound", "rivers", "snow", "hurricanes", "dams",
]


def chat_prompts(n: int, seed: int) -> list[str]:
    prompts = [t.format(x) for t in TEMPLATES for x in TOPICS]
    random.Random(seed).shuffle(prompts)
    if n > len(prompts):
        raise SystemExit(f"--chats {n}: there are only {len(prompts)} templated prompts")
    return prompts[:n]


# Self-written queries must stay off the benchmark's questions (bench/speculative.py), so that
# those stay unseen.
BENCHMARK_TOPICS = re.compile(r"\bsky\b|\bblue\b|\bautumn\b|\bfall leaves\b|\btea\b|"
                              r"\bfrance\b|\bparis\b|\bengines?\b", re.IGNORECASE)


def usable_query(text: str, num_tokens: int) -> bool:
    """A self-written query worth answering: a real request (6+ tokens), in English (a few
    non-ASCII characters at most: the model drifts into other languages and scripts at times),
    and not about the benchmark's topics."""
    ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
    return num_tokens >= 6 and ascii_share > 0.97 and not BENCHMARK_TOPICS.search(text)


def self_written_queries(llm, n: int, seed: int) -> list[str]:
    """User turns the target writes itself (Magpie, Xu et al. 2024): given the chat template
    up to the start of a user turn, an instruction-tuned model writes a plausible request. They
    are far more varied than templates and follow what users of this model ask. Kept: the ones
    that end by themselves, read as English and avoid the benchmark's topics."""
    from protos.messages import SamplingParams

    pre = llm.render_chat([{"role": "user", "content": "\x00"}])
    pre = pre[:pre.index("\x00")]
    t0 = time.perf_counter()
    outs = llm.generate([pre] * n, [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=80,
                                                   seed=seed * 1_000_003 + i) for i in range(n)],
                        use_tqdm=True)
    kept, seen = [], set()
    for o in outs:
        q = o.text.strip()
        if o.finish_reason == "stop" and usable_query(q, len(o.token_ids)) and q.lower() not in seen:
            kept.append(q)
            seen.add(q.lower())
    print(f"self-written queries: kept {len(kept)} of {n} "
          f"({sum(len(o.token_ids) for o in outs)} tokens in {time.perf_counter() - t0:.0f} s)")
    return kept


def generate_chats(model_dir: Path, prompts: list[str], self_written: int, seed: int,
                   max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy answer) token ids, from Tandem's own engine (bf16, batched), for the
    templated prompts and `self_written` queries the target writes itself."""
    from cluster.llm import LLM
    from protos.messages import SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=64)
    if self_written:
        queries = self_written_queries(llm, self_written, seed)
        # interleaved with the templates, so the held-out chats (the first ones) have both
        prompts = [p for pair in zip_longest(prompts, queries) for p in pair if p is not None]
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=True)
    n = sum(len(o.token_ids) for o in outs)
    print(f"chats: {len(outs)} answers, {n} tokens in {time.perf_counter() - t0:.0f} s")
    seqs = [(list(o.prompt_token_ids), list(o.token_ids)) for o in outs]
    del llm
    return seqs


@torch.inference_mode()
def teacher(model, seqs: list[list[int]], batch: int = 8,
            layers: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, features, bf16) per sequence: the residual stream entering each decoder layer of
    `layers`, then the target's last hidden state after its final norm, side by side. Batches
    are padded on the right, which a causal model's real positions never see."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    streams: list[torch.Tensor] = []
    hooks = [model.model.layers[i].register_forward_pre_hook(
        lambda _m, args, kwargs: streams.append(
            (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            .to(torch.bfloat16)), with_kwargs=True) for i in layers]
    t0 = time.perf_counter()
    try:
        for a in range(0, len(order), batch):
            group = order[a:a + batch]
            width = max(len(seqs[i]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for r, i in enumerate(group):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            streams.clear()
            final = model.model(input_ids=ids).last_hidden_state.to(torch.bfloat16)
            h = torch.cat([*streams, final], dim=-1)
            for r, i in enumerate(group):
                out[i] = (ids[r, :len(seqs[i])].clone(), h[r, :len(seqs[i])].clone())
    finally:
        for hook in hooks:
            hook.remove()
    n = sum(len(s) for s in seqs)
    print(f"teacher: {n} tokens in {time.perf_counter() - t0:.0f} s")
    return [o for o in out if o is not None]


# ids, target features (streams ++ final feature, EagleHead.project), first position with a loss
Item = tuple[torch.Tensor, torch.Tensor, int]


def _final(feats: torch.Tensor, hidden: int) -> torch.Tensor:
    """The target's final feature out of a row of features: what its LM head reads."""
    return feats[..., -hidden:]


def _predictions(data: list[Item], lm_head: torch.Tensor) -> Counter[int]:
    """How often the target predicts each token here."""
    counts: Counter[int] = Counter()
    for _, h, _ in data:
        counts.update(F.linear(_final(h, lm_head.shape[1]), lm_head).argmax(-1).tolist())
    return counts


def choose_vocab(data: list[Item], lm_head: torch.Tensor,
                 size: int) -> tuple[list[int], float]:
    """The `size` tokens the target predicts most often here, most frequent first, and how
    many of its predictions they cover."""
    counts = _predictions(data, lm_head)
    vocab = [t for t, _ in counts.most_common(size)]
    covered = sum(counts[t] for t in vocab) / max(1, sum(counts.values()))
    return vocab, covered


def _shift(feat: torch.Tensor) -> torch.Tensor:
    """Features before each position: row i gets row i-1, row 0 gets zeros."""
    return torch.cat((torch.zeros_like(feat[..., :1, :]), feat[..., :-1, :]), dim=-2)


def _batch(items: list[Item]) -> tuple[torch.Tensor, ...]:
    """Padded ids and features, and the positions that carry a loss: a chat's answer only (its
    prompt is context: the same system prompt in every chat would otherwise dominate)."""
    t = max(len(ids) for ids, _, _ in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    feats = torch.zeros(len(items), t, items[0][1].shape[-1])
    mask = torch.zeros(len(items), t, dtype=torch.bool)
    for i, (x, h, start) in enumerate(items):
        ids[i, :len(x)], feats[i, :len(x)], mask[i, start:len(x)] = x, h.float(), True
    return ids, feats, mask


def train(head: EagleHead, data: list[Item], held: list[Item], batch: int, lr: float,
          budget_s: float, feature_weight: float, ce_fraction: float,
          true_context: bool = False) -> dict[str, float]:
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    step, log, next_eval = 0, {}, 0.0
    head.train()
    while (elapsed := time.perf_counter() - t0) < budget_s:
        if elapsed >= next_eval:
            log = {"step": step, "seconds": round(elapsed),
                   "held_out_first_token": round(first_token_accuracy(head, held), 4)}
            print(f"step {step} ({log['seconds']} s): held-out first-token accuracy "
                  f"{log['held_out_first_token']:.3f}")
            next_eval = elapsed + budget_s / 8
            head.train()
        ids, feats, mask = _batch(random.sample(data, batch))
        positions = torch.arange(ids.shape[1])
        final = _final(feats, head.cfg.hidden_size)
        # The classification loss needs [rows, vocab] logits, most of a step's cost: it is taken
        # on a random `ce_fraction` of the rows, the feature loss on all of them.
        sel = mask & (torch.rand(mask.shape) < ce_fraction)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                target = F.softmax(head.logits(final[sel]).float(), dim=-1)
            g1, k1, v1 = head.layer(ids, _shift(head.project(feats)), positions)
            # the second draft token: fed the head's own guess, its cache the first pass's rows
            g2, _, _ = head.layer(ids, _shift(g1), positions,
                                  context=(k1, v1) if true_context else None)
            loss = torch.zeros(())
            for g in (g1, g2):
                reg = F.smooth_l1_loss(g.float(), final, reduction="none").mean(-1)
                ce = -(target * F.log_softmax(head.logits(g[sel]).float(), dim=-1)).sum(-1)
                loss = loss + feature_weight * (reg * mask).sum() / mask.sum() + ce.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        # warm-up over 50 steps, then a cosine decay over the time budget
        frac = min(1.0, (time.perf_counter() - t0) / budget_s)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    log = {"step": step, "seconds": round(time.perf_counter() - t0),
           "held_out_first_token": round(first_token_accuracy(head, held), 4)}
    head.eval()
    return log


@torch.inference_mode()
def first_token_accuracy(head: EagleHead, held: list[Item]) -> float:
    """How often the head's first draft token (from the target's true features) is the target's
    own greedy next token."""
    head.eval()
    hits = total = 0
    to_target = torch.tensor(head.cfg.vocab)
    for ids, h, start in held:
        g, _, _ = head.layer(ids[None], _shift(head.project(h.float()[None])),
                             torch.arange(len(ids)))
        pred = to_target[head.logits(g[0]).argmax(-1)]
        # the target's greedy token among the head's vocabulary (which covers ~all of them)
        want = to_target[F.linear(_final(h.float(), head.cfg.hidden_size),
                                  head.head.float()).argmax(-1)]
        hits += int((pred[start:] == want[start:]).sum())
        total += len(ids) - start
    return hits / max(1, total)


@torch.inference_mode()
def sampled_acceptance(head: EagleHead, item: Item, lm_head: torch.Tensor,
                       temperatures: list[float]) -> dict[float, tuple[float, float, float]]:
    """Per temperature, the mean chance over an answer's positions that the first draft token is
    accepted: (one point mass, two sibling point masses, a draw from q_T)."""
    ids, h, start = item
    g, _, _ = head.layer(ids[None], _shift(head.project(h.float()[None])),
                         torch.arange(len(ids)))
    hl = head.logits(g[0])[start:]  # [n, draft vocabulary]
    tl = F.linear(_final(h.float(), head.cfg.hidden_size), lm_head.float())[start:]
    vocab = torch.tensor(head.cfg.vocab)
    top = hl.topk(2, -1).indices
    out = {}
    for t in temperatures:
        if t == 0:
            p = F.one_hot(tl.argmax(-1), tl.shape[-1]).float()
            q = F.one_hot(hl.argmax(-1), hl.shape[-1]).float()
        else:
            p, q = (tl / t).softmax(-1), (hl / t).softmax(-1)
        pv = p[:, vocab]  # p over the head's vocabulary
        out[t] = (float(pv.gather(1, top[:, :1]).mean()), float(pv.gather(1, top).sum(1).mean()),
                  float(torch.minimum(pv, q).sum(1).mean()))
    return out


@torch.inference_mode()
def calibration(head: EagleHead, item: Item, ranks: int = 3) -> list[tuple[float, bool]]:
    """(the head's probability, whether it is the token the answer has next) for each of the
    head's `ranks` likeliest first draft tokens at every answer position: a calibrated head's
    tokens of probability p are right about p of the time, which is what lets the proposer
    price a tree's nodes by their probability."""
    ids, h, start = item
    g, _, _ = head.layer(ids[None], _shift(head.project(h.float()[None])),
                         torch.arange(len(ids)))
    top = head.logits(g[0, start:len(ids) - 1]).softmax(-1).topk(ranks, -1)
    tokens = torch.tensor(head.cfg.vocab)[top.indices]
    hits = tokens == ids[start + 1:, None]
    return list(zip(top.values.flatten().tolist(), hits.flatten().tolist(), strict=True))


@torch.inference_mode()
def chain_acceptance(head: EagleHead, data: list[Item], k: int) -> list[int]:
    """For each held-out answer position n (after the first answer token, where drafting
    starts at run time): how many draft tokens in a row (up to k)
    equal the sequence's own next tokens, drafting as the proposer does at run time (the cache
    holds positions 0..n computed from the target's features, then the head feeds itself)."""
    to_target = torch.tensor(head.cfg.vocab)
    lengths = []
    for ids, h, start in data:
        pos = torch.arange(len(ids))
        g, keys, values = head.layer(ids, _shift(head.project(h.float())), pos,
                                     cache=(torch.zeros(head.cfg.num_kv_heads, 0,
                                                        head.cfg.head_dim),) * 2)
        for n in range(start + 1, len(ids) - 1, 2):
            cache = (keys[:, :n + 1], values[:, :n + 1])
            feat, accepted = g[n], 0
            for j in range(k):
                tok = to_target[head.logits(feat).argmax()]
                if n + 1 + j >= len(ids) or tok != ids[n + 1 + j]:
                    break
                accepted += 1
                if j == k - 1:
                    break
                feat2, k2, v2 = head.layer(tok[None], feat[None], pos[n + 1 + j:n + 2 + j],
                                           cache=cache)
                cache = (torch.cat((cache[0], k2), 1), torch.cat((cache[1], v2), 1))
                feat = feat2[0]
            lengths.append(accepted)
    return lengths


def init_from_last_layer(head: EagleHead, model) -> None:
    """Start the layer from the target's last decoder layer: it already maps features to
    features of the right scale."""
    last = model.model.layers[-1]
    with torch.no_grad():
        head.q_proj.weight.copy_(last.self_attn.q_proj.weight.float())
        head.k_proj.weight.copy_(last.self_attn.k_proj.weight.float())
        head.v_proj.weight.copy_(last.self_attn.v_proj.weight.float())
        head.o_proj.weight.copy_(last.self_attn.o_proj.weight.float())
        head.gate_up.weight.copy_(torch.cat((last.mlp.gate_proj.weight,
                                             last.mlp.up_proj.weight)).float())
        head.down.weight.copy_(last.mlp.down_proj.weight.float())
        head.input_norm.weight.copy_(last.input_layernorm.weight.float())
        head.post_attention_norm.weight.copy_(last.post_attention_layernorm.weight.float())
        head.out_norm.weight.copy_(model.model.norm.weight.float())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target folder (default: the default model)")
    p.add_argument("--out", default=None, help="where to write the head (needed unless "
                   "--generate-only)")
    p.add_argument("--chats", type=int, default=600, help="templated chat prompts")
    p.add_argument("--self-written", type=int, default=0,
                   help="user queries the target writes itself to sample (about 80%% are kept)")
    p.add_argument("--held-out", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--austen-tokens", type=int, default=60000)
    p.add_argument("--vocab", type=int, default=None,
                   help="draft vocabulary: the target's most often predicted tokens (default "
                        "8192; with --resume, the head's own, which a larger value grows)")
    p.add_argument("--feature-layers", default="",
                   help="comma-separated target layers whose input streams the head reads "
                        "besides the final feature (EAGLE-3), e.g. 2,15,27; empty: EAGLE-1")
    p.add_argument("--train-seconds", type=float, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--ce-fraction", type=float, default=0.25,
                   help="share of positions that get the classification loss")
    p.add_argument("--true-context", action="store_true",
                   help="the second pass attends to the first pass's rows before each position "
                        "(as the second draft token does at run time), not to its own")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None,
                   help="keep the generated chats in this file; several files, comma-separated, "
                        "are read in order and joined (each made by its own run, e.g. with "
                        "another --seed and --generate-only)")
    p.add_argument("--generate-only", action="store_true",
                   help="generate the chats into --cache and stop")
    p.add_argument("--features", default=None,
                   help="keep the target's features in this file (~1.2 KB per token per "
                        "feature layer, plus one)")
    p.add_argument("--resume", default=None,
                   help="continue training the head in this folder (with its vocabulary, "
                        "grown to --vocab if that is larger)")
    args = p.parse_args(argv)
    try:
        layers = tuple(int(x) for x in args.feature_layers.split(",") if x.strip())
    except ValueError:
        p.error(f"--feature-layers {args.feature_layers!r}: give layer numbers, e.g. 2,15,27")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    import transformers as tf

    from cluster.default_model import resolve_model
    from text.tokenizer import Tokenizer

    target_dir = Path(args.target) if args.target else resolve_model(None)
    caches = [Path(c) for c in args.cache.split(",") if c.strip()] if args.cache else []
    if args.generate_only and len(caches) != 1:
        p.error("--generate-only writes the chats to one --cache file: give one")
    if not args.generate_only and args.out is None:
        p.error("--out DIR is needed to write the head (or give --generate-only)")
    if len(caches) > 1 and (missing := [str(c) for c in caches if not c.is_file()]):
        p.error(f"--cache: {', '.join(missing)} not found; make each file first by a run "
                "with that one --cache and --generate-only")
    if caches and caches[0].is_file():
        chats = [pair for c in caches for pair in json.loads(c.read_text())]
    else:
        chats = generate_chats(target_dir, chat_prompts(args.chats, args.seed),
                               args.self_written, args.seed, args.max_tokens)
        if caches:
            caches[0].write_text(json.dumps(chats))
    if args.generate_only:
        print(f"{caches[0]}: {len(chats)} chats")
        return 0
    prose: list[list[int]] = []
    if args.austen_tokens > 0:
        text = Tokenizer.from_dir(target_dir).encode(AUSTEN.read_text(), add_special_tokens=False)
        chunk = 256
        offsets = list(range(0, len(text) - chunk, chunk))
        random.shuffle(offsets)
        prose = [text[o:o + chunk] for o in offsets[:args.austen_tokens // chunk]]

    model = tf.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).eval()
    try:
        check_feature_layers(layers, model.config.num_hidden_layers)
    except ConfigError as e:
        p.error(f"--feature-layers: {e}")
    features = Path(args.features) if args.features else None
    saved = torch.load(features) if features is not None and features.is_file() else None
    if saved is not None and tuple(saved["layers"]) == layers:
        items = saved["items"]
    else:
        whole = [a + b for a, b in chats]
        starts = [len(prompt) - 1 for prompt, _ in chats] + [0] * len(prose)
        items = [(ids, h, start) for (ids, h), start in
                 zip(teacher(model, whole + prose, layers=layers), starts, strict=True)]
        if features is not None:
            torch.save({"layers": layers, "items": items}, features)
    held, data = items[:args.held_out], items[args.held_out:]
    lm_head = model.lm_head.weight.detach()
    embed = model.model.embed_tokens.weight.detach()
    previous: dict = {}
    if args.resume:
        # A head trained on the final feature alone can grow feature layers: they start unused
        # (EagleHead's feature_proj), so training begins from what it drafts already. It keeps
        # its vocabulary, or grows it to a larger --vocab.
        previous = json.loads((Path(args.resume) / CONFIG_FILE).read_text())
        old = msgspec.convert(previous["config"], EagleHeadConfig)
        if old.feature_layers and old.feature_layers != layers:
            p.error(f"--resume {args.resume} reads layers {old.feature_layers}; "
                    f"give --feature-layers {','.join(map(str, old.feature_layers))}")
        vocab = list(old.vocab)
        covered = previous.get("vocab_coverage", 0.0)
        if args.vocab is not None and args.vocab > len(vocab):
            # The head's logits are the target's LM head rows of its vocabulary, so new tokens
            # need no new weights: the trained layer is kept and learns to point at them too.
            counts = _predictions(data, lm_head)
            have = set(vocab)
            vocab += [t for t, _ in counts.most_common() if t not in have][:args.vocab - len(vocab)]
            covered = sum(counts[t] for t in vocab) / max(1, sum(counts.values()))
            print(f"head vocabulary grown from {len(old.vocab)} to {len(vocab)} tokens, "
                  f"covering {covered:.3f} of the target's predictions")
        head = EagleHead(msgspec.structs.replace(old, feature_layers=layers, vocab=tuple(vocab)))
        weights = {k: v.float() for k, v in load_file(str(Path(args.resume) / WEIGHTS_FILE)).items()}
        missing, unexpected = head.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith(("feature_proj", "stream_norm")) for k in missing):
            raise SystemExit(f"--resume {args.resume}: not a head of this shape "
                             f"(missing {missing}, unexpected {unexpected})")
    else:
        vocab, covered = choose_vocab(data, lm_head, args.vocab or 8192)
        print(f"head vocabulary {len(vocab)} covers {covered:.3f} of the target's predictions")
        tcfg = model.config
        head = EagleHead(EagleHeadConfig(
            hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size,
            num_heads=tcfg.num_attention_heads, num_kv_heads=tcfg.num_key_value_heads,
            head_dim=tcfg.head_dim, rms_norm_eps=tcfg.rms_norm_eps,
            rope_theta=float(getattr(tcfg, "rope_theta", None)
                             or tcfg.rope_parameters["rope_theta"]),
            vocab=tuple(vocab), feature_layers=layers))
        init_from_last_layer(head, model)
    head.attach_target(embed.float(), lm_head.float())
    del model

    log = train(head, data, held, args.batch, args.lr, args.train_seconds, args.feature_weight,
                args.ce_fraction, args.true_context)
    # Held-out answers start after the prompt; measure drafting inside the answers only.
    lengths = chain_acceptance(head, held, args.k)
    first = sum(n >= 1 for n in lengths) / len(lengths)
    mean = sum(lengths) / len(lengths)
    print(f"held-out: first draft token right {first:.3f}, mean run {mean:.2f} of {args.k} "
          f"({len(lengths)} starts)")

    out = Path(args.out)
    record = {"target": target_dir.name,
              "command": " ".join(["python -m bench.train_eagle", *(argv or sys.argv[1:])]),
              # the commands that made the head this one resumed, oldest first
              "history": [*previous.get("history", []), previous["command"]] if previous else [],
              "chats": len(chats) - args.held_out, "austen_tokens": sum(map(len, prose)),
              "vocab_coverage": round(covered, 4), "train": log,
              "train_seconds_total": log["seconds"] + previous.get(
                  "train_seconds_total", previous.get("train", {}).get("seconds", 0)),
              "held_out": {"chats": len(held), "first_token": round(first, 4),
                           "mean_run": round(mean, 3), "k": args.k,
                           "runs": dict(sorted(Counter(lengths).items()))}}
    save_eagle_head(head, out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
