"""Tokenizer against transformers (the reference) on small tokenizers trained in the fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from tests.unit.text_tokenizers import (
    TEXTS,
    build_byte_level,
    byte_level_folder,
    corpus_lines,
    sentencepiece_folder,
)
from text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return corpus_lines()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, lines) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte_level": byte_level_folder(root / "byte_level", lines),
        "sentencepiece": sentencepiece_folder(root / "sentencepiece", lines),
    }


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def pair(request, folders):
    folder = folders[request.param]
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens) == expected, text


def test_encode_batch_matches_encode(pair):
    ours, _ = pair
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.encode_batch(TEXTS, add_special_tokens=False) == [
        ours.encode(t, add_special_tokens=False) for t in TEXTS
    ]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        expected = hf.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens) == expected, text


def test_bos_added_once_sentencepiece(folders):
    # tokenizer.json's post-processor adds <s> and add_bos_token is true: one BOS, not two.
    ours = Tokenizer.from_dir(folders["sentencepiece"])
    ids = ours.encode("Hello")
    assert ids[0] == ours.bos_token_id
    assert ids[1] != ours.bos_token_id
    assert ours.encode("Hello", add_special_tokens=False) == ids[1:]


def test_properties_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.chat_template is not None
    if hf.bos_token_id is not None:
        assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids


def test_eos_ids_union_in_order(folders):
    folder = folders["byte_level"]
    generation = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    config = json.loads((folder / "config.json").read_text())["eos_token_id"]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = list(dict.fromkeys([*generation, config, hf.eos_token_id]))
    ours = Tokenizer.from_dir(folder)
    assert ours.eos_token_ids == expected
    assert len(set(expected)) == 3  # the union really merges three sources
    # tokenizer_config has bos_token null: the id comes from config.json's bos_token_id.
    assert ours.bos_token_id == json.loads((folder / "config.json").read_text())["bos_token_id"]


def test_post_processor_bos_without_add_bos_token(tmp_path, folders):
    """Llama 3 layout: tokenizer.json's post-processor adds BOS, the config says nothing."""
    folder = tmp_path / "llama3_like"
    shutil.copytree(folders["byte_level"], folder)
    tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    bos_id = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    ours = Tokenizer.from_dir(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert ours.encode("hi")[0] == bos_id
    assert ours.encode("hi")[1] != bos_id


def test_post_processor_decides_over_add_bos_token(tmp_path, folders):
    """transformers 5 ignores add_bos_token when tokenizer.json has a post-processor."""
    folder = tmp_path / "no_bos"
    shutil.copytree(folders["sentencepiece"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_add_bos_token_without_post_processor(tmp_path, folders):
    """No post-processor in tokenizer.json: add_bos_token adds BOS (transformers 4 Llama
    behaviour; transformers 5's generic class would drop it, which breaks such models)."""
    folder = tmp_path / "no_post_processor"
    shutil.copytree(folders["sentencepiece"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_dir(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        assert ours.encode(text) == [ours.bos_token_id, *hf(text)["input_ids"]], text
        assert (
            ours.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False)["input_ids"]
        )


def test_constructor_add_bos_prepends_once(lines):
    tok = build_byte_level(lines)
    bos = tok.token_to_id("<|endoftext|>")
    plain = Tokenizer(tok, bos_token_id=bos, eos_token_ids=[bos], chat_template=None)
    with_bos = Tokenizer(
        tok, bos_token_id=bos, eos_token_ids=[bos], chat_template=None, add_bos=True
    )
    for text in TEXTS:
        body = plain.encode(text)
        assert with_bos.encode(text) == [bos, *body]
        assert with_bos.encode(text, add_special_tokens=False) == body
    assert with_bos.encode_batch(TEXTS) == [with_bos.encode(t) for t in TEXTS]

    # A post-processor that already adds BOS: add_bos must not add a second one.
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    both = Tokenizer(tok, bos_token_id=bos, eos_token_ids=[bos], chat_template=None, add_bos=True)
    assert both.encode("Hello there") == [
        bos,
        *plain.encode("Hello there", add_special_tokens=False),
    ]


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_broken_config_json_names_the_file(tmp_path, folders):
    folder = tmp_path / "broken"
    shutil.copytree(folders["byte_level"], folder)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json"):
        Tokenizer.from_dir(folder)


def test_chat_template_list_picks_default(folders):
    folder = folders["sentencepiece"]
    listed = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    default = next(t["template"] for t in listed if t["name"] == "default")
    assert Tokenizer.from_dir(folder).chat_template == default


def test_chat_template_jinja_file_wins(tmp_path, folders):
    folder = tmp_path / "jinja"
    shutil.copytree(folders["byte_level"], folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    ours = Tokenizer.from_dir(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
