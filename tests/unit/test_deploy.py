"""deploy/: KubeRay manifests against the vendored ray.io/v1 schema plus the rules Tandem relies
on, every example ServeConfig through build_serve_config, and the Grafana dashboard's queries
against the metrics the code defines. No cluster needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.metrics import ServeMetrics
from cluster.serve_config import ServeConfig, build_serve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCHEMA = json.loads((DEPLOY / "kuberay" / "ray.io-v1.schema.json").read_text())
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))


def schema_errors(doc: dict) -> list[str]:
    """Field-level messages: `spec.workerGroupSpecs[0].maxReplica: ...`."""
    kind = doc.get("kind")
    sub = {**SCHEMA, "$ref": f"#/$defs/{kind}"}
    sub.pop("oneOf")
    validator = jsonschema.Draft202012Validator(sub)
    out = []
    for err in validator.iter_errors(doc):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        out.append(f"{kind}{path}: {err.message}")
    return out


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in load(p) if d["kind"] == kind]


def test_there_are_manifests_and_configs() -> None:
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml"}
    assert {p.name for p in CONFIGS} >= {"gpu-1.yaml", "gpu-tp2.yaml", "gpu-tp4-pp2.yaml",
                                         "gpu-draft-pool.yaml", "local-cpu.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kuberay_schema(path: Path) -> None:
    for doc in load(path):
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc) == []


def test_the_schema_catches_typos_with_the_field_path() -> None:
    cluster = manifests("RayCluster")[0]
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    errors = schema_errors(bad)
    assert any(e.startswith("RayCluster.spec.workerGroupSpecs[0]: Additional properties")
               and "maxReplica" in e for e in errors), errors
    assert any(e.startswith("RayCluster.spec.headGroupSpec.rayStartParams.num-cpus") for e in
               errors), errors


def ray_resources(params: dict[str, str]) -> dict[str, float]:
    """rayStartParams' resources: a quoted JSON object in a string ('"{\\"x\\": 1}"')."""
    raw = params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_raycluster_head_does_no_model_work_and_gpu_groups_autoscale() -> None:
    (cluster,) = manifests("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and "autoscalerOptions" in spec
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "tandem_replica" not in ray_resources(head["rayStartParams"])
    head_ports = {p["containerPort"] for c in head["template"]["spec"]["containers"]
                  for p in c.get("ports", [])}
    assert 50051 in head_ports  # the router's gRPC port on the head's Service
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group
        gpus = int(group["rayStartParams"]["num-gpus"])
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        assert ray_resources(group["rayStartParams"]).get("tandem_replica", 0) > 0


def serve_config(path: Path) -> ServeConfig:
    # The GPU examples listen on 0.0.0.0; their API key comes from --api-key in the RayJob.
    return build_serve_config(path, {"router": {"api_keys": ["from-a-secret"]}})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_a_valid_serve_config(path: Path) -> None:
    config = serve_config(path)
    if path.name.startswith("gpu-"):
        assert config.ray_address == "auto" and config.router_node == "head"
        assert config.replica.num_gpus == 1 and config.autoscaling is not None
        assert config.replica.resources.get("tandem_replica", 0) > 0


def test_each_gpu_config_fits_a_worker_group() -> None:
    """A replica's tensor-parallel group shares a node: some group must have that many GPUs."""
    (cluster,) = manifests("RayCluster")
    node_gpus = [int(g["rayStartParams"]["num-gpus"]) for g in cluster["spec"]["workerGroupSpecs"]]
    for path in CONFIGS:
        if path.name.startswith("gpu-"):
            r = serve_config(path).replica
            assert max(node_gpus) >= r.tensor_parallel_size, path.name
    tp4pp2 = serve_config(DEPLOY / "configs" / "gpu-tp4-pp2.yaml").replica
    assert (tp4pp2.tensor_parallel_size, tp4pp2.pipeline_parallel_size) == (4, 2)
    spec = serve_config(DEPLOY / "configs" / "gpu-draft-pool.yaml").engine.speculative
    assert spec is not None and spec.method == "pool"


def test_rayjob_runs_tandem_serve_on_the_raycluster_with_room_to_drain() -> None:
    (cluster,) = manifests("RayCluster")
    (job,) = manifests("RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = spec["entrypoint"]
    assert "tandem serve" in entry and "--address auto" in entry
    config_path = re.search(r"--config /app/(\S+)", entry).group(1)
    config = serve_config(DEPLOY.parent / config_path)
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) > config.router.drain_timeout_s


def metric_names() -> set[str]:
    """Prometheus names of everything ServeMetrics and GpuTelemetry record."""
    metrics = ServeMetrics("m", "d")
    names = {m.info["name"] for m in vars(metrics).values() if hasattr(m, "info")}
    gpu_source = (DEPLOY.parent / "cluster" / "gpu_telemetry.py").read_text()
    names |= set(re.findall(r'Gauge\("(tandem_\w+)"', gpu_source))
    return {f"ray_{n}" for n in names}


def test_grafana_dashboard_queries_only_metrics_we_export() -> None:
    dash = json.loads((DEPLOY / "grafana" / "tandem.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m)
            for e in exprs for m in re.findall(r"ray_tandem_\w+", e)}
    known = metric_names()
    assert used <= known, used - known
    # Everything we export has a panel, and counters are queried with Ray's _total suffix.
    assert known <= used, known - used
    assert all("_total" in e for e in exprs if "tokens" in e or "decisions" in e)
