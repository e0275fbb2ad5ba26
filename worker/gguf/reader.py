"""Opening a GGUF file and turning its metadata into a Hugging Face config.json dict.

llama.cpp keeps hyper-parameters as `<architecture>.<key>` metadata; Tandem's engine (and
transformers) read them from a config.json. This module only maps names; weights live in
weights.py and the tokenizer in tokenizer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from worker.gguf.errors import GGUFError

# general.architecture → (HF model_type, HF architectures entry). Only Llama-family decoders that
# the engine implements; everything else must fail loudly before any weights are read.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}


@dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF file: metadata by key and tensors by GGUF name (memory-mapped, not read)."""

    path: Path
    reader: gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "<missing>"))

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` as Python data (str, int, float, bool or list)."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def arch_get(self, key: str, default: Any = None) -> Any:
        """The value of `<architecture>.<key>`, e.g. arch_get("block_count")."""
        return self.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.arch_get(key)
        if value is None:
            raise GGUFError(
                f"{self.path} has no metadata key {self.architecture}.{key}; the file is incomplete "
                "or was written by an unsupported converter. Re-create it with llama.cpp's "
                "convert_hf_to_gguf.py or pass a Hugging Face folder instead."
            )
        return value

    @property
    def tensors(self) -> dict[str, gguf.ReaderTensor]:
        return {tensor.name: tensor for tensor in self.reader.tensors}


def open_gguf(path: str | Path) -> GGUFFile:
    """Open `path` (memory-mapped); a missing or unreadable file raises GGUFError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist; check the path given to --model.")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, struct/IndexError or OSError at random
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is probably "
            "truncated or corrupt: delete it and download or convert it again."
        ) from exc
    return GGUFFile(path=path, reader=reader)


def check_architecture(gguf_file: GGUFFile) -> tuple[str, str]:
    """(model_type, HF class name) for the file's architecture, or GGUFError naming it."""
    arch = gguf_file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{gguf_file.path}: GGUF architecture {arch!r} is not supported; Tandem serves "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}. Use a model of one of those families."
        )
    return SUPPORTED_ARCHITECTURES[arch]


def token_id(gguf_file: GGUFFile, name: str) -> int | None:
    """tokenizer.ggml.<name>_token_id, e.g. token_id(f, "eos")."""
    value = gguf_file.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def vocab_size(gguf_file: GGUFFile) -> int:
    # Prefer the embedding's row count: that is what the weights need, even when the tokenizer
    # lists fewer tokens (padded vocabularies) or the metadata key is absent (older files).
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is not None:
        return int(embedding.shape[-1])
    declared = gguf_file.arch_get("vocab_size")
    if declared is not None:
        return int(declared)
    return len(gguf_file.get("tokenizer.ggml.tokens", []))


def _rope_scaling(gguf_file: GGUFFile) -> dict[str, Any] | None:
    kind = gguf_file.arch_get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(gguf_file.arch_get("rope.scaling.factor", 1.0))
    scaling: dict[str, Any] = {"rope_type": str(kind), "type": str(kind), "factor": factor}
    original = gguf_file.arch_get("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    if kind not in ("linear", "yarn"):
        raise GGUFError(
            f"{gguf_file.path}: RoPE scaling type {kind!r} is not supported (linear, yarn are); "
            "use the model's Hugging Face folder instead."
        )
    return scaling


def hf_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """The config.json dict that describes this GGUF's model in Hugging Face terms."""
    model_type, architecture_class = check_architecture(gguf_file)
    if "rope_freqs.weight" in gguf_file.tensors:
        # Llama 3.1-style frequency factors are stored as a tensor, not as parameters; ignoring
        # them would silently change every output.
        raise GGUFError(
            f"{gguf_file.path} carries rope_freqs (Llama 3.1-style RoPE scaling), which Tandem "
            "cannot rebuild from a GGUF; pass the model's Hugging Face folder instead."
        )
    hidden = int(gguf_file.require("embedding_length"))
    heads = int(gguf_file.require("attention.head_count"))
    kv_heads = gguf_file.arch_get("attention.head_count_kv", heads)
    # A per-layer list of head counts exists in some files; the engine needs one number.
    kv_heads = int(kv_heads[0] if isinstance(kv_heads, list) else kv_heads)
    head_dim = int(gguf_file.arch_get("attention.key_length", hidden // heads))
    has_output = "output.weight" in gguf_file.tensors
    config: dict[str, Any] = {
        "architectures": [architecture_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(gguf_file.require("feed_forward_length")),
        "num_hidden_layers": int(gguf_file.require("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(gguf_file.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gguf_file.arch_get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gguf_file.arch_get("context_length", 2048)),
        "vocab_size": vocab_size(gguf_file),
        "tie_word_embeddings": not has_output,
        "attention_bias": "blk.0.attn_q.bias" in gguf_file.tensors,
        "mlp_bias": False,
        "use_cache": True,
    }
    rope_dims = gguf_file.arch_get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise GGUFError(
            f"{gguf_file.path}: RoPE covers {rope_dims} of {head_dim} head dimensions (partial "
            "rotary), which the Llama-family engine does not implement."
        )
    scaling = _rope_scaling(gguf_file)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for name in ("bos", "eos", "padding"):
        value = token_id(gguf_file, name)
        if value is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = value
    if model_type == "qwen2":
        config["attention_bias"] = True  # Qwen2 always has q/k/v biases
        config["use_sliding_window"] = False
    if model_type == "mistral":
        window = gguf_file.arch_get("attention.sliding_window")
        config["sliding_window"] = None if window is None else int(window)
    return config
