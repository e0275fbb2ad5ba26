"""A tiny random Llama written as GGUF (llama.cpp layout) → convert_gguf → transformers.

Three loads of the same weights must agree: the original transformers model, our converted
folder, and transformers' own GGUF loader. The q/k row un-permutation is wrong if they don't.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Tokenizer

from tests.gguf_utils import (
    CHAT_TEMPLATE,
    llama_gguf,
    random_llama,
    tokenizer_metadata,
    train_tokenizer,
)
from worker.gguf import GGUFError, convert_gguf

TEXTS = [
    "a single man  in want\n\nof a wife",
    "In 1811, 4,096 letters; naïve café 🤗!",
    "  x  \t y",
]


@pytest.fixture(scope="module")
def trained_tokenizer() -> Tokenizer:
    return train_tokenizer()


@pytest.mark.parametrize(
    ("tied", "matrix_type", "atol"),
    [(True, gguf.GGMLQuantizationType.F32, 1e-4), (False, gguf.GGMLQuantizationType.Q8_0, 0.5)],
    ids=["tied-f32", "untied-q8_0"],
)
def test_converted_llama_matches_transformers(
    tmp_path: Path,
    trained_tokenizer: Tokenizer,
    tied: bool,
    matrix_type: gguf.GGMLQuantizationType,
    atol: float,
) -> None:
    from transformers import AutoModelForCausalLM

    original = random_llama(trained_tokenizer.get_vocab_size(), tied)
    path = llama_gguf(
        tmp_path / "tiny.gguf", original, tokenizer_metadata(trained_tokenizer), matrix_type
    )
    folder = convert_gguf(path, tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()

    config = json.loads((folder / "config.json").read_text())
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert config[key] == getattr(original.config, key), key
    assert config["rope_theta"] == original.config.rope_parameters["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(original.config.rms_norm_eps)

    ids = torch.randint(
        0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want, got, theirs = original(ids).logits, ours(ids).logits, reference(ids).logits
    # Our folder and transformers' GGUF loader read the same (quantized) values: near-exact.
    torch.testing.assert_close(got, theirs, atol=1e-4, rtol=1e-4)
    # Against the unquantized original: exact for F32, within quantization noise for Q8_0.
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > (0.999 if atol < 1e-3 else 0.8)


def test_tokenizer_matches_trained_and_transformers(
    tmp_path: Path, trained_tokenizer: Tokenizer
) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    original = random_llama(trained_tokenizer.get_vocab_size(), tied=True)
    path = llama_gguf(tmp_path / "tiny.gguf", original, tokenizer_metadata(trained_tokenizer))
    folder = convert_gguf(path, tmp_path / "hf", dtype="bfloat16")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        want = trained_tokenizer.encode(text).ids
        # Same split as training (SmolLM isolates digits), seen even where no merge would differ.
        assert ours.pre_tokenizer.pre_tokenize_str(
            text
        ) == trained_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert ours.encode(text).ids == want, text
        assert fast.encode(text) == want, text
        assert theirs.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(want, skip_special_tokens=False) == text
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (
        tokenizer_config["eos_token"] == "<|im_end|>"
        and tokenizer_config["chat_template"] == CHAT_TEMPLATE
    )
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == trained_tokenizer.token_to_id("<|im_end|>")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, trained_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.gguf.convert as convert_module

    original = random_llama(trained_tokenizer.get_vocab_size(), tied=True)
    path = llama_gguf(tmp_path / "tiny.gguf", original, tokenizer_metadata(trained_tokenizer))

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_bad_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="float32"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


def test_converted_qwen2_matches_transformers(tmp_path: Path, trained_tokenizer: Tokenizer) -> None:
    """Qwen2: q/k/v biases, and rows that llama.cpp did not permute."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=trained_tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    original = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in original.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # zero-initialised otherwise: a dropped bias would go unseen
    path = llama_gguf(
        tmp_path / "qwen.gguf", original, tokenizer_metadata(trained_tokenizer), arch="qwen2"
    )
    folder = convert_gguf(path, tmp_path / "hf")
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "qwen2" and written["architectures"] == ["Qwen2ForCausalLM"]
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)
