"""The EAGLE trainer's self-written queries: what is kept, and that the benchmark stays unseen."""

from bench.speculative import PROMPTS
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
