"""Rebuilding a `tokenizers.Tokenizer` (and its tokenizer_config) from GGUF metadata.

A GGUF carries the vocabulary, merges, token types and special ids under tokenizer.ggml.*, and
the pre-tokenizer only as a name (tokenizer.ggml.pre) that llama.cpp maps to split regexes.
Here each name is mapped to the Hugging Face pre-tokenizer that splits text the same way the
vocabulary was trained, e.g. "smollm" (StarCoder-style) isolates every digit before the GPT-2
split, exactly like SmolLM's own tokenizer.json.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from worker.gguf.errors import GGUFError
from worker.gguf.reader import GGUFFile, token_id

# llama.cpp's llama_token_type values.
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre → builder of the matching HF pre-tokenizer (llama.cpp's llama-vocab.cpp
# groups the names the same way).
_PRE_TOKENIZERS = {
    "default": _gpt2_split,
    "gpt-2": _gpt2_split,
    "gpt2": _gpt2_split,
    "mpt": _gpt2_split,
    "olmo": _gpt2_split,
    "jais": _gpt2_split,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "command-r": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "exaone": _digits_then_gpt2,
    "minerva-7b": _digits_then_gpt2,
    "llama-bpe": lambda: _regex_split(_LLAMA3_SPLIT),
    "llama3": lambda: _regex_split(_LLAMA3_SPLIT),
    "llama-v3": lambda: _regex_split(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _regex_split(_LLAMA3_SPLIT),
    "dbrx": lambda: _regex_split(_LLAMA3_SPLIT),
    "falcon3": lambda: _regex_split(_LLAMA3_SPLIT),
    "qwen2": lambda: _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _regex_split(_QWEN2_SPLIT),
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table that byte-level vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _special_tokens(
    tokens: list[str], types: list[int]
) -> tuple[list[AddedToken], list[AddedToken]]:
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _USER_DEFINED
    ]
    return control, user


def _byte_level(gguf_file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    pre = str(gguf_file.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"{gguf_file.path}: byte-level tokenizer pre-type {pre!r} is not supported; supported "
            f"are {', '.join(sorted(_PRE_TOKENIZERS))}. Pass the model's Hugging Face folder instead."
        )
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if types[index] not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
            # A normal token written as raw text: spell its bytes the byte-level way.
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in gguf_file.get("tokenizer.ggml.merges", [])]
    if not merges:
        raise GGUFError(f"{gguf_file.path}: byte-level tokenizer without tokenizer.ggml.merges.")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: a token's score ranks the merge making it."""
    ids = {token: index for index, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece(gguf_file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in gguf_file.get("tokenizer.ggml.merges", [])]
    if not merges:
        scores = gguf_file.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError(f"{gguf_file.path}: SentencePiece tokenizer without scores or merges.")
        merges = _sentencepiece_merges(tokens, [float(s) for s in scores])
    unk = token_id(gguf_file, "unknown")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(gguf_file.get("tokenizer.ggml.add_space_prefix", True))
    # Like transformers' LlamaTokenizer (non-legacy): "▁" only before the first word of the text.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_bos_token(gguf_file: GGUFFile) -> bool:
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    default = gguf_file.get("tokenizer.ggml.model") == "llama"
    return bool(gguf_file.get("tokenizer.ggml.add_bos_token", default))


def build_tokenizer(gguf_file: GGUFFile) -> Tokenizer:
    """The tokenizer the GGUF describes, with control tokens as special added tokens."""
    kind = gguf_file.get("tokenizer.ggml.model")
    tokens = gguf_file.get("tokenizer.ggml.tokens")
    if kind not in SUPPORTED_TOKENIZER_MODELS or not tokens:
        raise GGUFError(
            f"{gguf_file.path}: tokenizer model {kind!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}); pass a Hugging Face folder instead."
        )
    types = [int(t) for t in gguf_file.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    build = _byte_level if kind == "gpt2" else _sentencepiece
    tokenizer = build(gguf_file, tokens, types)
    control, user = _special_tokens(tokens, types)
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)
    _set_post_processor(gguf_file, tokenizer, tokens)
    return tokenizer


def _set_post_processor(gguf_file: GGUFFile, tokenizer: Tokenizer, tokens: list[str]) -> None:
    """BOS/EOS added by encode(add_special_tokens=True) exactly when llama.cpp adds them."""
    bos, eos = token_id(gguf_file, "bos"), token_id(gguf_file, "eos")
    add_eos = bool(gguf_file.get("tokenizer.ggml.add_eos_token", False))
    prefix = [bos] if _add_bos_token(gguf_file) and bos is not None else []
    suffix = [eos] if add_eos and eos is not None else []
    if not prefix and not suffix:
        return
    special = [(tokens[i], i) for i in dict.fromkeys(prefix + suffix)]
    first, last = [tokens[i] for i in prefix], [tokens[i] for i in suffix]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*first, "$A", *last],
        pair=[*first, "$A", *last, *first, "$B", *last],
        special_tokens=special,
    )


def tokenizer_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, chat template and BOS/EOS policy."""
    tokens = gguf_file.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _add_bos_token(gguf_file),
        "add_eos_token": bool(gguf_file.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_file.arch_get("context_length", 2048)),
    }
    for key, name in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        index = token_id(gguf_file, name)
        if index is not None and 0 <= index < len(tokens):
            config[key] = tokens[index]
    template = gguf_file.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = str(template)
    return config


def end_token_ids(gguf_file: GGUFFile) -> list[int]:
    """Ids that end generation: EOS plus end-of-turn/end-of-message where the file names them."""
    ids = [token_id(gguf_file, name) for name in ("eos", "eot", "eom")]
    return list(dict.fromkeys(i for i in ids if i is not None))
