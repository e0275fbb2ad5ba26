"""The EAGLE draft head: one decoder layer that drafts from the target's own features.

EAGLE (Li et al. 2024) drafts at the feature level: the input at position i is the target's
last hidden state at i-1 (what the target "knew" before token i) fused with the embedding of
token i; one decoder layer turns that into a guess of the target's hidden state at i, and the
target's own LM head, restricted to the most frequent tokens, reads the next token off it.
Further draft tokens feed the head's guess back in place of the target's feature. Because the
layer sees what 30 target layers computed, one layer predicts the next token far better than a
small standalone model can; and because it is one layer plus a trimmed head, a draft token
costs a few percent of a target step.

The same module trains (whole sequences, causal mask) and drafts (a KV cache per sequence,
appended a few rows at a time): `bench/train_eagle.py` makes its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kernels.linear import linear
from kernels.rmsnorm import rms_norm
from worker.config import ConfigError


class EagleHeadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Shapes of the head; the attention and MLP shapes are the target's."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # draft id -> target id; the head scores only these tokens (most frequent first).
    vocab: tuple[int, ...]
    # Target decoder layers whose input (the residual stream entering them) the head reads
    # besides the final feature, as EAGLE-3 fuses low, middle and high layers; () reads the
    # final feature alone (EAGLE-1/2).
    feature_layers: tuple[int, ...] = ()


def check_feature_layers(layers: tuple[int, ...], num_layers: int) -> None:
    """Raises ConfigError unless `layers` are decoder layers of a target with `num_layers`, in
    increasing order: the order a forward meets them, so the order of the streams in a row of
    features."""
    if list(layers) != sorted(set(layers)) or any(not 0 < i < num_layers for i in layers):
        raise ConfigError(
            f"EAGLE feature layers {list(layers)}: give layers of 1..{num_layers - 1} (0 is the "
            "embedding, which the head reads anyway) in increasing order")


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _lin(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # kernels.linear streams bf16 weights for a few rows at a time (drafting); training in fp32
    # (or under autocast) falls through to F.linear.
    return linear(x, layer.weight)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            holes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of t new rows ([heads, t, d], the last t of the keys) over [kv_heads, L, d]
    keys and values, causal among the new rows; `holes` ([t] int64, tree drafting) hides more
    keys as in kernels/paged_attention.py. Two batched matmuls over the query heads
    grouped by KV head: a few rows against a few hundred keys is all overhead in torch's SDPA
    (its generic path repeats the KV heads and builds a float mask)."""
    heads, t, d = q.shape
    kv, length = keys.shape[0], keys.shape[1]
    group = heads // kv
    dtype = q.dtype
    # fp32: torch's bf16 bmm of these shapes is several times slower on CPU
    q, keys, values = q.float(), keys.float(), values.float()
    scores = torch.bmm(q.reshape(kv, group * t, d), keys.transpose(1, 2))
    scores *= d ** -0.5
    if t > 1:
        blocked = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores[:, :, length - t:].masked_fill_(blocked.repeat(group, 1), float("-inf"))
    if holes is not None:
        own = torch.arange(length - t, length, device=q.device).unsqueeze(1)
        back = own - torch.arange(length, device=q.device).unsqueeze(0)  # [t, L]
        hidden = (back >= 0) & (back < 64) & (
            (holes.unsqueeze(1) >> back.clamp(0, 63)) & 1).bool()
        scores.view(kv, group, t, length).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, values).view(heads, t, d).to(dtype)


def _attend_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ctx: torch.Tensor,
                    v_ctx: torch.Tensor) -> torch.Tensor:
    """Row i of q ([B, heads, T, d]) over the context's keys before i and its own key k[i]."""
    group = q.shape[1] // k.shape[1]
    k_ctx, v_ctx = (x.repeat_interleave(group, dim=1) for x in (k_ctx, v_ctx))
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    scores = torch.matmul(q, k_ctx.transpose(-1, -2)) * scale
    earlier = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(-1)
    scores = scores.masked_fill(~earlier, float("-inf"))
    own = (q * k).sum(-1, keepdim=True) * scale
    probs = torch.softmax(torch.cat((scores, own), dim=-1).float(), dim=-1).to(q.dtype)
    return torch.matmul(probs[..., :t], v_ctx) + probs[..., t:] * v


def _norm(norm: _RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # Drafting (no autograd) takes the C kernel; training needs torch's differentiable one.
    if torch.is_grad_enabled() or norm.weight.dtype != x.dtype:
        return norm(x)
    return rms_norm(x.contiguous(), norm.weight, norm.eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class EagleHead(nn.Module):
    """fc(embed(x_i) ++ feature_{i-1}) -> decoder layer -> norm -> feature guess -> head."""

    def __init__(self, cfg: EagleHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.input_norm = _RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.post_attention_norm = _RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.out_norm = _RMSNorm(d, cfg.rms_norm_eps)
        if cfg.feature_layers:
            # Each stream is normalized (their scales differ by layer), then one matmul maps
            # streams ++ final feature into the final feature's space, where the head's own
            # guesses live. It starts as "take the final feature": a head trained without the
            # streams is the starting point, and training adds what the streams know.
            n = len(cfg.feature_layers)
            self.stream_norm = nn.Parameter(torch.ones(n, d))
            self.feature_proj = nn.Linear((n + 1) * d, d, bias=False)
            with torch.no_grad():
                self.feature_proj.weight.zero_()
                self.feature_proj.weight[:, n * d:].copy_(torch.eye(d))
        # Frozen copies of the target's rows: embedding (all tokens) and head (kept tokens).
        self.register_buffer("embed", torch.empty(0), persistent=False)
        self.register_buffer("head", torch.empty(0), persistent=False)
        self.qkv: torch.Tensor | None = None  # fuse_for_drafting
        self._qkv_sizes = (cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def attach_target(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """Share the target's embedding and LM head ([vocab, hidden] each; tied or not)."""
        self.embed = embed
        self.head = head.index_select(0, torch.tensor(self.cfg.vocab, device=head.device))

    def fuse_for_drafting(self) -> None:
        """One q/k/v matmul instead of three for drafting (a drafted token is a handful of
        small matmuls, each paying a call's overhead). Training keeps the separate weights."""
        self.qkv = torch.cat((self.q_proj.weight, self.k_proj.weight,
                              self.v_proj.weight)).detach().contiguous()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        ang = positions.float()[:, None] * self.inv_freq[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    @property
    def feature_width(self) -> int:
        """Columns of a row of target features: the streams of `feature_layers`, then the
        final feature."""
        return (len(self.cfg.feature_layers) + 1) * self.cfg.hidden_size

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Target features ([..., feature_width]) -> the head's feature space ([..., hidden])."""
        if not self.cfg.feature_layers:
            return features
        d, n = self.cfg.hidden_size, len(self.cfg.feature_layers)
        streams = features[..., :n * d].unflatten(-1, (n, d))
        streams = F.rms_norm(streams.float(), (d,), eps=self.cfg.rms_norm_eps)
        streams = (streams * self.stream_norm.float()).to(features.dtype).flatten(-2)
        return _lin(self.feature_proj, torch.cat((streams, features[..., n * d:]), dim=-1))

    def fuse_input(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """fc(embed(token) ++ feature before it): the layer's input rows."""
        return _lin(self.fc, torch.cat((self.embed[tokens].to(features.dtype), features), dim=-1))

    def layer(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
              cache: tuple[torch.Tensor, torch.Tensor] | None = None,
              holes: torch.Tensor | None = None,
              context: tuple[torch.Tensor, torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [..., T] of tokens and the features before them -> (feature guesses, k, v).

        Without `cache` the rows are whole sequences ([B, T]) under a causal mask. With it,
        `tokens` is [T] new rows of one sequence that attend to the cached keys and values
        ([kv_heads, L, head_dim] each) and to each other causally, minus `holes` (tree
        drafting: kernels/paged_attention.py).

        `context` (training, whole sequences): keys and values of another pass over the same
        sequences ([B, kv_heads, T, head_dim]); row i then attends to their rows before i and
        to its own key only, as a second draft token does at run time (its cache holds the
        rows computed from the target's features, then the row of the first draft token)."""
        cfg = self.cfg
        x = self.fuse_input(tokens, features)
        h = _norm(self.input_norm, x)
        lead = h.shape[:-1]
        if self.qkv is not None and not torch.is_grad_enabled():
            q, k, v = linear(h, self.qkv).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = _lin(self.q_proj, h), _lin(self.k_proj, h), _lin(self.v_proj, h)
        q = q.reshape(*lead, cfg.num_heads, cfg.head_dim).transpose(-3, -2)
        k = k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim).transpose(-3, -2)
        v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim).transpose(-3, -2)
        cos, sin = self.rope(positions, q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is None and context is not None:
            a = _attend_context(q, k, v, *context)
        elif cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            a = _attend(q, torch.cat((cache[0], k), dim=-2), torch.cat((cache[1], v), dim=-2),
                        holes)
        x = x + _lin(self.o_proj, a.transpose(-3, -2).reshape(*lead, -1))
        gate, up = _lin(self.gate_up, _norm(self.post_attention_norm, x)).chunk(2, dim=-1)
        x = x + _lin(self.down, F.silu(gate) * up)
        return _norm(self.out_norm, x), k, v

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores over the kept tokens (draft ids)."""
        return linear(features, self.head.to(features.dtype))


def top_tokens(head: EagleHead, features: torch.Tensor,
               width: int) -> tuple[list[list[int]], list[list[float]]]:
    """The `width` likeliest draft-vocabulary ids after each feature row, with their
    log-probabilities, best first."""
    logp = torch.log_softmax(head.logits(features).float(), dim=-1)
    top, idx = logp.topk(width, dim=-1)
    return idx.tolist(), top.tolist()


@dataclass
class DraftRequest:
    """One sequence's rows in a drafting call: tokens at rotary `positions`, with the features
    before them, stored at rows first_row.. of the sequence's head `cache`; for the last
    `scored` rows the `width` likeliest next tokens are read. `holes` hide rows from each row's
    attention (tree drafting, as in kernels/paged_attention.py)."""

    tokens: list[int]
    features: torch.Tensor
    positions: list[int]
    cache: Any
    first_row: int
    holes: list[int] | None = None
    scored: int = 0
    width: int = 1


# A request's feature guesses (one per row), then the top ids and log-probabilities of its
# scored rows.
DraftResult = tuple[torch.Tensor, list[list[int]], list[list[float]]]


class TorchEagleLayer:
    """Drafting in torch ops, one growing KV tensor pair per sequence: where the fused C layer
    (worker/spec/eagle_fused.py) does not run, e.g. on CUDA. Same interface: a per-sequence
    cache from new_cache(), rows stored at first_row.. and attending to rows 0..themselves."""

    max_position = 1 << 62  # rotary angles are computed per call: no table to overrun

    def __init__(self, head: EagleHead) -> None:
        self.head = head

    def new_cache(self) -> list[torch.Tensor]:
        cfg, w = self.head.cfg, self.head.fc.weight
        empty = torch.empty(cfg.num_kv_heads, 256, cfg.head_dim, dtype=w.dtype, device=w.device)
        return [empty, torch.empty_like(empty)]

    def reserve(self, cache: list[torch.Tensor], rows: int) -> bool:
        if rows > cache[0].shape[1]:
            cap = max(rows, 2 * cache[0].shape[1])
            for i, old in enumerate(cache):
                cache[i] = old.new_empty(old.shape[0], cap, old.shape[2])
                cache[i][:, :old.shape[1]] = old
        return True

    def release(self, cache: list[torch.Tensor]) -> None:
        pass

    def read(self, cache: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cache[0][:, :rows], cache[1][:, :rows]

    def draft(self, tokens: list[int], features: torch.Tensor, positions: list[int],
              cache: list[torch.Tensor], first_row: int, holes: list[int] | None = None,
              scored: int = 0, width: int = 1,
              ) -> tuple[torch.Tensor, list[list[int]], list[list[float]]]:
        """`layer`, then the `width` likeliest draft-vocabulary ids (with log-probabilities,
        best first) after each of the last `scored` rows."""
        dev = features.device
        g = self.layer(torch.tensor(tokens, device=dev), features,
                       torch.tensor(positions, device=dev), cache, first_row,
                       None if holes is None else torch.tensor(holes, device=dev))
        ids, logps = top_tokens(self.head, g[g.shape[0] - scored:], width) if scored else ([], [])
        return g, ids, logps

    def draft_batch(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """`draft` for each request in turn: one pass per sequence (the fused C layer packs a
        batch into shared calls; this path does not)."""
        return [self.draft(r.tokens, r.features, r.positions, r.cache, r.first_row, r.holes,
                           r.scored, r.width) for r in requests]

    def layer(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
              cache: list[torch.Tensor], first_row: int,
              holes: torch.Tensor | None = None) -> torch.Tensor:
        g, k, v = self.head.layer(tokens, features, positions,
                                  cache=(cache[0][:, :first_row], cache[1][:, :first_row]),
                                  holes=holes)
        end = first_row + tokens.numel()
        cache[0][:, first_row:end], cache[1][:, first_row:end] = k, v
        return g


WEIGHTS_FILE, CONFIG_FILE = "eagle.safetensors", "eagle.json"


def save_eagle_head(head: EagleHead, folder: Path, record: dict[str, Any] | None = None) -> None:
    """Writes the head's trained weights (bf16) and its config, with `record` (how it was
    made) beside the config."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in head.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE))
    body = {"config": msgspec.to_builtins(head.cfg), **(record or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(body))


def load_eagle_head(folder: Path, embed: torch.Tensor, lm_head: torch.Tensor,
                    dtype: torch.dtype) -> EagleHead:
    """The head in `folder` (written by bench/train_eagle.py), sharing the target's embedding
    and LM head weights ([vocab, hidden]; a float copy, not quantized blocks)."""
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"{folder} is not an EAGLE head: it needs {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE} (bench/train_eagle.py writes both)")
    record = json.loads(cfg_path.read_text())
    try:
        cfg = msgspec.convert(record["config"], EagleHeadConfig)
    except (KeyError, msgspec.ValidationError) as e:
        raise ConfigError(f"{cfg_path}: not an EAGLE head config ({e})") from e
    if cfg.hidden_size != embed.shape[1] or max(cfg.vocab) >= embed.shape[0]:
        raise ConfigError(
            f"the EAGLE head in {folder} was trained for a target with hidden size "
            f"{cfg.hidden_size} and at least {max(cfg.vocab) + 1} tokens; this model has "
            f"{embed.shape[1]} and {embed.shape[0]}: train one for it with bench/train_eagle.py")
    head = EagleHead(cfg)
    head.load_state_dict(load_file(str(weights_path)))
    head = head.to(device=embed.device, dtype=dtype).eval().requires_grad_(False)
    head.attach_target(embed.to(dtype), lm_head.to(dtype))
    head.fuse_for_drafting()
    return head


SHIPPED_HEADS = Path(__file__).parent / "heads"


def shipped_head(model: str | Path) -> Path | None:
    """The head shipped for `model` (a folder named after it, optionally with a dtype suffix,
    as the default model's converted folders are), if any."""
    name = Path(model).name
    if SHIPPED_HEADS.is_dir():
        for folder in sorted(SHIPPED_HEADS.iterdir()):
            if (name == folder.name or name.startswith(folder.name + "-")) \
                    and (folder / CONFIG_FILE).is_file():
                return folder
    return None
