"""Capacity planning: will a model fit a GPU layout, how much KV is left, what a token costs.

All numbers are per rank (one GPU) of the most loaded pipeline stage:
- weights: each decoder layer's q/k/v/o and MLP matrices split over TP (KV heads replicated on
  tp / kv_heads ranks when tp > kv_heads, as QKVParallelLinear does); embedding and LM head split
  over the vocabulary, on the first and last pipeline stage; norms replicated. Quantization
  applies to the decoder linears only (embeddings and LM head stay in the activation dtype).
- KV per token: 2 (K and V) x layers on the stage x KV heads on the rank x head_dim x bytes.
- runtime headroom: a fixed allowance for the CUDA context, allocator and graphs, plus
  activations of the largest step (max_num_batched_tokens) and the fp32 logits of max_num_seqs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from worker.config import ModelConfig

GiB = 1 << 30

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
KNOWN_MODELS: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000, False),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000, False),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256, False),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000, False),
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, False),
}

GPUS: dict[str, float] = {  # usable device memory in GiB as the driver reports it
    "h100-80gb": 79.6, "h200-141gb": 139.8, "a100-40gb": 39.4, "a100-80gb": 79.2,
    "l4-24gb": 22.0, "a10g-24gb": 22.0, "l40s-48gb": 44.5, "rtx4090-24gb": 23.6,
}

# Bytes per weight of a decoder linear, (per element, per group of `group` elements) for the
# scale/zero overhead: int8 has one 2-byte scale per output row (~0 per element).
QUANT_BYTES: dict[str, tuple[float, int]] = {
    "int8": (1.0, 0), "int4": (0.5, 4), "gptq": (0.5, 4), "awq": (0.5, 4),
    "q4_0": (18 / 32, 0), "q4_1": (20 / 32, 0), "q8_0": (34 / 32, 0),
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_RUNTIME_FIXED = 1.5 * GiB  # CUDA context, cuBLAS/Triton workspaces, allocator slack, graphs


@dataclass
class PlanInput:
    tp: int = 1
    pp: int = 1
    quantization: str | None = None
    group_size: int = 128
    dtype: str = "bfloat16"
    kv_dtype: str | None = None  # None: same as dtype
    max_model_len: int = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    gpu: str = "h100-80gb"
    memory_utilization: float = 0.9
    price_per_hour: float | None = None  # per GPU
    tokens_per_s: float | None = None  # whole replica, output tokens


@dataclass
class Plan:
    model: str
    params: int
    gpus: int
    weight_bytes_per_rank: int
    kv_bytes_per_token: int  # whole model, no replication
    kv_bytes_per_token_per_rank: int
    runtime_bytes_per_rank: int
    usable_bytes_per_rank: int
    kv_budget_bytes_per_rank: int
    kv_tokens_capacity: int
    fits: bool
    max_seqs_at_max_len: int
    max_len_at_max_seqs: int
    requested_kv_bytes_per_rank: int
    cost_per_million_tokens: float | None


def model_shape(spec: str) -> tuple[str, ModelConfig]:
    """A built-in name, a Hugging Face folder (config.json) or a .gguf file."""
    key = spec.lower()
    if key in KNOWN_MODELS:
        h, inter, layers, heads, kv, vocab, tied = KNOWN_MODELS[key]
        cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": h,
               "intermediate_size": inter, "num_hidden_layers": layers,
               "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
               "tie_word_embeddings": tied}
        return key, ModelConfig.from_hf_dict(cfg)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from worker.gguf import hf_config, open_gguf

        return path.name, ModelConfig.from_hf_dict(hf_config(open_gguf(path)))
    if path.is_dir():
        return path.name, ModelConfig.from_hf_dir(path)
    raise ValueError(f"--model {spec!r} is not a known shape ({', '.join(KNOWN_MODELS)}), a "
                     "model folder with config.json, or a .gguf file")


def _linear_bytes(n: int, k: int, quantization: str | None, dtype_bytes: int,
                  group_size: int) -> float:
    if quantization is None:
        return n * k * dtype_bytes
    per_elem, group_extra = QUANT_BYTES[quantization]
    extra = n * (k / group_size) * group_extra if group_extra else n * 2 * (quantization == "int8")
    return n * k * per_elem + extra


def count_params(m: ModelConfig) -> int:
    attn = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    layer = attn + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer + embed + m.hidden_size


def plan(name: str, m: ModelConfig, p: PlanInput) -> Plan:
    if p.gpu not in GPUS:
        raise ValueError(f"--gpu {p.gpu!r} is unknown; known: {', '.join(GPUS)}")
    if p.quantization is not None and p.quantization not in QUANT_BYTES:
        raise ValueError(f"--quantization {p.quantization!r} is unknown; known: "
                         f"{', '.join(QUANT_BYTES)}")
    if m.num_heads % p.tp:
        raise ValueError(f"{m.num_heads} attention heads cannot be split over tp={p.tp}")
    if p.tp > m.num_kv_heads and p.tp % m.num_kv_heads:
        raise ValueError(f"tp={p.tp} must be a multiple of the {m.num_kv_heads} KV heads")
    if p.pp > m.num_layers:
        raise ValueError(f"pp={p.pp} exceeds the {m.num_layers} layers")
    wb = _DTYPE_BYTES[p.dtype]
    kvb = _DTYPE_BYTES[p.kv_dtype or p.dtype]
    h, hd, inter = m.hidden_size, m.head_dim, m.intermediate_size
    heads_r = m.num_heads // p.tp
    kv_r = max(1, m.num_kv_heads // p.tp)
    lin = [(heads_r * hd + 2 * kv_r * hd, h), (h, heads_r * hd), (2 * inter // p.tp, h),
           (h, inter // p.tp)]
    layer = sum(_linear_bytes(n, k, p.quantization, wb, p.group_size) for n, k in lin) + 2 * h * wb
    layers_r = math.ceil(m.num_layers / p.pp)
    vocab_r = math.ceil(m.vocab_size / p.tp)
    embed = vocab_r * h * wb
    head = 0 if (m.tie_word_embeddings and p.pp == 1) else vocab_r * h * wb
    # The most loaded stage: the first holds the embedding, the last the LM head (both if pp=1).
    ends = embed + head if p.pp == 1 else max(embed, head + h * wb)
    weights = int(layers_r * layer + ends)
    kv_tok = 2 * m.num_layers * m.num_kv_heads * hd * kvb
    kv_tok_r = 2 * layers_r * kv_r * hd * kvb
    acts = p.max_num_batched_tokens * (4 * h + 2 * (heads_r + 2 * kv_r) * hd
                                       + 3 * inter // p.tp) * wb
    logits = p.max_num_seqs * vocab_r * 4
    runtime = int(_RUNTIME_FIXED + acts + logits)
    usable = int(GPUS[p.gpu] * GiB * p.memory_utilization)
    budget = usable - weights - runtime
    capacity = max(0, budget // kv_tok_r)
    requested = kv_tok_r * p.max_num_seqs * p.max_model_len
    cost = None
    if p.price_per_hour is not None and p.tokens_per_s:
        cost = p.price_per_hour * p.tp * p.pp / (p.tokens_per_s * 3600) * 1e6
    return Plan(name, count_params(m), p.tp * p.pp, weights, kv_tok, kv_tok_r, runtime, usable,
                budget, capacity, budget >= requested, capacity // p.max_model_len,
                capacity // p.max_num_seqs, requested, cost)


def _gib(b: float) -> str:
    return f"{b / GiB:,.2f} GiB"


def render(pl: Plan, p: PlanInput) -> str:
    q = p.quantization or p.dtype
    rows = [
        ("model", f"{pl.model} ({pl.params / 1e9:,.2f} B params)"),
        ("layout", f"tp={p.tp} x pp={p.pp} = {pl.gpus} x {p.gpu}, weights {q}"),
        ("weights per rank", _gib(pl.weight_bytes_per_rank)),
        ("KV per token", f"{pl.kv_bytes_per_token:,} B (model), "
                         f"{pl.kv_bytes_per_token_per_rank:,} B per rank"),
        ("runtime headroom", _gib(pl.runtime_bytes_per_rank)),
        ("usable per rank", f"{_gib(pl.usable_bytes_per_rank)} ({p.memory_utilization:.0%})"),
        ("KV budget per rank", f"{_gib(pl.kv_budget_bytes_per_rank)} = "
                               f"{pl.kv_tokens_capacity:,} tokens"),
        ("requested KV", f"{p.max_num_seqs} seqs x {p.max_model_len} tokens = "
                         f"{_gib(pl.requested_kv_bytes_per_rank)} per rank"),
        ("fits", "yes" if pl.fits else "NO"),
        ("largest batch", f"{pl.max_seqs_at_max_len} seqs at {p.max_model_len} tokens"),
        ("longest context", f"{pl.max_len_at_max_seqs:,} tokens at {p.max_num_seqs} seqs"),
    ]
    if pl.cost_per_million_tokens is not None:
        rows.append(("cost", f"${pl.cost_per_million_tokens:,.3f} per million tokens at "
                             f"{p.tokens_per_s:,.0f} tok/s, ${p.price_per_hour}/GPU-hour"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(pl: Plan, p: PlanInput) -> str:
    return json.dumps({"input": asdict(p), "plan": asdict(pl)}, indent=2)
