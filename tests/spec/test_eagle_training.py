"""bench/train_eagle.py end to end on a tiny target: a head trained from scratch, then grown into
an EAGLE-3 head reading a middle layer's stream (--resume --feature-layers), which the engine
loads, taps the right layer for, and drafts with exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.train_eagle import main as train_eagle
from tests.spec.test_eagle import eagle, make_engine, run


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> Path:
    return tiny_model_dir("llama-gqa")  # 2 layers


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """(prompt, answer) token ids as generate_chats caches them: the trainer reads the cache
    instead of generating (the tiny target has no tokenizer or chat template)."""
    rng = random.Random(0)
    pairs = [([rng.randrange(3, 256) for _ in range(6)], [rng.randrange(3, 256) for _ in range(18)])
             for _ in range(14)]
    path = tmp_path_factory.mktemp("chats") / "chats.json"
    path.write_text(json.dumps(pairs))
    return path


def _args(target: Path, chats: Path, out: Path, *more: str) -> list[str]:
    return ["--target", str(target), "--out", str(out), "--cache", str(chats),
            "--austen-tokens", "0", "--held-out", "2", "--vocab", "64", "--train-seconds", "1",
            "--batch", "4", "--k", "4", "--threads", "1", *more]


def test_train_then_grow_feature_layers(target, chats, tmp_path):
    first, grown = tmp_path / "first", tmp_path / "grown"
    assert train_eagle(_args(target, chats, first, "--true-context")) == 0
    record = json.loads((first / "eagle.json").read_text())
    assert len(record["config"]["vocab"]) == 64 and record["config"]["feature_layers"] == []
    assert record["held_out"]["chats"] == 2 and record["train"]["step"] > 0

    assert train_eagle(_args(target, chats, grown, "--resume", str(first),
                             "--feature-layers", "1")) == 0
    record = json.loads((grown / "eagle.json").read_text())
    assert record["config"]["feature_layers"] == [1]
    assert record["history"] == [json.loads((first / "eagle.json").read_text())["command"]]
    assert record["config"]["vocab"] == json.loads((first / "eagle.json").read_text())[
        "config"]["vocab"]  # a resumed head keeps its vocabulary
    assert load_file(str(grown / "eagle.safetensors"))["feature_proj.weight"].shape == (64, 128)

    plain = run(make_engine(target, None))
    eng = make_engine(target, eagle(grown, min_acceptance=0.0, eagle_min_confidence=0.0))
    assert eng.runner.hidden_layers == (1,)
    assert run(eng) == plain
    assert eng.spec.metrics.proposed_tokens > 0


def test_a_resumed_head_grows_its_vocabulary(target, chats, tmp_path):
    """--resume with a larger --vocab keeps the head's tokens first, in order, and adds the
    target's most often predicted others; the engine drafts with the grown head exactly."""
    first, grown = tmp_path / "first", tmp_path / "grown"
    assert train_eagle(_args(target, chats, first)) == 0
    args = _args(target, chats, grown, "--resume", str(first))
    args[args.index("--vocab") + 1] = "96"
    assert train_eagle(args) == 0
    old = json.loads((first / "eagle.json").read_text())["config"]["vocab"]
    record = json.loads((grown / "eagle.json").read_text())
    new = record["config"]["vocab"]
    assert new[:64] == old and 64 < len(new) <= 96 and len(set(new)) == len(new)
    assert record["vocab_coverage"] > json.loads((first / "eagle.json").read_text())[
        "vocab_coverage"]
    eng = make_engine(target, eagle(grown, min_acceptance=0.0, eagle_min_confidence=0.0))
    assert run(eng) == run(make_engine(target, None))
    assert eng.spec.metrics.proposed_tokens > 0


def test_feature_layers_are_checked(target, chats, tmp_path):
    with pytest.raises(SystemExit):  # the target has layers 0 and 1; 0 is the embedding
        train_eagle(_args(target, chats, tmp_path / "x", "--feature-layers", "2"))
    with pytest.raises(SystemExit):
        train_eagle(_args(target, chats, tmp_path / "y", "--feature-layers", "one"))


def test_feature_layers_must_come_in_order(tiny_model_dir, chats, tmp_path):
    """A row holds the streams in the order the forward meets their layers: a head listing
    them otherwise would read each stream as another."""
    kv4 = tiny_model_dir("llama-kv4")  # 4 layers
    with pytest.raises(SystemExit):
        train_eagle(_args(kv4, chats, tmp_path / "z", "--feature-layers", "3,1"))


def test_chats_from_several_caches_are_joined_in_order(target, chats, tmp_path):
    """--cache A,B trains on A's chats then B's (the held-out ones are A's first), as one file
    holding both would; a missing file is named, not generated into."""
    pairs = json.loads(chats.read_text())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(pairs[:5]))
    b.write_text(json.dumps(pairs[5:]))
    features = tmp_path / "features.pt"
    args = _args(target, chats, tmp_path / "head", "--features", str(features))
    args[args.index("--cache") + 1] = f"{a},{b}"
    assert train_eagle(args) == 0
    items = torch.load(features)["items"]
    assert [ids.tolist() for ids, _, _ in items] == [p + q for p, q in pairs]
    assert [start for _, _, start in items] == [len(p) - 1 for p, _ in pairs]
    assert json.loads((tmp_path / "head" / "eagle.json").read_text())["chats"] == len(pairs) - 2

    args[args.index("--cache") + 1] = f"{a},{tmp_path / 'missing.json'}"
    with pytest.raises(SystemExit):
        train_eagle(args)
    assert not (tmp_path / "missing.json").exists()


def test_generate_only_needs_one_cache_and_stops(target, chats, tmp_path):
    assert train_eagle(["--target", str(target), "--generate-only", "--cache", str(chats)]) == 0
    with pytest.raises(SystemExit):  # nowhere to write the chats
        train_eagle(["--target", str(target), "--generate-only"])
    with pytest.raises(SystemExit):  # nowhere to write the head
        train_eagle(["--target", str(target), "--cache", str(chats)])
