"""Reading the tokenizer-related files of a Hugging Face model folder.

A folder spreads what a tokenizer needs over several files, each optional except tokenizer.json:
tokenizer_config.json (special tokens, add_bos_token, chat template), chat_template.jinja (the
newer home of the template), special_tokens_map.json (legacy special tokens),
generation_config.json and config.json (eos/bos ids). These helpers read them with the same
precedence transformers uses, so `Tokenizer.from_dir` stays a short composition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The named special tokens transformers exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """The JSON object in `folder/name`, or {} when the file does not exist."""
    path = folder / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def token_content(value: Any) -> str | None:
    """A special token written either as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def token_ids(value: Any) -> list[int]:
    """An id field that configs write as an int, a list of ints, or null."""
    if isinstance(value, bool):  # bool is an int subclass; a bool here is a broken config
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def named_special_tokens(
    tokenizer_config: dict[str, Any], legacy_map: dict[str, Any]
) -> dict[str, str]:
    """bos_token, eos_token, ... as strings; tokenizer_config.json wins over special_tokens_map.json."""
    tokens: dict[str, str] = {}
    for name in NAMED_SPECIAL_TOKENS:
        content = token_content(tokenizer_config.get(name))
        if content is None:
            content = token_content(legacy_map.get(name))
        if content is not None:
            tokens[name] = content
    return tokens


def extra_special_tokens(tokenizer_config: dict[str, Any], legacy_map: dict[str, Any]) -> list[str]:
    """additional_special_tokens / extra_special_tokens (the v4 and v5 names of the same list)."""
    found: list[str] = []
    for source in (tokenizer_config, legacy_map):
        for key in ("extra_special_tokens", "additional_special_tokens"):
            values = source.get(key)
            if not isinstance(values, list):
                continue  # v5 may also write a dict of model-specific names; those are not tokens to add
            for value in values:
                content = token_content(value)
                if content is not None and content not in found:
                    found.append(content)
    return found


def chat_template_source(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja first (what transformers saves today), then
    tokenizer_config.json's chat_template, a string or a list of {"name", "template"}."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    value = tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        raise ValueError(
            f"{folder / 'tokenizer_config.json'} lists chat templates {sorted(map(str, named))} but "
            "none named 'default'; name one of them 'default' or write it to chat_template.jinja"
        )
    raise ValueError(
        f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        f"{{name, template}} objects, found {type(value).__name__}"
    )
