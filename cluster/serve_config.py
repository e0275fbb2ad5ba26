"""ServeConfig: the one validated source of truth for a deployment, from YAML and flags to actors.

Layers, later ones winning: field defaults < the preset's engine settings < the YAML file <
command-line flags. Unknown or mistyped fields fail with the field's path (`$.engine.foo`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from cluster.autoscaler import AutoscalerConfig
from cluster.deployment_ops import check_ops_fields
from router.config import RouterConfig
from worker.config import ConfigError, Dtype, EngineConfig, Quantization
from worker.spec.config import SpeculativeConfig

Preset = Literal["latency", "throughput", "balanced"]

# What each preset means for the scheduler: few short batches for a fast first token, or large
# batches that keep the model busy at the cost of per-request latency.
PRESETS: dict[str, dict[str, int]] = {
    "latency": {"max_num_seqs": 8, "max_num_batched_tokens": 512},
    "balanced": {"max_num_seqs": 64, "max_num_batched_tokens": 2048},
    "throughput": {"max_num_seqs": 256, "max_num_batched_tokens": 8192},
}


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """EngineConfig without `model` (ServeConfig names the model once for all replicas).

    Mirrors EngineConfig field for field; tests/unit/test_serve_config.py keeps them in step.
    """

    dtype: Dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.9
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    seed: int = 0
    num_threads: int | None = None
    quantization: Quantization | None = None
    quant_group_size: int = 32
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        # EngineConfig's own checks, here so that a bad value fails at load time with its path.
        self.engine_config("unused")

    def engine_config(self, model: str) -> EngineConfig:
        return EngineConfig(model=model, **msgspec.structs.asdict(self))


class ReplicaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How each replica is placed and watched."""

    num_cpus: float = 1.0  # CPUs reserved per replica bundle
    num_gpus: int = 0  # 0: CPU replica; 1: one GPU per bundle (one bundle per rank)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_layers: list[int] | None = None  # decoder layers per stage; None: even split
    # Extra resources per pipeline stage's bundles (e.g. [{"node:pool-a": 0.01}, ...]) to pin
    # stages to node pools; empty: no extra resources.
    stage_resources: list[dict[str, float]] = []
    collective_timeout_s: float = 60.0  # a collective or pipeline receive waiting longer fails
    start_timeout_s: float = 600.0  # placement group ready + model loaded
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    # A long-poll returns after this even without a step. Any step returns it sooner and a dead
    # actor fails it at once; a short timeout only re-polls through every long prefill step.
    poll_timeout_s: float = 0.5
    # Poll results over the replica's delta stream (plain TCP guarded by a secret; see
    # cluster/delta_stream.py) instead of one actor call per step. Off where the cluster's
    # traffic must be encrypted (Ray TLS): actor calls go through Ray's own channels.
    delta_stream: bool = True
    restart_backoff_s: float = 2.0  # first wait before retrying a failed replacement
    # Custom Ray resources every bundle also reserves, e.g. {"tandem_replica": 1} declared only
    # on worker nodes keeps replicas off the head (deploy/README.md).
    resources: dict[str, float] = {}

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_cpus > 0, f"num_cpus must be > 0 (got {self.num_cpus})")
        need(self.num_gpus in (0, 1), f"num_gpus must be 0 or 1 per bundle (got {self.num_gpus})")
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        need(tp >= 1 and pp >= 1,
             f"tensor_parallel_size and pipeline_parallel_size must be >= 1 (got {tp}, {pp})")
        need(self.pipeline_layers is None or len(self.pipeline_layers) == pp,
             f"pipeline_layers {self.pipeline_layers} must give one layer count per stage "
             f"(pipeline_parallel_size={pp})")
        need(not self.stage_resources or len(self.stage_resources) == pp,
             f"stage_resources must have one entry per stage ({pp}), got "
             f"{len(self.stage_resources)}")
        for name in ("start_timeout_s", "health_check_period_s", "health_check_timeout_s",
                     "poll_timeout_s", "restart_backoff_s", "collective_timeout_s"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(all(v > 0 for v in self.resources.values()),
             f"resources must be positive amounts (got {self.resources})")


class ServeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None  # None: the default model
    replicas: int = 1
    preset: Preset | None = None
    ray_address: str | None = None  # None: start a local Ray; else join this cluster
    cache_dir: str | None = None
    engine: EngineSettings = EngineSettings()
    replica: ReplicaSettings = ReplicaSettings()
    router: RouterConfig = RouterConfig(port=50051)
    # Operations (cluster/deployment_ops.py): the router actor is "tandem-router-<name>" in Ray
    # namespace "tandem" (what `tandem status` finds); router_node pins it: "head", or a custom
    # resource some node declares; None: anywhere. autoscaling None: `replicas` stays fixed.
    name: str = "default"
    router_node: str | None = None
    autoscaling: AutoscalerConfig | None = None
    metrics_interval_s: float = 5.0  # how often replica stats become metrics

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1 (got {self.replicas})")
        spec = self.engine.speculative
        r = self.replica
        if spec is not None and spec.method == "eagle" \
                and r.tensor_parallel_size * r.pipeline_parallel_size > 1:
            raise ValueError("engine.speculative.method 'eagle' reads the target's hidden "
                             "states in one process: it needs tensor_parallel_size=1 and "
                             "pipeline_parallel_size=1 (use 'ngram' with parallelism)")
        check_ops_fields(self)

    def __repr__(self) -> str:  # RouterConfig's repr hides the API keys
        return (f"ServeConfig(model={self.model!r}, replicas={self.replicas}, "
                f"preset={self.preset!r}, engine={self.engine!r}, replica={self.replica!r}, "
                f"router={self.router!r})")


def build_serve_config(file: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> ServeConfig:
    """A ServeConfig from an optional YAML file and flag overrides.

    `overrides` has ServeConfig's shape (`{"engine": {"max_num_seqs": 8}, "replicas": 2}`);
    only the fields the user actually set belong there.
    """
    data: dict[str, Any] = {}
    where = "config"
    if file is not None:
        where = str(file)
        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of ServeConfig fields")
        data = loaded or {}
    data = _merge(data, overrides or {})
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: preset must be one of {', '.join(PRESETS)} "
                              f"(got {preset!r})")
        engine = data.get("engine")
        if engine is None or isinstance(engine, dict):
            # The preset fills only what neither the file nor a flag set.
            data["engine"] = {**PRESETS[preset], **(engine or {})}
    try:
        return msgspec.convert(data, ServeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ValueError as exc:  # EngineConfig / RouterConfig checks name their field
        raise ConfigError(f"{where}: {exc}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
