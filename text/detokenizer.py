"""IncrementalDetokenizer: turn a stream of generated token ids into text deltas for streaming,
with stop strings.

Decoding token by token is wrong in two ways: a character may span several tokens (byte-level
BPE, SentencePiece byte fallback), and a token's text may depend on its neighbours (SentencePiece
drops the leading space of the first token it decodes). The fix (vLLM's and TGI's prefix/read
offsets) decodes a short window of ids with and without the new ones and emits the difference,
holding ids back while the window ends inside a character. `tokenizers.decoders.DecodeStream`
runs exactly that in Rust, about twice as fast as the same steps driven from Python, so it does
the per-token work here. Around it this class adds what DecodeStream lacks:
- context from the prompt: the stream is seeded with the last few prompt ids (not the whole
  prompt, which it would decode in full on the first step), so a leading space is kept exactly
  when it would be in decode(prompt + output);
- flush(): DecodeStream cannot hand back ids it holds when a request ends mid-character, so this
  class mirrors its window (context ids, unread ids) and decodes the tail itself;
- recovery: DecodeStream raises when a window's decoding does not extend the previous one (a
  decoder that rewrites earlier text); that request then continues with the same steps in
  Python, cutting such a window by length.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from text.tokenizer import Tokenizer

# How many prompt ids seed the window: enough to hold the start of any character a byte-level
# or byte-fallback token sequence can split (4 UTF-8 bytes) plus the token before it.
_PROMPT_CONTEXT_TOKENS = 5

# A UTF-8 character has at most 4 bytes, so a window moved back this far starts on a boundary.
_MAX_TOKENS_PER_CHAR = 4

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Per-request streaming detokenizer; one update() per engine step with the step's new ids.

    Invariants: the concatenation of everything update() and flush() return equals the output
    decoded after its prompt, cut at the first stop string (before it, or after it with
    include_stop_str_in_output). For byte-level BPE that is `tokenizer.decode(output_ids)`;
    for SentencePiece-style tokenizers the first token also keeps its leading space when the
    prompt has text, as in decode(prompt + output). No delta ends in half a character, and while
    stop strings are set the last max(len(stop)) - 1 characters are held back, so no prefix of a
    stop string is streamed before it is known not to complete.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._backend = tokenizer.backend
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in stop), default=1) - 1

        # The mirror of DecodeStream's window: _context are the ids whose text was accounted for
        # last (seeded from the prompt), _unread the ids after them not yet turned into text.
        context = self._prompt_context(prompt_token_ids)
        unread: list[int] = []
        # A prompt that ends mid-character (a request resubmitted with the tokens it already
        # generated) must not seed the stream with a broken prefix: its unfinished tail is
        # unread instead, and the completed character is emitted as output.
        while context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            unread.insert(0, context.pop())
        self._context = context
        self._unread = unread
        self._stream: DecodeStream | None = DecodeStream(
            ids=context, skip_special_tokens=skip_special_tokens
        )
        if unread:
            self._stream.step(self._backend, unread)

        self._pending = ""  # decoded, not yet emitted (held back for stop strings)
        self._emitted: list[str] = []
        self._finished = False
        self._matched_stop: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._matched_stop

    @property
    def finished(self) -> bool:
        """True once a stop string matched or flush() ran; later calls emit nothing."""
        return self._finished

    def update(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Add the step's new ids; return (text to emit now, stop string matched or None)."""
        if self._finished or not new_token_ids:
            return "", None
        self._unread.extend(new_token_ids)
        if self._stream is None:
            new_text = self._step_in_python()
        else:
            # A single int crosses into Rust faster than a one-element list (the common step).
            ids = new_token_ids[0] if len(new_token_ids) == 1 else list(new_token_ids)
            try:
                new_text = self._stream.step(self._backend, ids)
            except Exception:  # DecodeStreamError (InvalidPrefix) reaches Python as Exception
                # This request's decoder rewrites earlier text; finish it in Python, where such a
                # window is cut by length instead of failing.
                self._stream = None
                new_text = self._step_in_python()
        if new_text is None:  # still inside a character (or only skipped special tokens)
            return "", None
        self._context, self._unread = self._unread, []
        return self._emit(new_text)

    def flush(self) -> str:
        """The text still held back, for a request that ends for a reason other than a stop
        string (max_tokens, EOS, abort): stop-string hold-back plus an unfinished character,
        which decodes to U+FFFD just as tokenizer.decode(output) shows it."""
        if self._finished:
            return ""
        if self._unread:
            self._pending += self._decode_unread()
        self._finished = True
        tail, self._pending = self._pending, ""
        self._emitted.append(tail)
        return tail

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt ids, starting on a character boundary: a window that starts
        inside a character decodes differently once more bytes follow (byte fallback turns a
        whole invalid run of byte tokens into U+FFFDs), which would corrupt the first delta."""
        start = max(len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS, 0)
        earliest = max(start - _MAX_TOKENS_PER_CHAR, 0)
        while start > earliest and self._decode(prompt_token_ids[start:]).startswith(
            _REPLACEMENT_CHAR
        ):
            start -= 1
        return list(prompt_token_ids[start:])

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_unread(self) -> str:
        # Cut by length, not by prefix: when a decoder rewrote earlier text, what was emitted
        # cannot be taken back, and the lengths keep the total consistent.
        prefix = self._decode(self._context)
        return self._decode(self._context + self._unread)[len(prefix) :]

    def _step_in_python(self) -> str | None:
        """The same step as DecodeStream.step, over the mirrored window."""
        prefix = self._decode(self._context)
        full = self._decode(self._context + self._unread)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return None
        return full[len(prefix) :]

    def _emit(self, new_text: str) -> tuple[str, str | None]:
        if not self._stop:
            self._emitted.append(new_text)
            return new_text, None
        # Every stop string starting before _pending would have ended inside earlier text (we
        # hold back len(longest stop) - 1 characters), so searching _pending alone is complete.
        pending = self._pending + new_text
        hit_at, hit = -1, None
        for s in self._stop:
            i = pending.find(s)
            if i != -1 and (hit is None or i < hit_at):
                hit_at, hit = i, s
        if hit is not None:
            end = hit_at + len(hit) if self._include_stop else hit_at
            out = pending[:end]
            self._pending = ""
            self._finished = True
            self._matched_stop = hit
            self._emitted.append(out)
            return out, hit
        cut = max(len(pending) - self._hold, 0)
        out, self._pending = pending[:cut], pending[cut:]
        self._emitted.append(out)
        return out, None
