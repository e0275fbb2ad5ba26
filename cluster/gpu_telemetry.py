"""GPU telemetry for a replica: utilisation, memory, temperature and power from NVML.

Runs inside the replica's actor (the GPUs are on its node, not the router's) on a daemon thread
that samples every few seconds, so the engine's step thread never waits on NVML. Without
nvidia-ml-py or without a GPU it does nothing: start() returns None and nothing breaks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

TAGS = ("model", "replica", "gpu")


def _nvml() -> Any | None:
    """The pynvml module, initialised, or None where there is no NVML (no GPU, no package)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver, no device
        return None
    return pynvml


class GpuTelemetry:
    def __init__(self, nvml: Any, gpu_ids: list[int], tags: dict[str, str],
                 period_s: float) -> None:
        from ray.util.metrics import Gauge

        self._nvml = nvml
        self._handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in gpu_ids]
        self._tags = tags
        self._period_s = period_s
        self._stop = threading.Event()
        self.util = Gauge("tandem_gpu_utilization_percent", "GPU busy time", tag_keys=TAGS)
        self.mem_used = Gauge("tandem_gpu_memory_used_bytes", "GPU memory in use", tag_keys=TAGS)
        self.mem_total = Gauge("tandem_gpu_memory_total_bytes", "GPU memory", tag_keys=TAGS)
        self.temp = Gauge("tandem_gpu_temperature_celsius", "GPU temperature", tag_keys=TAGS)
        self.power = Gauge("tandem_gpu_power_watts", "GPU power draw", tag_keys=TAGS)
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)

    @classmethod
    def start(cls, gpu_ids: list[Any], tags: dict[str, str],
              period_s: float = 5.0) -> GpuTelemetry | None:
        """Starts sampling the given physical GPU indices (ray.get_gpu_ids()); None if it
        cannot (no GPU assigned, no NVML, ids that are not indices)."""
        if not gpu_ids:
            return None
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            telemetry = cls(nvml, [int(g) for g in gpu_ids], tags, period_s)
        except Exception as exc:
            log.warning("GPU telemetry off: %r", exc)
            return None
        telemetry._thread.start()
        return telemetry

    def sample(self) -> None:
        nvml = self._nvml
        for index, handle in self._handles:
            tags = {**self._tags, "gpu": str(index)}
            # Each reading on its own: a GPU without a power sensor still reports the rest.
            for gauge, read in (
                    (self.util, lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    (self.mem_used, lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                    (self.mem_total, lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                    (self.temp, lambda h: nvml.nvmlDeviceGetTemperature(
                        h, nvml.NVML_TEMPERATURE_GPU)),
                    (self.power, lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)):
                try:
                    gauge.set(float(read(handle)), tags)
                except Exception:  # NVMLError_NotSupported and friends
                    continue

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._period_s):
                return
