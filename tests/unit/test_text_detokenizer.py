"""IncrementalDetokenizer: streamed deltas against a full decode of the same ids."""

from __future__ import annotations

import random

import pytest

from tests.unit.text_tokenizers import (
    TEXTS,
    byte_level_folder,
    corpus_lines,
    sentencepiece_folder,
)
from text.detokenizer import IncrementalDetokenizer
from text.tokenizer import Tokenizer

PROMPTS = ["", "The capital of France is", "日本"]
OUTPUTS = [t for t in TEXTS if "<" not in t] + [
    "Elizabeth said 😀 and then 👨‍👩‍👧 — ok.\n\nCJK 中文 done",
    "café\u0301 日本語のテキスト 🇫🇷🇫🇷",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("detok")
    lines = corpus_lines(100_000)
    return {
        "byte_level": Tokenizer.from_dir(byte_level_folder(root / "bl", lines)),
        "sentencepiece": Tokenizer.from_dir(sentencepiece_folder(root / "sp", lines)),
    }


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tok(request, tokenizers) -> Tokenizer:
    return tokenizers[request.param]


def reference(tok: Tokenizer, prompt: list[int], output: list[int], skip=True) -> str:
    """The output's text in context: what decode(prompt + output) adds to decode(prompt)."""
    before = tok.decode(prompt, skip)
    full = tok.decode(prompt + output, skip)
    assert full.startswith(before)
    return full[len(before) :]


def stream(detok: IncrementalDetokenizer, output: list[int], chunk_sizes=None):
    """Feed ids one step at a time (or in chunks, as speculative decoding does)."""
    deltas, stop, i, rng = [], None, 0, random.Random(0)
    while i < len(output) and stop is None:
        n = 1 if chunk_sizes is None else rng.choice(chunk_sizes)
        delta, stop = detok.update(output[i : i + n])
        deltas.append(delta)
        i += n
    return deltas, stop


@pytest.mark.parametrize("chunk_sizes", [None, [1, 2, 3, 5]])
def test_deltas_concatenate_to_decode(tok, chunk_sizes):
    for prompt_text in PROMPTS:
        prompt = tok.encode(prompt_text)
        for text in OUTPUTS:
            output = tok.encode(text, add_special_tokens=False)
            detok = IncrementalDetokenizer(tok, prompt)
            deltas, stop = stream(detok, output, chunk_sizes)
            deltas.append(detok.flush())
            expected = reference(tok, prompt, output)
            assert stop is None
            assert "".join(deltas) == expected == detok.text, (prompt_text, text)
            assert not any("\ufffd" in d for d in deltas), deltas


def test_byte_level_equals_plain_decode(tokenizers):
    tok = tokenizers["byte_level"]
    for text in OUTPUTS:
        output = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, tok.encode("Some prompt"))
        deltas, _ = stream(detok, output)
        assert "".join(deltas) + detok.flush() == tok.decode(output)


def test_sentencepiece_keeps_leading_space_after_prompt(tokenizers):
    tok = tokenizers["sentencepiece"]
    output = tok.encode(" Paris", add_special_tokens=False)
    after_text = IncrementalDetokenizer(tok, tok.encode("The capital is"))
    assert "".join(stream(after_text, output)[0]) == reference(
        tok, tok.encode("The capital is"), output
    )
    assert after_text.text.startswith(" ")
    # After BOS alone (start of text) the space is dropped, as decode(output) does.
    after_bos = IncrementalDetokenizer(tok, [tok.bos_token_id])
    assert "".join(stream(after_bos, output)[0]) == tok.decode(output)


def test_split_characters_are_held_until_complete(tok):
    output = tok.encode("ok 😀 日本", add_special_tokens=False)
    # The test means something only if some id alone is half a character.
    assert any(tok.decode([i]).endswith("\ufffd") for i in output)
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    for i in output:
        delta, _ = detok.update([i])
        assert "\ufffd" not in delta


def test_flush_returns_unfinished_character_like_decode(tok):
    output = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    prompt = tok.encode("Hi")
    expected = reference(tok, prompt, output)
    assert expected.endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, prompt)
    deltas, _ = stream(detok, output)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.flush() == expected
    assert detok.flush() == ""
    assert detok.update(output) == ("", None)


def _stop_cases(text: str, tok: Tokenizer, output: list[int]) -> list[str]:
    """Stop strings that cross a token boundary and ones that sit inside one token."""
    spans, pos = [], 0
    for i in range(1, len(output) + 1):
        end = len(tok.decode(output[:i]))
        spans.append((pos, end))
        pos = end
    cases = []
    for start, end in spans[2:]:
        if end - start >= 4:  # inside a token: its middle two characters
            cases.append(text[start + 1 : start + 3])
            break
    for start, end in spans[3:]:
        if end - start >= 2 and start >= 2:  # across a boundary: 2 chars before, 2 after
            cases.append(text[start - 2 : start + 2])
            break
    return cases


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(tokenizers, include):
    tok = tokenizers["byte_level"]  # decode(output) == text, so spans map onto the text
    text = OUTPUTS[1]
    output = tok.encode(text, add_special_tokens=False)
    stops = _stop_cases(text, tok, output)
    assert len(stops) == 2
    for stop in stops:
        at = text.find(stop)
        expected = text[: at + len(stop)] if include else text[:at]
        detok = IncrementalDetokenizer(
            tok, tok.encode("p"), stop=(stop,), include_stop_str_in_output=include
        )
        deltas, matched = stream(detok, output)
        assert matched == stop
        assert "".join(deltas) == expected == detok.text
        # Nothing after the stop string, ever.
        assert detok.update(output[:3]) == ("", None)
        assert detok.flush() == ""
        assert detok.matched_stop == stop and detok.finished


def test_earliest_stop_string_wins(tokenizers):
    tok = tokenizers["sentencepiece"]
    text = "one two three four five"
    output = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Count:")
    full = reference(tok, prompt, output)
    detok = IncrementalDetokenizer(tok, prompt, stop=("four", "two thr", "zzz"))
    deltas, matched = stream(detok, output, [1, 3])
    assert matched == "two thr"
    assert "".join(deltas) == full[: full.find("two thr")]


def test_hold_back_never_streams_part_of_a_stop_string(tok):
    text = OUTPUTS[-2]
    stop = "Elizabeth sa!d"  # shares a long prefix with the text but never matches
    hold = len(stop) - 1
    prompt = tok.encode("Q:")
    output = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, stop=(stop, "x"))
    emitted, complete = "", ""
    for k, token_id in enumerate(output, start=1):
        delta, matched = detok.update([token_id])
        assert matched is None
        emitted += delta
        decoded = reference(tok, prompt, output[:k])
        if not decoded.endswith("\ufffd"):
            complete = decoded  # what the detokenizer has been able to decode so far
        assert emitted == complete[: max(len(complete) - hold, 0)]
    assert emitted + detok.flush() == reference(tok, prompt, output)


def test_special_tokens_kept_when_not_skipped(tokenizers):
    tok = tokenizers["byte_level"]
    output = tok.encode("Hi there<|im_end|>", add_special_tokens=False)
    prompt = tok.encode("<|im_start|>assistant\n")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas, _ = stream(detok, output)
        got = "".join(deltas) + detok.flush()
        assert got == reference(tok, prompt, output, skip)
        assert ("<|im_end|>" in got) is (not skip)


def test_prompt_ending_mid_character_completes_in_output(tokenizers):
    """A resubmitted request: prompt + generated ids that stop inside an emoji."""
    tok = tokenizers["byte_level"]
    ids = tok.encode("go 😀 done", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    prompt, output = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tok, prompt)
    deltas, _ = stream(detok, output)
    text = "".join(deltas) + detok.flush()
    assert text == tok.decode(ids)[len(tok.decode(prompt).rstrip("\ufffd")) :]
    assert "😀" in text


def test_recovers_when_decode_stream_refuses(tokenizers):
    """DecodeStream raises when a decoder rewrites earlier text; the step is redone by hand."""
    tok = tokenizers["byte_level"]
    prompt = tok.encode("Say:")
    output = tok.encode(OUTPUTS[-2], add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)

    class Refusing:
        def step(self, backend, ids):
            raise Exception("Invalid prefix encountered")

    deltas = []
    for k, token_id in enumerate(output):
        if k == len(output) // 2:
            detok._stream = Refusing()
        deltas.append(detok.update([token_id])[0])
    assert "".join(deltas) + detok.flush() == reference(tok, prompt, output)


def test_rejects_empty_stop_string(tokenizers):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizers["byte_level"], [], stop=("",))
