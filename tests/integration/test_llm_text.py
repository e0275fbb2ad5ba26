"""The offline LLM API with a real tokenizer: text, stop strings across tokens, chat."""

from __future__ import annotations

import pytest

from cluster.llm import LLM
from protos.messages import SamplingParams
from tests.integration.serve_utils import text_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(str(text_model(tmp_path_factory.mktemp("textmodel"))), dtype="float32",
               kv_cache_bytes=1 << 24, block_size=4)


def test_text_equals_decoded_tokens(llm):
    out = llm.generate(["It is a truth universally", "Emma Woodhouse, handsome,"],
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for o in out:
        assert len(o.token_ids) == 24
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.finish_reason == "length"


def test_stop_string_spanning_tokens_cuts_text(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (full,) = llm.generate(["It is a truth universally"], params)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    start = next(i for i in range(2, len(pieces)) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    prefix_len = len("".join(pieces[:start])) + 1
    stop = full.text[prefix_len:prefix_len + len(pieces[start]) - 1 + len(pieces[start + 1])]
    assert len(stop) >= 2
    first = full.text.find(stop)
    (cut,) = llm.generate(["It is a truth universally"],
                          SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                         stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:first]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    (kept,) = llm.generate(["It is a truth universally"],
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                          stop=(stop,), include_stop_str_in_output=True))
    assert kept.text == full.text[:first + len(stop)]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_streamed_deltas_concatenate_to_the_text(llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    streamed = "".join(d.text for d in llm.stream("She was the youngest", params))
    (whole,) = llm.generate(["She was the youngest"], params)
    assert streamed == whole.text


def test_chat_uses_the_models_template(llm):
    import transformers as tf

    messages = [{"role": "user", "content": "Who is Mr. Darcy?"}]
    ref = tf.AutoTokenizer.from_pretrained(llm.model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert llm.render_chat(messages) == ref
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert out.prompt_token_ids == llm.tokenizer.encode(ref, add_special_tokens=False)
    assert len(out.token_ids) == 5


def test_bad_sampling_values_name_the_field():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be"):
        SamplingParams(temperature=-1)
