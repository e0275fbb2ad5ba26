"""Controller: starts a deployment's replicas, watches them, and replaces the ones that die.

Where it lives: a plain object inside the router actor's process, not an actor of its own.
- Its only client is the router: adding and removing replicas are in-process calls on the
  RouterServer, and the router's "replica failed" callback reaches it directly, with no RPC
  and no second copy of the replica set that could drift from the router's.
- It owns the replica actors and placement groups, so they share the router's fate: if the
  router actor dies, Ray reclaims its replicas instead of leaving orphans serving nobody, and
  whoever restarts the router (the `tandem serve` driver, KubeRay) starts a whole deployment.
- No global named actor holds router state (the Ray Serve LLM lesson): two deployments on one
  cluster never share or fight over a controller.
A cluster-wide autoscaler over several routers can later talk to each router actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import ray

from cluster.placement import remove_group
from cluster.ray_replica import RayReplicaHandle
from cluster.replica_actor import StartedReplica, start_replica
from cluster.serve_config import ReplicaSettings
from protos.messages import ModelCard
from router.replica import ReplicaHandle
from router.server import RouterServer
from worker.config import EngineConfig

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, engine_config: EngineConfig, model_name: str, num_replicas: int,
                 settings: ReplicaSettings, *,
                 wrap_handle: Callable[[RayReplicaHandle], ReplicaHandle] | None = None) -> None:
        """wrap_handle: decorates each replica's handle before the router gets it (metrics)."""
        self.engine_config = engine_config
        self.model_name = model_name
        self.num_replicas = num_replicas
        self.settings = settings
        self.replicas: dict[str, StartedReplica] = {}
        self.replacements_total = 0
        self._server: RouterServer | None = None
        self._next_index = 0
        self._replacing: set[str] = set()
        self._wrap_handle = wrap_handle
        self.num_starting = 0  # replicas the autoscaler asked for that are not serving yet
        self.draining: dict[str, StartedReplica] = {}  # scaled down, finishing their requests
        self._tasks: set[asyncio.Task] = set()
        self._health_task: asyncio.Task | None = None
        self._closed = False

    # -- bring-up -------------------------------------------------------------------------------

    async def start(self) -> ModelCard:
        """Starts every replica (in parallel) and returns the model card they agree on."""
        started = await asyncio.gather(
            *(self._start_one() for _ in range(self.num_replicas)), return_exceptions=True)
        errors = [r for r in started if isinstance(r, BaseException)]
        for r in started:
            if isinstance(r, StartedReplica):
                self.replicas[r.replica_id] = r
        if errors:
            await self.shutdown()
            raise errors[0]
        return next(iter(self.replicas.values())).card

    def handles(self) -> list[ReplicaHandle]:
        return [self._handle(r) for r in self.replicas.values()]

    def attach(self, server: RouterServer) -> None:
        """Starts health checks; from now on replacements go straight into `server`."""
        self._server = server
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    # -- failures -------------------------------------------------------------------------------

    def on_replica_failed(self, replica_id: str, exc: BaseException) -> None:
        """The router's callback: it has already moved the replica's requests elsewhere."""
        self._spawn(self.replace(replica_id, f"the router saw it fail: {exc}"))

    async def replace(self, replica_id: str, why: str) -> None:
        """Takes a replica out of service and starts a new one (new actor, new placement group)
        until one comes up or the controller shuts down."""
        if replica_id in self._replacing or replica_id not in self.replicas or self._closed:
            return
        self._replacing.add(replica_id)
        try:
            log.warning("replacing replica %s: %s", replica_id, why)
            old = self.replicas.pop(replica_id)
            if self._server is not None:
                # The router moves whatever it still had there (a no-op if it already did).
                await self._server.remove_replica(replica_id, drain=False)
            self._discard(old)
            backoff = self.settings.restart_backoff_s
            while not self._closed:
                try:
                    new = await self._start_one()
                except Exception as exc:
                    log.error("replacement for %s failed to start (%s); retrying in %.0f s",
                              replica_id, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    continue
                if self._closed:
                    self._discard(new)
                    return
                self.replicas[new.replica_id] = new
                self.replacements_total += 1
                if self._server is not None:
                    self._server.add_replica(self._handle(new))
                log.warning("replica %s replaces %s", new.replica_id, replica_id)
                return
        finally:
            self._replacing.discard(replica_id)

    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.health_check_period_s)
            for replica_id, replica in list(self.replicas.items()):
                problem = await self._check(replica)
                if problem is not None:
                    self._spawn(self.replace(replica_id, problem))

    async def _check(self, replica: StartedReplica) -> str | None:
        """None if the replica answers its health check in time and its engine is fine."""
        t0 = time.monotonic()
        try:
            error = await asyncio.wait_for(replica.actor.health.remote(),
                                           self.settings.health_check_timeout_s)
        except asyncio.TimeoutError:
            return (f"health check got no answer within "
                    f"{self.settings.health_check_timeout_s:g} s")
        except ray.exceptions.RayError as exc:
            return f"health check failed: {type(exc).__name__}"
        if error is not None:
            return f"its engine failed: {error}"
        log.debug("replica %s healthy (%.1f ms)", replica.replica_id,
                  (time.monotonic() - t0) * 1000)
        return None

    # -- scaling (the autoscaler's two verbs; cluster/fleet_monitor.py decides) -----------------

    def scale_up(self, count: int) -> None:
        """Starts `count` more replicas in the background. Each asks Ray for a placement group:
        where no node has room, the Ray autoscaler (KubeRay's) adds one; a replica joins the
        router once its model is loaded. A start that fails is logged and not retried: the next
        decision sees the count it left and asks again."""
        for _ in range(count):
            self._spawn(self._add_one())

    async def scale_down(self, replica_id: str) -> None:
        """Drains one replica out of the router (no new requests; in-flight ones finish, for up
        to the router's drain_timeout_s, then move), then kills it and removes its group."""
        replica = self.replicas.pop(replica_id, None)
        if replica is None or self._closed:
            return
        self.draining[replica_id] = replica  # no health check, no replacement from now on
        try:
            if self._server is not None:
                await self._server.remove_replica(replica_id, drain=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.actor.shutdown.remote(), 5.0)
        finally:
            self.draining.pop(replica_id, None)
            self._discard(replica)
        log.info("replica %s drained and removed", replica_id)

    async def _add_one(self) -> None:
        self.num_starting += 1
        try:
            new = await self._start_one()
        except Exception as exc:
            log.error("scale-up: a new replica failed to start: %s", exc)
            return
        finally:
            self.num_starting -= 1
        if self._closed:
            self._discard(new)
            return
        self.replicas[new.replica_id] = new
        if self._server is not None:
            self._server.add_replica(self._handle(new))

    # -- shutdown -------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stops health checks and replacements, then kills every replica and removes its group."""
        self._closed = True
        tasks = [t for t in [self._health_task, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        replicas = [*self.replicas.values(), *self.draining.values()]
        self.replicas, self.draining = {}, {}
        for replica in replicas:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.actor.shutdown.remote(), 5.0)
            self._discard(replica)
        log.info("controller stopped %d replicas", len(replicas))

    # -- helpers ------------------------------------------------------------------------------

    async def _start_one(self) -> StartedReplica:
        replica_id = f"replica-{self._next_index}"
        self._next_index += 1
        t0 = time.monotonic()
        started = await start_replica(replica_id, self.engine_config, self.model_name,
                                      self.settings)
        log.info("replica %s up in %.1f s", replica_id, time.monotonic() - t0)
        return started

    def _handle(self, replica: StartedReplica) -> ReplicaHandle:
        handle = RayReplicaHandle(replica.replica_id, replica.actor,
                                  poll_timeout_s=self.settings.poll_timeout_s,
                                  delta_stream=self.settings.delta_stream)
        return handle if self._wrap_handle is None else self._wrap_handle(handle)

    @staticmethod
    def _discard(replica: StartedReplica) -> None:
        with contextlib.suppress(Exception):
            ray.kill(replica.actor, no_restart=True)
        remove_group(replica.placement_group)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
