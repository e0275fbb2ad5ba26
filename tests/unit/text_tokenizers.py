"""Small tokenizers for the text-layer tests, trained in about a second, no hub access.

- byte_level_folder: a GPT-2/Qwen-style byte-level BPE with ChatML special tokens and template.
- sentencepiece_folder: a Llama-2-style BPE (Metaspace pre-tokenizer, <0xXX> byte fallback,
  Strip decoder, BOS added by both tokenizer.json and add_bos_token).
Each is written as a Hugging Face folder so transformers can load it as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

AUSTEN = Path("/work/shared/data/austen.txt")
# Used when the shared corpus is not on this machine; any English prose trains a usable vocab.
_FALLBACK_CORPUS = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. However little known the feelings or views of such a man may
be on his first entering a neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of some one or other of their
daughters. "My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield
Park is let at last?" Mr. Bennet replied that he had not."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-2's template (abridged): bos_token/eos_token variables, raise_exception, whitespace.
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' '  + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""


def corpus_lines(max_chars: int = 300_000) -> list[str]:
    text = AUSTEN.read_text(encoding="utf-8")[:max_chars] if AUSTEN.is_file() else _FALLBACK_CORPUS
    return [line for line in text.splitlines() if line.strip()]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def build_byte_level(lines: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def build_sentencepiece(lines: list[str]) -> RustTokenizer:
    # Train on Metaspace-split words, then rebuild the model the way Llama's tokenizer.json is
    # laid out: <unk> <s> </s>, the 256 <0xXX> byte tokens, then the merged pieces.
    trained = RustTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=900,
            limit_alphabet=60,  # rare characters (accents, CJK, emoji) must fall back to bytes
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
        ),
    )
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    tok = RustTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def byte_level_folder(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_byte_level(lines)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            # The dict form older transformers versions save (AddedToken serialised).
            "eos_token": {
                "__type": "AddedToken",
                "content": "<|im_end|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            },
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
        },
    )
    endoftext = tok.token_to_id("<|endoftext|>")
    im_start = tok.token_to_id("<|im_start|>")
    _write_json(folder / "generation_config.json", {"eos_token_id": [endoftext, im_start]})
    _write_json(folder / "config.json", {"eos_token_id": endoftext, "bos_token_id": endoftext})
    return folder


def sentencepiece_folder(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_sentencepiece(lines).save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": [
                {"name": "default", "template": LLAMA2_TEMPLATE},
                {"name": "tool_use", "template": "{{ 'tools!' }}"},
            ],
        },
    )
    _write_json(folder / "config.json", {"eos_token_id": 2, "bos_token_id": 1})
    return folder


# Text that exercises what tokenizers get wrong: unicode, emoji (incl. ZWJ sequences and skin
# tones), CJK, repeated spaces, newlines and tabs, special tokens written inline.
TEXTS = [
    "Hello world",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "  two leading spaces and trailing ones   ",
    "multiple   spaces\n\n\nthree newlines\ttab\r\nCRLF",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "CJK 日本語のテキスト 中文字符 한국어 문장",
    "accents café naïve Ωμέγα ß ﬁ",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "</s> and <s> inline",
    "",
    " ",
    "\n",
    "a" * 40,
    "Mr. Darcy's 10,000 a year—“quite”… ok?!",
]
