"""Operations of one deployment, inside its router actor: metrics, the fleet monitor, the
autoscaler and `tandem status`. RouterActor builds one and hands it the controller and server.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cluster.autoscaler import Autoscaler
from cluster.fleet_monitor import FleetMonitor
from cluster.metrics import LatencyTracker, MeteredReplicaHandle, ServeMetrics, TtftWindow
from cluster.serve_config import ServeConfig
from cluster.status import StatusReporter
from router.replica import ReplicaHandle

# Without autoscaling the TTFT window only feeds `tandem status`: a minute is what an operator
# looking at it means by "now".
STATUS_TTFT_WINDOW_S = 60.0


class Operations:
    def __init__(self, config: ServeConfig, model_name: str) -> None:
        self.config = config
        self.metrics = ServeMetrics(model_name, config.name)
        scaling = config.autoscaling
        self.ttft_window = TtftWindow(scaling.ttft_window_s if scaling else STATUS_TTFT_WINDOW_S)
        self.tracker = LatencyTracker(self.metrics, self.ttft_window)
        self.monitor: FleetMonitor | None = None
        self.reporter: StatusReporter | None = None

    def wrap_handle(self, handle: ReplicaHandle) -> ReplicaHandle:
        return MeteredReplicaHandle(handle, self.tracker)

    def attach(self, controller: Any, server: Any, model: str) -> None:
        """Starts monitoring (and autoscaling) once the router serves."""
        scaling = self.config.autoscaling
        self.monitor = FleetMonitor(
            controller, server, self.metrics, self.tracker, self.ttft_window,
            autoscaler=Autoscaler(scaling) if scaling else None,
            metrics_interval_s=self.config.metrics_interval_s,
            max_num_seqs=self.config.engine.max_num_seqs)
        self.reporter = StatusReporter(self.config.name, model, server.address, controller,
                                       self.monitor, scaling)
        self.monitor.start()

    async def status(self) -> bytes:
        if self.reporter is None:
            raise RuntimeError("the deployment is still starting")
        return msgspec.msgpack.encode(await self.reporter.status())

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
