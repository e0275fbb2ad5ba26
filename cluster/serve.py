"""`tandem serve`: a router actor (gRPC front door + controller) over replica actors on Ray.

The driver (the `tandem serve` process) resolves the model, starts or joins Ray, creates the
router actor and then only waits: for SIGTERM/SIGINT, on which it drains the router (stop
admitting, let in-flight requests finish), shuts the deployment down and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import ray

from cluster.serve_config import ServeConfig

log = logging.getLogger(__name__)


class ServeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the router actor tells the driver once it serves."""

    model: str
    host: str
    port: int
    address: str
    replicas: list[str]


class RouterActor:
    """Hosts the grpc.aio RouterServer and its Controller on one event loop (an async actor)."""

    def __init__(self, config: bytes, model_dir: str, model_name: str) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = msgspec.msgpack.decode(config, type=ServeConfig)
        self.model_dir = model_dir
        self.model_name = model_name
        self.server: Any = None
        self.controller: Any = None
        self.ops: Any = None  # cluster.operations.Operations: metrics, autoscaling, status
        self.draft_actors: list[Any] = []  # the speculative draft pool, shared by all replicas

    async def start(self) -> bytes:
        from cluster.controller import Controller
        from cluster.operations import Operations
        from cluster.replica_actor import engine_config_for
        from router.server import start_server

        cfg = self.config
        engine_config = engine_config_for(cfg.engine, cfg.replica, self.model_dir)
        spec = engine_config.speculative
        if spec is not None and spec.method == "pool":
            from cluster.speculative import start_pool_for_serve

            engine_config, self.draft_actors = await start_pool_for_serve(engine_config)
        self.ops = Operations(cfg, self.model_name)
        self.controller = Controller(engine_config, self.model_name, cfg.replicas, cfg.replica,
                                     wrap_handle=self.ops.wrap_handle)
        card = await self.controller.start()
        tokenizer = _router_tokenizer(Path(self.model_dir))
        try:
            self.server = await start_server(cfg.router, self.controller.handles(), tokenizer,
                                             card,
                                             on_replica_failed=self.controller.on_replica_failed)
        except BaseException:
            await self.controller.shutdown()
            raise
        self.controller.attach(self.server)
        self.ops.attach(self.controller, self.server, card.name)
        return msgspec.msgpack.encode(ServeInfo(
            model=card.name, host=cfg.router.host, port=self.server.port,
            address=self.server.address, replicas=list(self.controller.replicas)))

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stops admitting and waits for in-flight requests; False if some were cut short."""
        return await self.server.drain(timeout_s)

    async def stop(self) -> None:
        if self.ops is not None:
            await self.ops.stop()  # no scaling decisions while shutting down
        if self.server is not None:
            await self.server.stop()
        if self.controller is not None:
            await self.controller.shutdown()
        if self.draft_actors:
            from worker.spec.draft_actor import stop_draft_pool

            stop_draft_pool(self.draft_actors)

    async def ping(self) -> bool:
        return True

    # For tests and operators: the replica set as the router and controller see it.
    async def replica_ids(self) -> list[str]:
        return list(self.server.fleet.replica_ids)

    async def replica_actors(self) -> dict[str, Any]:
        return {rid: r.actor for rid, r in self.controller.replicas.items()}

    async def replica_stats(self) -> bytes:
        """Fresh stats from every replica (one call each, concurrently)."""
        replicas = list(self.controller.replicas.values())
        results = await asyncio.gather(*(r.actor.stats.remote() for r in replicas),
                                       return_exceptions=True)
        return msgspec.msgpack.encode(
            {r.replica_id: res for r, res in zip(replicas, results) if isinstance(res, bytes)})

    async def replacements_total(self) -> int:
        return self.controller.replacements_total

    async def status(self) -> bytes:
        """`tandem status`: a msgpack cluster.status.DeploymentStatus."""
        return await self.ops.status()


class NoTokenizer:
    """For models without tokenizer.json: token-id prompts work, text prompts get a clear error."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        from router.validation import InvalidInput

        raise InvalidInput(f"text: the served model ({self.model_dir.name}) has no tokenizer; "
                           "send token_ids instead")

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        self.encode("")
        return ""


def _router_tokenizer(model_dir: Path) -> Any:
    from text.tokenizer import Tokenizer

    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_dir(model_dir)
    return NoTokenizer(model_dir)


class Deployment:
    """A running deployment as the driver sees it (the router actor and where it listens)."""

    def __init__(self, router: Any, info: ServeInfo) -> None:
        self.router = router
        self.info = info

    def shutdown(self, drain_timeout_s: float | None = None) -> bool:
        """Drains (unless drain_timeout_s == 0), stops the router and the replicas, kills the
        router actor. Returns whether every in-flight request finished."""
        drained = True
        try:
            if drain_timeout_s != 0:
                drained = ray.get(self.router.drain.remote(drain_timeout_s))
            ray.get(self.router.stop.remote(), timeout=60)
        finally:
            ray.kill(self.router, no_restart=True)
        return drained


def deploy(config: ServeConfig, model_dir: str | Path, model_name: str) -> Deployment:
    """Starts a deployment on the connected Ray cluster; returns once it serves.

    Driver-side (synchronous) code: the blocking ray.get here never runs on an event loop.
    """
    from cluster.deployment_ops import check_router_node, router_actor_options

    check_router_node(config.router_node)
    router_class = ray.remote(RouterActor)
    try:
        router = router_class.options(
            num_cpus=0,  # the router is mostly waiting on sockets; replicas get the CPUs
            max_concurrency=1000, max_restarts=0,
            # Named (per deployment, namespace "tandem") so `tandem status` finds it; pinned to
            # config.router_node where given.
            **router_actor_options(config.name, config.router_node),
        ).remote(msgspec.msgpack.encode(config), str(model_dir), model_name)
    except ValueError as exc:  # Ray: "The name ... is already taken"
        raise RuntimeError(f"a deployment named {config.name!r} already runs on this cluster "
                           f"({exc}); stop it first or give this one another `name`") from None
    try:
        info = msgspec.msgpack.decode(ray.get(router.start.remote()), type=ServeInfo)
    except ray.exceptions.RayTaskError as exc:
        ray.kill(router, no_restart=True)
        # The cause (a PlacementError naming missing resources, a model that does not load, a
        # port in use) is the message the user needs, not Ray's traceback around it.
        raise RuntimeError(f"the deployment did not start: {exc.cause}") from None
    except BaseException:
        ray.kill(router, no_restart=True)
        raise
    return Deployment(router, info)


def model_name_for(model: str | None) -> str:
    from cluster.default_model import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def run_serve(config: ServeConfig, *, out: Any = None) -> int:
    """The `tandem serve` driver: returns the process exit status."""
    from cluster.default_model import resolve_model

    out = out or sys.stdout
    model_dir = resolve_model(config.model, Path(config.cache_dir) if config.cache_dir else None)
    name = model_name_for(config.model)
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        t0 = time.monotonic()
        deployment = deploy(config, model_dir, name)
        info = deployment.info
        print(f"tandem: router listening on {info.address} "
              f"({'TLS' if config.router.tls_enabled else 'plaintext'}, "
              f"auth {'on' if config.router.auth_enabled else 'off'}), replicas "
              f"{', '.join(info.replicas)}, up in {time.monotonic() - t0:.1f} s", file=out)
        print(f"tandem: serving {info.model} on {info.address} with {len(info.replicas)} "
              f"replica(s)", file=out, flush=True)
        while not stop.wait(5.0):
            try:
                ray.get(deployment.router.ping.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                print(f"tandem: error: the router actor is gone ({type(exc).__name__}); "
                      "exiting", file=sys.stderr)
                return 1
        # Signal handlers only set the event: the drain runs here, outside the handler.
        signal.signal(signal.SIGINT, previous[signal.SIGINT])  # a second Ctrl-C: stop now
        print(f"tandem: {signal.Signals(signals[0]).name}: draining (stop admitting, "
              f"finishing in-flight requests, at most {config.router.drain_timeout_s:g} s)",
              file=out, flush=True)
        drained = deployment.shutdown()
        print("tandem: stopped" + ("" if drained else " (some requests were cut short)"),
              file=out, flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()
