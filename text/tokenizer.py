"""Tokenizer: a Hugging Face `tokenizers` tokenizer plus what a server needs around it (BOS/EOS
ids, chat template), giving the same ids and prompts as transformers without importing it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from text import hf_folder
from text.chat_template import ChatTemplate, validate_messages


class Tokenizer:
    """Encode, decode and chat-template rendering for one model.

    `tok` is owned by this object from here on. `add_bos=True` means encode(...,
    add_special_tokens=True) must start with BOS; it is prepended only when tok's own
    post-processor does not already add it, so BOS never appears twice.
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        add_bos: bool = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens_map: dict[str, str] | None = None,
    ) -> None:
        self._tok = tok
        self._bos_token_id = bos_token_id
        self._eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self._chat = ChatTemplate(chat_template) if chat_template is not None else None
        # What chat templates see as bos_token, eos_token, unk_token, ...; transformers leaves an
        # unset token undefined (renders as "") rather than None (would render as "None").
        self._template_tokens = dict(special_tokens_map or {})
        if bos_token is not None:
            self._template_tokens["bos_token"] = bos_token
        if eos_token is not None:
            self._template_tokens["eos_token"] = eos_token
        self._prepend_bos = (
            add_bos and bos_token_id is not None and not self._post_processor_adds(bos_token_id)
        )

    def _post_processor_adds(self, token_id: int) -> bool:
        # Compare one encoding with and without special tokens instead of inspecting the
        # post-processor's JSON: it covers every processor type (Template, Roberta, Sequence).
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        without = self._tok.encode("a", add_special_tokens=False).ids
        return with_special[:1] == [token_id] and without[:1] != [token_id]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model folder (tokenizer.json required; tokenizer_config.json,
        chat_template.jinja, special_tokens_map.json, generation_config.json, config.json read
        when present), matching what transformers' AutoTokenizer would do."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the model folder needs a tokenizer.json (the "
                "Hugging Face `tokenizers` format); models with only a SentencePiece "
                "tokenizer.model must be converted first"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_file} could not be loaded: {e}") from e

        config = hf_folder.read_json(folder, "tokenizer_config.json")
        legacy_map = hf_folder.read_json(folder, "special_tokens_map.json")
        generation = hf_folder.read_json(folder, "generation_config.json")
        model_config = hf_folder.read_json(folder, "config.json")

        # transformers encodes without the padding/truncation a tokenizer.json may carry.
        tok.no_padding()
        tok.no_truncation()
        named = hf_folder.named_special_tokens(config, legacy_map)
        _register_special_tokens(
            tok, [*named.values(), *hf_folder.extra_special_tokens(config, legacy_map)]
        )

        bos_token = named.get("bos_token")
        eos_token = named.get("eos_token")
        bos_id = tok.token_to_id(bos_token) if bos_token is not None else None
        if bos_id is None:
            bos_id = _first(hf_folder.token_ids(generation.get("bos_token_id")))
        if bos_id is None:
            bos_id = _first(hf_folder.token_ids(model_config.get("bos_token_id")))

        eos_ids = [
            *hf_folder.token_ids(generation.get("eos_token_id")),
            *hf_folder.token_ids(model_config.get("eos_token_id")),
        ]
        if eos_token is not None and (eos_id := tok.token_to_id(eos_token)) is not None:
            eos_ids.append(eos_id)

        # transformers 5 ignores add_bos_token/add_eos_token when a tokenizer.json exists: its
        # post-processor decides (Llama 3's adds <|begin_of_text|>, Llama 2's adds <s>). Only a
        # tokenizer.json without one (some converted folders) takes add_bos_token from the
        # config, as transformers 4's Llama-family classes did; such models need their BOS.
        add_bos = tok.post_processor is None and bool(config.get("add_bos_token", False))

        return cls(
            tok,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=hf_folder.chat_template_source(folder, config),
            add_bos=add_bos,
            bos_token=bos_token,
            eos_token=eos_token,
            special_tokens_map=named,
        )

    # --- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self._bos_token_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        # encode_batch_fast skips offset tracking and runs the batch on Rust threads.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        if add_special_tokens and self._prepend_bos:
            return [[self._bos_token_id, *e.ids] for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # Note: transformers' clean_up_tokenization_spaces (off by default in 5.x) is not applied;
        # it would make decoding non-incremental (" ." becomes "." only once the dot arrives).
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- properties ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat.source if self._chat is not None else None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for the incremental detokenizer and tests)."""
        return self._tok

    # --- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt string for a chat, exactly as transformers'
        `apply_chat_template(messages, tokenize=False, ...)` renders it. Encode the result with
        add_special_tokens=False: templates write BOS themselves where the model wants it."""
        if self._chat is None:
            raise ValueError(
                "this model has no chat template (no chat_template in tokenizer_config.json and "
                "no chat_template.jinja); send plain prompts (completions) instead of chat messages"
            )
        chat = validate_messages(messages)
        return self._chat.render(chat, add_generation_prompt, {**self._template_tokens, **kwargs})


def _first(values: list[int]) -> int | None:
    return values[0] if values else None


def _register_special_tokens(tok: tokenizers.Tokenizer, contents: list[str]) -> None:
    """Make the config's special tokens added special tokens of `tok`, as transformers does on
    load, so "</s>" typed in a prompt encodes as the eos id and skip_special_tokens drops it.
    A token already in the vocabulary keeps its id."""
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [c for c in dict.fromkeys(contents) if c not in known]
    if missing:
        tok.add_special_tokens(
            [tokenizers.AddedToken(c, special=True, normalized=False) for c in missing]
        )
