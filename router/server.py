"""RouterServer: the gRPC front door (Generation + health + reflection) over a Fleet.

cluster/ calls start_server inside the router's Ray actor and tells the server about replica
set changes through add_replica / remove_replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.messages import ModelCard, ReplicaStats
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.auth import ApiKeyInterceptor
from router.config import RouterConfig
from router.dispatch import DispatchPolicy
from router.fleet import Fleet
from router.replica import ReplicaHandle
from router.service import GenerationServicer
from router.validation import TokenizerLike, Validator

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class RouterServer:
    def __init__(self, config: RouterConfig, server: grpc.aio.Server, port: int, fleet: Fleet,
                 servicer: GenerationServicer, health_servicer: health.aio.HealthServicer) -> None:
        self.config = config
        self.port = port
        self.fleet = fleet
        self._server = server
        self._servicer = servicer
        self._health = health_servicer
        self._health_updates: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    @property
    def draining(self) -> bool:
        return self._servicer.draining

    def add_replica(self, handle: ReplicaHandle) -> None:
        self.fleet.add_replica(handle)

    async def remove_replica(self, replica_id: str, *, drain: bool = True) -> None:
        await self.fleet.remove_replica(replica_id, drain=drain,
                                        timeout=self.config.drain_timeout_s)

    def replica_stats(self) -> dict[str, ReplicaStats | None]:
        return self.fleet.replica_stats()

    async def drain(self, timeout: float | None = None) -> bool:
        """Stops admitting (UNAVAILABLE, health NOT_SERVING) and waits for in-flight requests.
        Returns False if some were still running after `timeout` (default drain_timeout_s)."""
        self._servicer.draining = True
        await self._update_health()
        return await self.fleet.wait_idle(
            self.config.drain_timeout_s if timeout is None else timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Closes the port; calls still running after `grace` seconds are cancelled."""
        self._servicer.draining = True
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace if grace is not None else self.config.shutdown_grace_s)
        await self.fleet.close()
        for task in list(self._health_updates):
            task.cancel()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def _schedule_health_update(self) -> None:
        # Fleet callbacks are synchronous; the health servicer's setter is a coroutine.
        task = asyncio.get_running_loop().create_task(self._update_health())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _update_health(self) -> None:
        serving = not self._servicer.draining and bool(self.fleet.replica_ids)
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", GENERATION_SERVICE):
            await self._health.set(service, status)


def _server_options(config: RouterConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Long generations can stream for minutes: ping to keep NATs and proxies from dropping
        # the connection, and tolerate clients that ping while idle, within reason.
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms",
         int(config.min_client_ping_interval_s * 1000)),
        # Two routers must not silently share one port.
        ("grpc.so_reuseport", 0),
    ]


def _credentials(config: RouterConfig) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"RouterConfig: cannot read {what} {path!r}: {exc}") from None

    assert config.tls_cert_path is not None and config.tls_key_path is not None
    pair = (read(config.tls_key_path, "tls_key_path"), read(config.tls_cert_path, "tls_cert_path"))
    if config.tls_client_ca_path is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read(config.tls_client_ca_path, "tls_client_ca_path"),
        require_client_auth=True)


async def start_server(config: RouterConfig, replicas: Iterable[ReplicaHandle],
                       tokenizer: TokenizerLike, model_card: ModelCard, *,
                       on_replica_failed: Callable[[str, BaseException], None] | None = None,
                       ) -> RouterServer:
    """Starts serving on config.host:config.port; returns once the port is bound.

    on_replica_failed(replica_id, exc) is called when a replica's submit or poll raises; the
    router has by then moved its requests, and waits for add_replica with a replacement.
    """
    policy = DispatchPolicy(model_card.block_size, prefix_blocks=config.prefix_affinity_blocks,
                            cache_size=config.affinity_cache_size,
                            load_factor=config.affinity_load_factor,
                            load_slack_tokens=config.affinity_load_slack_tokens)
    holder: list[RouterServer] = []  # the fleet's change callback needs the server built below

    def on_change() -> None:
        if holder:
            holder[0]._schedule_health_update()

    fleet = Fleet(policy, max_resubmits=config.max_resubmits,
                  orphan_timeout_s=config.orphan_timeout_s, on_change=on_change,
                  on_replica_failed=on_replica_failed)
    servicer = GenerationServicer(fleet, Validator(tokenizer, model_card), model_card,
                                  max_outstanding=config.max_outstanding)
    health_servicer = health.aio.HealthServicer()
    interceptors = [ApiKeyInterceptor(config.api_keys)] if config.auth_enabled else []
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(config))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    host = f"[{config.host}]" if ":" in config.host else config.host
    address = f"{host}:{config.port}"
    try:
        if config.tls_enabled:
            port = server.add_secure_port(address, _credentials(config))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address}: {exc}; pick a free port (or port 0) "
                           "or check the host address") from None
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}: is the port in use?")

    router = RouterServer(config, server, port, fleet, servicer, health_servicer)
    holder.append(router)
    for handle in replicas:
        fleet.add_replica(handle)
    await router._update_health()
    await server.start()
    log.info("router serving %s on %s (%s, auth %s)", model_card.name, router.address,
             "TLS" if config.tls_enabled else "plaintext",
             "on" if config.auth_enabled else "off")
    return router
