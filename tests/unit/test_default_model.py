"""resolve_model: default model from a (cached) wheel, .gguf files, folders, and failures."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

import cluster.default_model as default_model
from cluster.default_model import DEFAULT_MODEL, ModelNotAvailable, resolve_model
from tests.gguf_utils import tiny_llama_gguf

FAKE_REQUIREMENT = "tiny-model==1.0"
FAKE_MEMBER = "tiny_model/tiny.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_fetch_failure_says_what_to_do(tmp_path: Path) -> None:
    requirement = "tandem-no-such-package-for-tests==0.0.1"
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable) as raised:
        resolve_model(None, tmp_path, wheel_requirement=requirement)
    message = str(raised.value)
    assert requirement in message and "PyPI" in message and "--model" in message
    assert "\n" not in message
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()
    print(f"pip failure took {time.perf_counter() - start:.1f}s")


def test_default_model_from_cached_wheel_converts_once(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tiny_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.write(tiny_gguf, FAKE_MEMBER)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached wheel must not be downloaded again")

    monkeypatch.setattr(default_model.subprocess, "run", no_pip)
    folder = resolve_model(None, tmp_path, wheel_requirement=FAKE_REQUIREMENT, wheel_member=FAKE_MEMBER)
    assert folder == tmp_path / "models" / DEFAULT_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("a converted folder must be reused")

    monkeypatch.setattr(default_model, "convert_gguf", no_conversion)
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL, tmp_path, wheel_requirement=FAKE_REQUIREMENT, wheel_member=FAKE_MEMBER) == folder
    assert time.perf_counter() - start < 1.0


def test_damaged_wheel_is_removed(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "tiny_model-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelNotAvailable, match="download it afresh"):
        resolve_model(None, tmp_path, wheel_requirement=FAKE_REQUIREMENT, wheel_member=FAKE_MEMBER)
    assert not any(wheels.iterdir())


def test_gguf_file_is_converted_once_and_keyed_by_file(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = resolve_model(str(tiny_gguf), cache)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    calls: list[Path] = []
    real_convert = default_model.convert_gguf
    monkeypatch.setattr(default_model, "convert_gguf", lambda *a, **k: calls.append(a[0]) or real_convert(*a, **k))
    assert resolve_model(str(tiny_gguf), cache) == folder
    assert calls == []
    # A different file under the same name (other size/mtime) gets its own folder.
    copy = tmp_path / "other" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes() + b"\0" * 32)
    other = resolve_model(str(copy), cache)
    assert other != folder and calls == [copy]
    bf16 = resolve_model(str(tiny_gguf), cache, dtype="bfloat16")
    assert bf16 != folder and json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_folder_without_config_points_at_its_gguf(tmp_path: Path) -> None:
    (tmp_path / "m.Q4_K.gguf").write_bytes(b"")
    with pytest.raises(ModelNotAvailable, match=r"no config.json.*--model .*m\.Q4_K\.gguf"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_unknown_model_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match=r"neither a folder nor a \.gguf file"):
        resolve_model("no/such-model", tmp_path)


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path / "tandem"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.default_cache_dir() == Path.home() / ".cache" / "tandem"
