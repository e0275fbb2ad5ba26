"""ServeConfig: YAML loading, presets and flag layering, field-level errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from cluster.serve_config import PRESETS, EngineSettings, build_serve_config
from worker.config import ConfigError, EngineConfig

EXAMPLE = Path(__file__).parents[2] / "deploy" / "configs" / "local-cpu.yaml"


def test_engine_settings_mirror_engine_config() -> None:
    settings = {f.name: f.default for f in msgspec.structs.fields(EngineSettings)}
    config = {f.name: f.default for f in msgspec.structs.fields(EngineConfig) if f.name != "model"}
    assert settings == config


def test_the_example_config_loads() -> None:
    config = build_serve_config(EXAMPLE)
    assert config.replicas == 1 and config.router.port == 50051
    assert config.engine.kv_cache_bytes == 512 << 20
    assert config.engine.max_num_seqs == PRESETS["balanced"]["max_num_seqs"]


def test_layers_preset_then_file_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("preset: latency\nreplicas: 2\nengine:\n  max_num_batched_tokens: 1024\n")
    config = build_serve_config(file, {"replicas": 3, "router": {"port": 0}})
    assert config.engine.max_num_seqs == PRESETS["latency"]["max_num_seqs"]  # from the preset
    assert config.engine.max_num_batched_tokens == 1024  # the file beats the preset
    assert config.replicas == 3 and config.router.port == 0  # flags beat the file
    flagged = build_serve_config(file, {"preset": "throughput", "engine": {"max_num_seqs": 5}})
    assert flagged.engine.max_num_seqs == 5
    assert flagged.engine.max_num_batched_tokens == 1024


@pytest.mark.parametrize(("text", "message"), [
    ("engine:\n  max_num_seqz: 4\n", r"unknown field `max_num_seqz` - at `\$.engine`"),
    ("replicas: two\n", r"Expected `int`, got `str` - at `\$.replicas`"),
    ("engine:\n  block_size: 3\n", r"block_size must be a power of two.*at `\$.engine`"),
    ("router:\n  host: 0.0.0.0\n", r"refusing to serve '0.0.0.0' without api_keys"),
    ("preset: fastest\n", r"preset must be one of latency, balanced, throughput"),
    ("replicas: 0\n", r"replicas must be >= 1"),
    ("- a list\n", r"the top level must be a mapping"),
    ("engine: [\n", r"is not valid YAML"),
])
def test_bad_fields_fail_with_their_path(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        build_serve_config(file)
    assert str(err.value).startswith(str(file))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_serve_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("stream", [True, False])
def test_delta_stream_setting_reaches_the_replica_handles(tmp_path: Path, stream: bool) -> None:
    from types import SimpleNamespace

    from cluster.controller import Controller

    file = tmp_path / "c.yaml"
    file.write_text(f"replica:\n  delta_stream: {str(stream).lower()}\n  poll_timeout_s: 0.2\n")
    config = build_serve_config(file)
    controller = Controller(EngineConfig(model="m"), "m", 1, config.replica)
    handle = controller._handle(SimpleNamespace(replica_id="r0", actor=None))
    assert handle._use_stream is stream and handle.poll_timeout_s == 0.2
