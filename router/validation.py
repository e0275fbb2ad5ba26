"""Turns public GenerateRequest / TokenizeRequest messages into internal ones, or says which
field the client must fix (InvalidInput)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from protos.messages import ModelCard, Request, SamplingParams
from protos.tandem.v1 import generation_pb2 as pb


class InvalidInput(ValueError):
    """The request is wrong; the message names the field and what to change."""


class TokenizerLike(Protocol):
    """What the router needs from text.tokenizer.Tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str: ...


# Longer inputs are tokenized on a worker thread so that one big prompt does not stall every
# stream on the event loop; shorter ones are not worth the thread hop.
_INLINE_TOKENIZE_CHARS = 4096
MAX_REQUEST_ID_CHARS = 256


def sampling_params(proto: pb.SamplingParams) -> SamplingParams:
    # ListFields names only the fields the client set (every scalar here is `optional`), in one
    # call instead of a HasField per field: this runs on every request's path to its first token.
    kwargs: dict[str, object] = {fd.name: value for fd, value in proto.ListFields()}
    kwargs["stop"] = tuple(kwargs.get("stop", ()))
    kwargs["stop_token_ids"] = tuple(kwargs.get("stop_token_ids", ()))
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:  # SamplingParams' message already names the field
        raise InvalidInput(f"sampling.{exc}") from None


class Validator:
    def __init__(self, tokenizer: TokenizerLike, card: ModelCard) -> None:
        self._tokenizer = tokenizer
        self._card = card
        self._vocab_size = card.vocab_size

    def check_model(self, name: str) -> None:
        if name and name != self._card.name:
            raise InvalidInput(f"model: unknown model {name!r}; this server serves "
                               f"{self._card.name!r} (or leave model empty)")

    @staticmethod
    def check_request_id(request_id: str) -> None:
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidInput(f"request_id: must be at most {MAX_REQUEST_ID_CHARS} printable "
                               "characters")

    async def generate_request(self, proto: pb.GenerateRequest, request_id: str) -> Request:
        """The internal Request for a GenerateRequest, tokenized and validated."""
        self.check_model(proto.model)
        self.check_request_id(proto.request_id)
        sampling = sampling_params(proto.sampling)
        kind = proto.WhichOneof("input")
        if kind == "text":
            if not proto.text:
                raise InvalidInput("text: the prompt is empty")
            ids = await self._encode(proto.text, add_special_tokens=True)
        elif kind == "token_ids":
            ids = list(proto.token_ids.ids)
            if not ids:
                raise InvalidInput("token_ids.ids: the prompt is empty")
            self._check_token_ids(ids)
        elif kind == "chat":
            ids = await self._encode_chat(proto.chat)
        else:
            raise InvalidInput("input: set one of text, token_ids or chat")
        if not ids:
            raise InvalidInput(f"{kind}: the prompt is empty after tokenization")
        # At least one position must remain for the output.
        if len(ids) >= self._card.max_model_len:
            raise InvalidInput(
                f"{kind}: the prompt has {len(ids)} tokens; {self._card.name} takes at most "
                f"{self._card.max_model_len - 1} (max_model_len {self._card.max_model_len} "
                "includes at least one output token)")
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=sampling,
            cache_salt=proto.cache_salt if proto.HasField("cache_salt") else None,
            arrival_time=time.time(),
        )

    async def tokenize(self, proto: pb.TokenizeRequest) -> list[int]:
        self.check_model(proto.model)
        kind = proto.WhichOneof("input")
        if kind == "text":
            add_special = (proto.add_special_tokens
                           if proto.HasField("add_special_tokens") else True)
            return await self._encode(proto.text, add_special_tokens=add_special)
        if kind == "chat":
            return await self._encode_chat(proto.chat)
        raise InvalidInput("input: set one of text or chat")

    def _check_token_ids(self, ids: list[int]) -> None:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self._vocab_size:
            i = next(i for i, t in enumerate(ids) if not 0 <= t < self._vocab_size)
            raise InvalidInput(f"token_ids.ids[{i}]: {ids[i]} is outside the vocabulary "
                               f"[0, {self._vocab_size})")

    async def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(await asyncio.to_thread(self._tokenizer.encode, text,
                                            add_special_tokens=add_special_tokens))

    async def _encode_chat(self, chat: pb.ChatMessages) -> list[int]:
        if not chat.messages:
            raise InvalidInput("chat.messages: the conversation is empty")
        messages = []
        for i, m in enumerate(chat.messages):
            if not m.role:
                raise InvalidInput(f"chat.messages[{i}].role: must be set (e.g. 'user')")
            messages.append({"role": m.role, "content": m.content})
        add_prompt = (chat.add_generation_prompt
                      if chat.HasField("add_generation_prompt") else True)
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt)
        except Exception as exc:  # template errors (e.g. roles must alternate) are the client's
            raise InvalidInput(f"chat.messages: cannot render them with the model's chat "
                               f"template: {exc}") from None
        # The template already wrote the special tokens (BOS) it wants.
        return await self._encode(text, add_special_tokens=False)
