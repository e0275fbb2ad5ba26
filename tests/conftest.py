"""Shared fixtures: tiny random Hugging Face models written to disk once per session, and the
`gpu` marker skipped where no CUDA device exists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TINY_SHAPES: dict[str, dict] = {
    # GQA, tied embeddings (SmolLM-like)
    "llama-gqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True),
    # MHA, untied, llama3 rope scaling
    "llama-mha": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "llama-linear": dict(arch="llama", num_attention_heads=4, num_key_value_heads=1,
                         tie_word_embeddings=False,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False),
    "mistral-window": dict(arch="mistral", num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, sliding_window=12),
    # Tensor/pipeline parallelism: 4 layers so that stages can be uneven; 4 KV heads split over
    # TP ranks; 1 KV head replicated on every rank, tied embeddings (the last stage loads the
    # embedding as its LM head) and a vocabulary that does not divide by 2 (padded shards).
    "llama-kv4": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=False, num_hidden_layers=4),
    "llama-kv1": dict(arch="llama", num_attention_heads=4, num_key_value_heads=1,
                      tie_word_embeddings=True, num_hidden_layers=4, vocab_size=251),
}


def _make_hf_model(kind: str, path: Path, vocab_size: int = 256) -> Path:
    import transformers as tf

    spec = dict(TINY_SHAPES[kind])
    arch = spec.pop("arch")
    vocab_size = spec.pop("vocab_size", vocab_size)
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]
    cfg = cfg_cls(
        **{"num_hidden_layers": 2, **spec},
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )
    if arch == "qwen2":
        cfg.use_sliding_window = False
    torch.manual_seed(1234)
    model = model_cls(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def make(kind: str = "llama-gqa") -> Path:
        if kind not in made:
            made[kind] = _make_hf_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
