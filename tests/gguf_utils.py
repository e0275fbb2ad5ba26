"""Writing small GGUF files for tests, the way llama.cpp's convert_hf_to_gguf.py would.

Kept independent of worker.gguf on purpose: the names, the q/k permutation and the metadata keys
are written out here from llama.cpp's conventions, so tests compare two separate codings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *middle, kind = hf_name.split(".")
    return f"blk.{layer}.{HF_TO_GGUF_LAYER['.'.join(middle)]}.{kind}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: pairs rotate_half halves into adjacent rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
) -> Path:
    """`tensors`: GGUF name → (float32 values or uint8 raw blocks, type to store)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value and isinstance(value[0], str):
            writer.add_array(key, value)
        else:
            writer.add_array(key, [int(v) for v in value])
    for name, (values, qtype) in tensors.items():
        if values.dtype == np.uint8:
            writer.add_tensor(name, values, raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(
                name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_gguf(
    path: Path,
    model: torch.nn.Module,
    tokenizer_metadata: dict[str, Any],
    matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    arch: str = "llama",
) -> Path:
    """`model` (transformers Llama or Qwen2) as a GGUF; llama.cpp permutes q/k rows for llama only."""
    config = model.config
    permute = arch == "llama"
    metadata: dict[str, Any] = {
        "general.name": "tiny-llama",
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.rope.freq_base": float(config.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        f"{arch}.vocab_size": config.vocab_size,
        **tokenizer_metadata,
    }
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = param.detach().float().numpy()
        if permute and name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, config.num_key_value_heads)
        qtype = matrix_type if values.ndim == 2 else gguf.GGMLQuantizationType.F32
        tensors[gguf_name(name)] = (values, qtype)
    return write_gguf(path, arch, metadata, tensors)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. In 1811, 22 letters and 333 calls; café naïve 🤗.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE split like SmolLM (digits isolated first), trained on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, object]:
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def random_llama(vocab_size: int, tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        initializer_range=0.2,  # large weights so attention (and RoPE) shape the logits
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def tiny_llama_gguf(path: Path, tied: bool = True) -> Path:
    """A complete tiny model + tokenizer GGUF, for tests that only need a valid file."""
    tokenizer = train_tokenizer()
    return llama_gguf(
        path, random_llama(tokenizer.get_vocab_size(), tied), tokenizer_metadata(tokenizer)
    )
