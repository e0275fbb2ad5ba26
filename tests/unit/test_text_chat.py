"""apply_chat_template against transformers' rendering of the same template."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.unit.text_tokenizers import byte_level_folder, corpus_lines, sentencepiece_folder
from text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Exercises what differs between a naive jinja2 setup and transformers': trim_blocks and
# lstrip_blocks on indented blocks, tojson without HTML escaping, namespace(), loop controls,
# a {% generation %} block, strftime_now, extra kwargs and the special-token variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(users=0) %}
{% if tools %}
    <tools>{{ tools | tojson }}</tools>
    <pretty>{{ tools | tojson(indent=2) }}</pretty>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {% set ns.users = ns.users + 1 %}
    {% endif %}
    {% if message['role'] == 'stop' %}
        {% break %}
    {% endif %}
    <|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {% else %}
        {{ message['content'] }}
    {% endif %}
<|im_end|>
{% endfor %}
users={{ ns.users }} year={{ strftime_now('%Y') }} custom={{ custom_var | default('none') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 日本語? 😀"},
        {"role": "assistant", "content": "  A language.  "},
        {"role": "user", "content": "  spaces\n\nand newlines  "},
    ],
    [
        {"role": "user", "content": "a <b> & 'c'"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "user", "content": "x"},
    ],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    lines = corpus_lines(100_000)
    chatml = byte_level_folder(root / "chatml", lines)
    llama = sentencepiece_folder(root / "llama", lines)
    features = root / "features"
    shutil.copytree(chatml, features)
    config = json.loads((features / "tokenizer_config.json").read_text())
    config["chat_template"] = FEATURE_TEMPLATE
    config["bos_token"] = "<|endoftext|>"
    (features / "tokenizer_config.json").write_text(json.dumps(config))
    return {"chatml": chatml, "llama": llama, "features": features}


@pytest.fixture(scope="module", params=["chatml", "llama", "features"])
def pair(request, folders):
    folder = folders[request.param]
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _reference(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(pair, add_generation_prompt):
    ours, hf = pair
    for messages in CONVERSATIONS:
        try:
            expected = _reference(hf, messages, add_generation_prompt=add_generation_prompt)
        except Exception:
            # The template rejects this chat (Llama 2: roles must alternate): so must we.
            with pytest.raises(ValueError, match="rejected"):
                ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            continue
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert got == expected


def test_tools_and_kwargs_match_transformers(folders):
    folder = folders["features"]
    ours = Tokenizer.from_dir(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tools = [{"name": "lookup", "description": "find <things> & 'more' — 日本", "n": 1.5}]
    messages = [
        *CONVERSATIONS[1],
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "y"},
    ]
    expected = _reference(hf, messages, add_generation_prompt=True, tools=tools, custom_var="ok")
    assert "<things>" in expected  # tojson must not HTML-escape
    got = ours.apply_chat_template(messages, tools=tools, custom_var="ok")
    assert got == expected


def test_raise_exception_becomes_value_error(folders):
    ours = Tokenizer.from_dir(folders["llama"])
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template(bad)


def test_no_template_says_to_send_plain_prompts(tmp_path, folders):
    folder = tmp_path / "plain"
    shutil.copytree(folders["chatml"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(folder)
    assert ours.chat_template is None
    with pytest.raises(ValueError, match=r"no chat template.*plain prompts"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "list"),
        ({"role": "user", "content": "hi"}, "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\]"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\].*'role'"),
        ([{"role": "user"}], "'content'"),
        ([{"role": 3, "content": "x"}], "role"),
    ],
)
def test_bad_messages_name_the_problem(folders, messages, problem):
    ours = Tokenizer.from_dir(folders["chatml"])
    with pytest.raises(ValueError, match=problem):
        ours.apply_chat_template(messages)


def test_template_compiled_once(folders):
    ours = Tokenizer.from_dir(folders["chatml"])
    ours.apply_chat_template(CONVERSATIONS[0])
    compiled = ours._chat._template()
    ours.apply_chat_template(CONVERSATIONS[1])
    assert ours._chat._template() is compiled


def test_sandbox_blocks_attribute_escape(tmp_path, folders):
    folder = tmp_path / "evil"
    shutil.copytree(folders["chatml"], folder)
    (folder / "chat_template.jinja").write_text(
        "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    )
    ours = Tokenizer.from_dir(folder)
    with pytest.raises(ValueError):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
