"""Model and engine configuration: frozen msgspec Structs validated where they enter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec

from worker.spec.config import SpeculativeConfig

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# int8: per output channel; int4: group-wise with zero points; w4a8: int4 in groups of 32 by
# integer dot products against activations split into two int8 planes, LM head in 8 bits (CPUs
# with AVX512-VNNI; elsewhere int4 with an int8 head): the fastest format here, the self-draft's;
# gguf: keep the Q4_0/Q4_1/Q8_0 blocks of the .gguf the model was converted from. GPTQ/AWQ
# checkpoints need none of these: their config.json says how they are quantized.
Quantization = Literal["int8", "int4", "w4a8", "gguf"]
QUANT_GROUP_SIZES = (32, 64, 128, 256)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A configuration the engine cannot run; the message says what to change."""


class RopeScaling(msgspec.Struct, frozen=True, kw_only=True):
    rope_type: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file} not found: --model must be a Hugging Face model folder "
                              "(config.json + *.safetensors) or a .gguf file")
        return cls.from_hf_dict(json.loads(file.read_text()))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architecture {arch!r} is not supported; Tandem runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 nests rope settings in rope_parameters; older configs use rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = None
        if rope_type != "default":
            if rope_type not in ("linear", "llama3"):
                raise ConfigError(f"rope scaling type {rope_type!r} is not supported "
                                  "(supported: default, linear, llama3)")
            keys = set(RopeScaling.__struct_fields__)
            scaling = RopeScaling(rope_type=rope_type,
                                  **{k: v for k, v in rope.items() if k in keys})
        window = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_window=window,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one replica engine needs. Defaults suit a CPU laptop."""

    model: str
    dtype: Dtype = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16, else float32
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped by KV)
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.9  # GPU: of total memory after weights; CPU: of free RAM, capped
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    seed: int = 0
    num_threads: int | None = None  # CPU: torch intra-op threads; None leaves torch's default
    speculative: SpeculativeConfig | None = None  # speculative decoding (worker/spec/); None: off
    quantization: Quantization | None = None  # weight-only; None: as the checkpoint is
    # int4: weights per scale/zero along the input features. 32 by default: at 128 SmolLM2 (whose
    # weights were Q4_1 with groups of 32) lost 41% perplexity, at 32 only 0.3% (bench/quant.py).
    quant_group_size: int = 32

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
             f"block_size must be a power of two in [1, 256] (got {self.block_size})")
        need(self.max_model_len is None or self.max_model_len >= 1,
             f"max_model_len must be >= 1 (got {self.max_model_len})")
        need(self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
             f"kv_cache_bytes must be > 0 (got {self.kv_cache_bytes})")
        need(0 < self.kv_cache_fraction <= 1,
             f"kv_cache_fraction must be in (0, 1] (got {self.kv_cache_fraction})")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        need(self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})")
        need(self.enable_chunked_prefill or self.max_model_len is None
             or self.max_num_batched_tokens >= self.max_model_len,
             "without chunked prefill max_num_batched_tokens must be >= max_model_len")
        need(self.quantization in (None, "int8", "int4", "w4a8", "gguf"),
             f"quantization must be int8, int4, w4a8 or gguf (got {self.quantization!r})")
        need(self.quant_group_size in QUANT_GROUP_SIZES,
             f"quant_group_size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))} "
             f"(got {self.quant_group_size})")
