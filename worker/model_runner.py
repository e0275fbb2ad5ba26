"""Builds the model, sizes and binds the paged KV cache, and runs one flattened step.

Start-up follows a fixed order (nano-vllm): build the model, load weights, warm up with the
largest step the scheduler can issue while measuring peak memory, then size the KV cache from
what is left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kernels.kv_store import RowMover
from kernels.paged_attention import AttentionMetadata
from protos.messages import StepPlan
from worker.config import ConfigError, EngineConfig, ModelConfig
from worker.models import build_model
from worker.models.llama import StreamTap
from worker.parallel import SINGLE, WHOLE_MODEL, StageInfo, TPInfo
from worker.quant import load_quantized
from worker.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Without an explicit --kv-cache-bytes a CPU engine takes this share of available RAM, capped,
# so that a laptop keeps room for the rest of the system.
_CPU_KV_SHARE = 0.25
_CPU_KV_CAP = 4 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~4x faster than fp32 there (../shared/FACTS.md);
    without them bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def _available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path,
                 tp: TPInfo = SINGLE, stage: StageInfo = WHOLE_MODEL) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        # An EAGLE proposer reads each step's final hidden states (worker/spec/eagle_proposer.py),
        # after the residual streams entering `hidden_layers` where its head reads those too
        # (EAGLE-3): [T, (len(hidden_layers) + 1) * hidden] per step.
        self.keep_hidden = False
        self.hidden_layers: tuple[int, ...] = ()
        self.last_hidden: torch.Tensor | None = None
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)

        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(model_config, tp, stage)
        finally:
            torch.set_default_dtype(prev)
        self.weight_format = load_quantized(self.model, model_dir, config)
        self.model.eval()
        # The cos/sin cache must stay fp32 even when the model is bf16.
        for module in self.model.modules():
            if hasattr(module, "cos_sin_cache"):
                module.cos_sin_cache = module.cos_sin_cache.float()
        log.info("weights: %s, %.1f MiB on %s (%s activations)", self.weight_format,
                 self.weight_bytes() / 2**20, self.device, str(self.dtype).removeprefix("torch."))
        self.attn_layers = self.model.attention_layers()
        layer0 = self.attn_layers[0]
        self.num_kv_heads = layer0.num_kv_heads
        self.head_dim = layer0.head_dim
        self.num_blocks = self._size_kv_cache()
        self._allocate_kv_cache(self.num_blocks)

    # -- start-up --------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return (2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim
                * elem)

    def weight_bytes(self) -> int:
        """Bytes of parameters and persistent buffers (quantized weights, scales, zeros), each
        tensor once (tied embeddings); caches such as RoPE tables are not weights."""
        seen: dict[int, torch.Tensor] = {}
        for module in self.model.modules():
            for p in module._parameters.values():
                if p is not None:
                    seen[id(p)] = p
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent_buffers_set:
                    seen[id(b)] = b
        return sum(t.numel() * t.element_size() for t in seen.values())

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        for layer in self.attn_layers:
            layer.bind_cache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.dtype, device=self.device))
        self._mover = RowMover([c for layer in self.attn_layers
                                for c in (layer.k_cache, layer.v_cache)])

    def _size_kv_cache(self) -> int:
        cfg = self.config
        warm_tokens = min(cfg.max_num_batched_tokens,
                          cfg.max_model_len or self.model_config.max_position_embeddings)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self._warm_up(warm_tokens)
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            non_torch = total - free - torch.cuda.memory_reserved()
            budget = int(total * cfg.kv_cache_fraction) - torch.cuda.max_memory_allocated() \
                - non_torch
        else:
            budget = min(int(_available_ram() * _CPU_KV_SHARE), _CPU_KV_CAP)
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            raise ConfigError(f"no room for the KV cache: {budget / 2**20:.0f} MiB available, one "
                              f"block needs {self.block_bytes / 2**20:.2f} MiB; raise "
                              "--kv-cache-bytes (CPU) or --gpu-memory-utilization")
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB)", num_blocks, self.block_size,
                 num_blocks * self.block_bytes / 2**20)
        return num_blocks

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One prefill of the largest step, on a throw-away cache just big enough for it."""
        blocks = -(-num_tokens // self.block_size)
        self._allocate_kv_cache(blocks)
        plan = StepPlan(
            step_id=-1,
            input_ids=[0] * num_tokens,
            positions=list(range(num_tokens)),
            slot_mapping=list(range(num_tokens)),
            query_start=[0, num_tokens],
            seq_lens=[num_tokens],
            block_tables=[list(range(blocks))],
            sample_indices=[num_tokens - 1],
        )
        self.execute(plan)
        self._allocate_kv_cache(0)

    # -- per step ----------------------------------------------------------------------------

    def build_plan(self, step_id: int, sched: SchedulerOutput) -> StepPlan:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample: list[int] = []
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            tables.append(table)
            if end == seq.num_tokens:
                sample.append(query_start[-1] - 1)
        return StepPlan(step_id, input_ids, positions, slots, query_start, seq_lens, tables, sample)

    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        dev = self.device
        width = max(len(t) for t in plan.block_tables)
        # One tensor construction per step, not one per sequence; padding with block 0 is masked.
        tables = torch.tensor([t + [0] * (width - len(t)) for t in plan.block_tables],
                              dtype=torch.int32)
        qs = plan.query_start
        return AttentionMetadata(
            query_start=torch.tensor(qs, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(plan.seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            block_size=self.block_size,
            max_query_len=max(qs[i + 1] - qs[i] for i in range(len(qs) - 1)),
            max_seq_len=max(plan.seq_lens),
            query_start_host=qs,
            seq_lens_host=plan.seq_lens,
            sliding_window=self.model_config.sliding_window,
            slot_mapping=torch.tensor(plan.slot_mapping, dtype=torch.int64, device=dev),
            attn_holes=torch.tensor(plan.attn_holes, dtype=torch.int64, device=dev)
            if plan.attn_holes else None,
            attn_holes_host=plan.attn_holes or None,
        )

    @torch.inference_mode()
    def move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copies the K/V rows of cache slots `src` to slots `dst` in every layer: the accepted
        branch of a verified token tree moves to where a chain would have put it. All rows are
        read before any is written, so the two lists may overlap."""
        self._mover(src, dst)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the forward for a plan; returns fp32 logits for plan.sample_indices."""
        dev = self.device
        input_ids = torch.tensor(plan.input_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(plan.positions, dtype=torch.int64, device=dev)
        tap = StreamTap(self.hidden_layers) if self.keep_hidden and self.hidden_layers else None
        hidden = self.model(input_ids, positions, self._metadata(plan), tap=tap)
        if self.keep_hidden:
            self.last_hidden = hidden if tap is None else torch.cat((*tap.streams, hidden), dim=-1)
        if not plan.sample_indices:
            return hidden.new_empty(0, self.model_config.vocab_size, dtype=torch.float32)
        idx = torch.tensor(plan.sample_indices, dtype=torch.int64, device=dev)
        return self.model.compute_logits(hidden.index_select(0, idx)).float()
