"""The EAGLE trainer's self-written queries: what is kept, and that the benchmark stays unseen;
the benchmark's rows for a head's held-out chats."""

import json

import pytest

from bench.speculative import PROMPTS, held_out_chats
from bench.train_eagle import usable_query


def test_every_benchmark_chat_question_is_refused():
    chats = [text for name, (text, chat) in PROMPTS.items() if chat and name.startswith("chat")]
    assert len(chats) == 5
    for text in chats:
        assert not usable_query(text, 20), text


def test_queries_kept_and_dropped():
    assert usable_query("Can you explain to me the pros and cons of owning a snake?", 14)
    # "team" and "teach" are not "tea"; "engineer" is not "engine"
    assert usable_query("How do I teach my team to work with an engineer?", 13)
    assert not usable_query("What is a VAR?", 5)  # too short to be a real request
    assert not usable_query("Im rapidamente: 富僽香言？ 富僽香言？", 20)  # drifted off English
    assert not usable_query("Which teas are best brewed at a lower temperature? Green tea?", 14)
    assert not usable_query("Why is the ocean blue?", 8)


def test_held_out_chats_are_the_caches_first_prompts(tmp_path):
    cache = tmp_path / "chats.json"
    pairs = [([1, 2, i], [7, 8]) for i in range(30)]
    cache.write_text(json.dumps(pairs))
    assert held_out_chats(f"{cache}:3") == {f"held-out-{i}": ([1, 2, i], True) for i in range(3)}
    assert list(held_out_chats(str(cache))) == [f"held-out-{i}" for i in range(24)]
    with pytest.raises(SystemExit, match="chat cache"):
        held_out_chats(f"{cache}:x")
    with pytest.raises(SystemExit, match="chat cache"):
        held_out_chats(str(tmp_path / "missing.json"))
