"""Llama-family decoder: Llama 2/3, Mistral (sliding window), Qwen2 (QKV bias), SmolLM, TinyLlama.

One flattened token batch per call: input_ids and positions are [T], attention metadata says how
the tokens split into sequences. Logits are computed only for the rows the sampler needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from kernels import cpu_decode_layer as fused
from kernels.activation import silu_and_mul
from kernels.paged_attention import AttentionMetadata
from worker.config import ModelConfig
from worker.layers.attention import PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding
from worker.parallel import SINGLE, WHOLE_MODEL, StageInfo, TPInfo


@dataclass
class StreamTap:
    """Asks a forward for the residual stream entering each decoder layer of `layers` (an
    EAGLE-3 head reads low, middle and high layers, worker/spec/eagle_head.py); the forward
    appends them to `streams` in that order, one [T, hidden] tensor each."""

    layers: tuple[int, ...]
    streams: list[torch.Tensor] = field(default_factory=list)


def _stream(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream between layers: the next layer's norm adds the two first."""
    return x.clone() if residual is None else x + residual


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.attention_bias, tp=tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp=tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, cfg.head_dim,
                                   cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary(positions, q.view(-1, self.num_heads, self.q_size // self.num_heads),
                           k.view(-1, self.num_kv_heads, self.kv_size // self.num_kv_heads))
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sliding_window = cfg.sliding_window

    def fused_spec(self) -> fused.LayerSpec | None:
        """This layer for the CPU fused decode kernel, or None where it cannot run it."""
        attn, mlp = self.self_attn, self.mlp
        linears = [attn.qkv_proj.fused_spec(), attn.o_proj.fused_spec(),
                   mlp.gate_up_proj.fused_spec(), mlp.down_proj.fused_spec()]
        cache = attn.attn.k_cache
        if (any(lin is None for lin in linears) or cache.dim() != 4
                or not fused.available(cache.dtype)):
            return None
        qkv, o, gate_up, down = linears
        try:
            return fused.LayerSpec(
                qkv=qkv, o=o, gate_up=gate_up, down=down, ln1=self.input_layernorm.weight.data,
                ln2=self.post_attention_layernorm.weight.data, eps=self.input_layernorm.eps,
                k_cache=cache, v_cache=attn.attn.v_cache,
                cos_sin_cache=attn.rotary.cos_sin_cache, num_heads=attn.num_heads,
                num_kv_heads=attn.num_kv_heads, head_dim=attn.attn.head_dim,
                scale=attn.attn.scale, sliding_window=self.sliding_window)
        except ValueError:
            return None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class MissingLayer(nn.Module):
    """Stands in for a layer another pipeline stage holds: keeps the checkpoint's layer indices
    (model.layers.17...) valid on every stage without allocating anything."""


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, stage: StageInfo = WHOLE_MODEL) -> None:
        super().__init__()
        self.start, self.end = stage.layer_range(cfg.num_layers)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
                             if stage.is_first else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, tp) if self.start <= i < self.end else MissingLayer()
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.is_last else None
        # Fused CPU decode layers, built on first use (after the KV cache is bound) and keyed by
        # the cache they point into; a None stack: this model cannot use them.
        self._fused: tuple[int, fused.LayerStack | None, int] | None = None
        # The fused stack cut where a StreamTap reads, by the layers it reads.
        self._segments: dict[tuple[int, ...], list[tuple[int, fused.LayerStack]]] = {}

    def fused_layers(self, x: torch.Tensor, meta: AttentionMetadata) -> fused.LayerStack | None:
        """This stage's layers for the fused kernel when this step can use them, else None."""
        if (x.device.type != "cpu" or x.shape[0] > fused.MAX_ROWS_AMX
                or meta.slot_mapping is None or not x.is_contiguous()):
            return None
        first = self.layers[self.start]
        key = first.self_attn.attn.k_cache.data_ptr()
        if self._fused is None or self._fused[0] != key:
            specs = [self.layers[i].fused_spec() for i in range(self.start, self.end)]
            if not specs or any(s is None for s in specs):
                self._fused = (key, None, 0)
            else:
                self._fused = (key, fused.LayerStack(specs), fused.max_rows(specs))
            self._segments.clear()
        _, stack, max_rows = self._fused
        return stack if stack is not None and x.shape[0] <= max_rows else None

    def _cut(self, stack: fused.LayerStack,
             layers: tuple[int, ...]) -> list[tuple[int, fused.LayerStack]]:
        """(first layer, stack) per run of layers between the tapped ones: one C call each;
        untapped, the whole stack."""
        if layers not in self._segments:
            cuts = sorted({self.start, *(i for i in layers if self.start < i < self.end)})
            self._segments[layers] = [(self.start, stack)] if len(cuts) == 1 else [
                (a, fused.LayerStack(stack.specs[a - self.start:b - self.start]))
                for a, b in zip(cuts, [*cuts[1:], self.end], strict=True)]
        return self._segments[layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, hidden: torch.Tensor | None = None,
                tap: StreamTap | None = None) -> torch.Tensor:
        """`hidden`: the previous pipeline stage's output, None on the first stage. A stage that
        is not the last returns its residual stream (layer output + residual, summed): the next
        layer's norm adds them first anyway, so one tensor crosses the link instead of two.
        `tap`: residual streams to collect on the way (this stage's layers only)."""
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        residual = None
        taps = tap.layers if tap is not None else ()
        if (stack := self.fused_layers(x, meta)) is not None:
            step = fused.StepSpec.for_tokens(positions, meta.slot_mapping, meta.block_tables,
                                             meta.query_start_host, meta.seq_lens_host,
                                             stack.specs[0], meta.attn_holes)
            for first, segment in self._cut(stack, taps):
                if first in taps:
                    tap.streams.append(_stream(x, residual))
                x, residual = fused.run_layers(segment, step, x, residual)
        else:
            for i in range(self.start, self.end):
                if i in taps:
                    tap.streams.append(_stream(x, residual))
                x, residual = self.layers[i](positions, x, residual, meta)
        if self.norm is None:
            return x + residual
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id) for matrices we store merged
    packed_modules: ClassVar[Mapping[str, tuple[str, str | int]]] = MappingProxyType({
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    })

    def __init__(self, cfg: ModelConfig, tp: TPInfo = SINGLE,
                 stage: StageInfo = WHOLE_MODEL) -> None:
        super().__init__()
        self.config = cfg
        self.stage = stage
        self.model = LlamaModel(cfg, tp, stage)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp) if stage.is_last \
            else None
        if cfg.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, hidden: torch.Tensor | None = None,
                tap: StreamTap | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, hidden, tap)

    def checkpoint_target(self, name: str) -> str | None:
        """Where checkpoint tensor `name` goes on this pipeline stage, or None if another stage
        holds it. A tied LM head on a last stage without the embedding loads the embedding."""
        if name.startswith("model.layers."):
            index = int(name.split(".", 3)[2])
            return name if self.model.start <= index < self.model.end else None
        if name.startswith("model.embed_tokens."):
            if self.model.embed_tokens is not None:
                return name
            if self.lm_head is not None and self.config.tie_word_embeddings:
                return "lm_head." + name.removeprefix("model.embed_tokens.")
            return None
        if name.startswith("model.norm."):
            return name if self.model.norm is not None else None
        if name.startswith("lm_head."):
            return name if self.lm_head is not None else None
        return name

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        owned = self.model.layers[self.model.start:self.model.end]
        return [layer.self_attn.attn for layer in owned]
