"""The one thread that does a process's torch work, its model build included.

libgomp keeps one OpenMP thread pool per thread that opens a parallel region, and once a process
holds more pooled threads than CPUs it stops spinning between regions (its throttled spin
count), so every small GEMM waits for sleeping workers to wake. A replica that loaded its model
on the Ray actor's main thread and stepped it on another had two pools: its matmuls used ~1.4 of
2 cores. So whatever steps a model also builds it, on the same thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def start_compute_thread(name: str, build: Callable[[], T],
                         run: Callable[[T], None]) -> tuple[threading.Thread, T]:
    """Starts a daemon thread that calls build() and then run(built); returns once build() is
    done, with its result. An exception from build() is raised here, in the caller."""
    built = threading.Event()
    result: list[T] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            result.append(build())
        except BaseException as exc:  # raised again in the caller below
            failure.append(exc)
            return
        finally:
            built.set()
        run(result[0])

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    built.wait()
    if failure:
        raise failure[0]
    return thread, result[0]
