"""Distil a small draft model for speculative decoding from a Llama-family target, on CPU.

    python -m bench.train_draft --text ../shared/data/austen.txt --out DIR

What it makes (a Hugging Face folder the engine loads like any model, plus one extra file):
- A `num_layers`-layer Llama with the target's width, its layers initialised from the target's
  first layers, its final norm copied, and a *trimmed vocabulary*: the `vocab` most frequent
  target tokens of the text (plus the target's special tokens). Embedding and head are tied and
  start as the target's (tied) embedding rows for those tokens, so the draft's head is the
  target's head restricted to the kept tokens. A 49k-row head would cost as much as a good part
  of a 135M target; 4k rows cost a tenth of that.
- `draft_vocab.json`: {"target_ids": [...]}: draft id i stands for target id target_ids[i];
  draft id 0 is "unknown" (target id -1) and is never proposed.

Training is hard-label distillation (Hinton et al. 2015, with the teacher's argmax as the label):
the target scores the text once (teacher forcing), the draft learns to predict the target's
greedy next token, which is what greedy speculation needs to be accepted. Budgets are in seconds
so that it fits a shared 2-core machine (teacher ~2-3 min, student `--train-seconds`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

DRAFT_VOCAB_FILE = "draft_vocab.json"


def _load_target(model_dir: Path):
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    return model.eval()


@torch.inference_mode()
def teacher_labels(target, ids: torch.Tensor, seq_len: int, batch: int,
                   budget_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, seq_len] and the target's greedy next token at every position."""
    rows = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)
    inputs, labels = [], []
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        labels.append(target(input_ids=x).logits.argmax(-1))
        inputs.append(x)
        if time.perf_counter() - t0 > budget_s:
            break
    done = sum(len(x) for x in inputs) * seq_len
    print(f"teacher: {done} tokens in {time.perf_counter() - t0:.0f} s")
    return torch.cat(inputs), torch.cat(labels)


def choose_vocab(ids: torch.Tensor, labels: torch.Tensor, size: int,
                 special: list[int]) -> list[int]:
    """Draft id -> target id: 0 is unknown (-1), then the special tokens, then the most frequent
    teacher labels and text tokens."""
    counts = Counter(labels.flatten().tolist())
    counts.update(ids.flatten().tolist())
    keep = [-1] + [t for t in special if t >= 0]
    seen = set(keep)
    for t, _ in counts.most_common():
        if len(keep) >= size:
            break
        if t not in seen:
            keep.append(t)
            seen.add(t)
    return keep


def build_student(target, target_ids: list[int], num_layers: int):
    import transformers as tf

    tcfg = target.config
    cfg = tf.LlamaConfig(
        vocab_size=len(target_ids), hidden_size=tcfg.hidden_size,
        intermediate_size=tcfg.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=tcfg.num_attention_heads,
        num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
        max_position_embeddings=tcfg.max_position_embeddings, rms_norm_eps=tcfg.rms_norm_eps,
        rope_theta=getattr(tcfg, "rope_theta", None) or tcfg.rope_parameters["rope_theta"],
        tie_word_embeddings=True, bos_token_id=tcfg.bos_token_id,
        eos_token_id=tcfg.eos_token_id)
    student = tf.LlamaForCausalLM(cfg).float()
    src = target.model.embed_tokens.weight.float()
    rows = torch.tensor([max(t, 0) for t in target_ids])
    emb = src.index_select(0, rows).clone()
    emb[0] = src.mean(0)  # unknown: the mean embedding
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(emb)
        student.model.norm.weight.copy_(target.model.norm.weight.float())
        for i in range(num_layers):
            student.model.layers[i].load_state_dict(
                {k: v.float() for k, v in target.model.layers[i].state_dict().items()})
    student.tie_weights()
    return student


def train(student, inputs: torch.Tensor, labels: torch.Tensor, to_draft: torch.Tensor,
          batch: int, lr: float, budget_s: float, held_out: int) -> float:
    """AdamW with bf16 autocast; returns the held-out greedy agreement with the teacher."""
    x_all = to_draft[inputs]
    y_all = to_draft[labels]
    y_all[y_all == 0] = -100  # the teacher chose a token the draft cannot propose: no loss
    x_train, y_train = x_all[held_out:], y_all[held_out:]
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    step = 0
    student.train()
    while time.perf_counter() - t0 < budget_s:
        idx = torch.randint(0, len(x_train), (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = student(input_ids=x_train[idx]).logits
        logits = logits.float()
        logits[..., 0] = float("-inf")
        loss = F.cross_entropy(logits.flatten(0, 1), y_train[idx].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    student.eval()
    with torch.inference_mode():
        logits = student(input_ids=x_all[:held_out]).logits
        logits[..., 0] = float("-inf")
        pred = logits.argmax(-1)
    target = y_all[:held_out]
    agree = ((pred == target) & (target >= 0)).sum().item() / target.numel()
    print(f"held-out greedy agreement with the target: {agree:.3f}")
    return agree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target model folder (default: the default "
                   "model, SmolLM2-135M-Instruct)")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--teacher-seconds", type=float, default=150)
    p.add_argument("--train-seconds", type=float, default=360)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from cluster.default_model import resolve_model
    from text.tokenizer import Tokenizer

    target_dir = Path(args.target) if args.target else resolve_model(None)
    tok = Tokenizer.from_dir(target_dir)
    ids = torch.tensor(tok.encode(Path(args.text).read_text(), add_special_tokens=False))
    # Shuffle chunks so that the teacher budget covers all six novels, not only the first.
    chunks = ids[: (len(ids) // args.seq_len) * args.seq_len].view(-1, args.seq_len)
    chunks = chunks[torch.randperm(len(chunks))].flatten()
    target = _load_target(target_dir)
    inputs, labels = teacher_labels(target, chunks, args.seq_len, 8, args.teacher_seconds)
    special = sorted(set(tok.eos_token_ids) | {target.config.bos_token_id or 0, 0, 1, 2})
    target_ids = choose_vocab(inputs, labels, args.vocab, special)
    to_draft = torch.zeros(target.config.vocab_size, dtype=torch.long)
    to_draft[torch.tensor(target_ids[1:])] = torch.arange(1, len(target_ids))
    coverage = (to_draft[labels] > 0).float().mean().item()
    print(f"draft vocabulary {len(target_ids)} covers {coverage:.3f} of the teacher's tokens")

    student = build_student(target, target_ids, args.layers)
    del target
    held_out = max(1, len(inputs) // 20)
    agree = train(student, inputs, labels, to_draft, args.batch, args.lr, args.train_seconds,
                  held_out)
    out = Path(args.out)
    student.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({"target_ids": target_ids}))
    (out / "training.json").write_text(json.dumps({
        "target": str(target_dir.name), "text": Path(args.text).name, "vocab": len(target_ids),
        "layers": args.layers, "teacher_tokens": int(inputs.numel()),
        "train_seconds": args.train_seconds, "held_out_agreement": round(agree, 4),
        "teacher_coverage": round(coverage, 4)}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
