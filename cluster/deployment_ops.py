"""How a deployment is found and placed on a shared cluster: its router actor's name, and the
node the router runs on.

The router actor is a named actor in namespace "tandem" only so that operators' tools
(`tandem status`) can find it; the deployment's state stays inside it (the Ray Serve LLM lesson:
no global named actor holding router state), and two deployments differ by name.
"""

from __future__ import annotations

import re
from typing import Any

NAMESPACE = "tandem"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's own marker resource of the head node
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")


def router_actor_name(deployment: str) -> str:
    return f"tandem-router-{deployment}"


def router_resources(router_node: str | None) -> dict[str, float]:
    """The resources that pin the router actor: "head" → the head node; any other name → a
    custom resource declared by the node(s) meant for it. A sliver, so that it never competes
    with anything for the resource."""
    if router_node is None:
        return {}
    return {HEAD_NODE_RESOURCE if router_node == "head" else router_node: 0.001}


def check_ops_fields(config: Any) -> None:
    """ServeConfig's checks of its operations fields (name, router_node, autoscaling)."""
    if not _NAME.match(config.name):
        raise ValueError(f"name must be 1-48 lowercase letters, digits or '-', starting and "
                         f"ending with a letter or digit (got {config.name!r}): it names the "
                         "router actor and tags the metrics")
    if config.router_node is not None and not config.router_node.strip():
        raise ValueError("router_node must be \"head\", a custom resource name, or null")
    if config.metrics_interval_s <= 0:
        raise ValueError(f"metrics_interval_s must be > 0 (got {config.metrics_interval_s})")
    scaling = config.autoscaling
    if scaling is not None and not (
            scaling.min_replicas <= config.replicas <= scaling.max_replicas):
        raise ValueError(
            f"replicas ({config.replicas}) is the starting count and must lie within "
            f"autoscaling.min_replicas..max_replicas ({scaling.min_replicas}.."
            f"{scaling.max_replicas})")


def router_actor_options(deployment: str, router_node: str | None) -> dict[str, Any]:
    """Ray actor options naming and placing a deployment's router actor."""
    options: dict[str, Any] = {"name": router_actor_name(deployment), "namespace": NAMESPACE}
    resources = router_resources(router_node)
    if resources:
        options["resources"] = resources
    return options


def check_router_node(router_node: str | None) -> None:
    """Fails before creating the router if no node offers the resource it is pinned to (it would
    wait forever). Driver side: needs a connected Ray."""
    import ray

    for name in router_resources(router_node):
        if ray.cluster_resources().get(name, 0.0) <= 0:
            raise RuntimeError(
                f"router_node {router_node!r}: no node in the cluster has resource {name!r}; "
                f"declare it on the router's node (ray start --resources '{{\"{name}\": 1}}', "
                "or rayStartParams in KubeRay) or set router_node: head")

