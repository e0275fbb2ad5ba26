"""AsyncEngine: the step thread, long-poll, per-request errors and engine failure (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from protos.messages import OutputDelta, Request
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.async_engine import AsyncEngine, EngineDeadError
from worker.config import EngineConfig
from worker.engine import Engine


def make_engine(model_dir) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), kv_cache_bytes=1 << 20, num_threads=1))


@pytest.fixture
def aengine(tiny_model_dir) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(lambda: make_engine(tiny_model_dir("llama-gqa")), replica_id="r0")
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, ids: set[str], timeout: float = 20.0
                  ) -> dict[str, list[OutputDelta]]:
    out: dict[str, list[OutputDelta]] = {i: [] for i in ids}
    open_ids = set(ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        assert time.monotonic() < deadline, f"still running: {open_ids}"
        result = await engine.poll(0.05)
        for d in result.deltas:
            out[d.request_id].append(d)
            if d.finished:
                open_ids.discard(d.request_id)
    return out


def requests(n: int, max_tokens: int = 8) -> list[Request]:
    return [Request(request_id=f"q{i}", prompt_token_ids=[3 + i, 7, 11, 13 + i],
                    sampling=greedy(max_tokens)) for i in range(n)]


def test_streams_the_same_tokens_as_the_sync_engine(aengine: AsyncEngine, tiny_model_dir) -> None:
    reqs = requests(3)
    expected = run_to_completion(make_engine(tiny_model_dir("llama-gqa")), reqs)

    async def body() -> dict[str, list[OutputDelta]]:
        aengine.submit(reqs)
        return await collect(aengine, {r.request_id for r in reqs})

    got = asyncio.run(body())
    for r in reqs:
        assert tokens_of(got[r.request_id]) == tokens_of(expected[r.request_id])
        assert got[r.request_id][-1].finish_reason == "length"
    stats = aengine.stats()
    assert stats.replica_id == "r0" and stats.healthy
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_idle_poll_waits_for_its_timeout_and_wakes_on_work(aengine: AsyncEngine) -> None:
    async def body() -> None:
        t0 = time.monotonic()
        result = await aengine.poll(0.2)
        assert result.deltas == [] and time.monotonic() - t0 >= 0.19
        # A poll already waiting returns as soon as the first step's deltas exist.
        waiting = asyncio.ensure_future(aengine.poll(10.0))
        await asyncio.sleep(0.05)
        aengine.submit(requests(1, max_tokens=2))
        t1 = time.monotonic()
        result = await waiting
        assert result.deltas and time.monotonic() - t1 < 5.0
        await collect(aengine, {"q0"} - {d.request_id for d in result.deltas if d.finished})

    asyncio.run(body())


def test_a_bad_request_ends_with_an_error_delta_and_the_loop_goes_on(aengine: AsyncEngine) -> None:
    async def body() -> None:
        bad = Request(request_id="bad", prompt_token_ids=[10_000], sampling=greedy(2))
        aengine.submit([bad, *requests(1, max_tokens=3)])
        got = await collect(aengine, {"bad", "q0"})
        (delta,) = got["bad"]
        assert delta.finish_reason == "error" and "outside the vocabulary" in (delta.error or "")
        assert len(tokens_of(got["q0"])) == 3
        assert aengine.healthy

    asyncio.run(body())


def test_abort_frees_blocks(aengine: AsyncEngine) -> None:
    async def body() -> None:
        aengine.submit(requests(2, max_tokens=200))
        first = await aengine.poll(5.0)
        assert first.deltas
        aengine.abort(["q0", "q1", "unknown"])
        got = await collect(aengine, {"q0", "q1"})
        assert {got[i][-1].finish_reason for i in got} == {"abort"}
        stats = aengine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0

    asyncio.run(body())


def test_an_engine_failure_fails_in_flight_requests_and_marks_it_unhealthy(
        aengine: AsyncEngine) -> None:
    real_step = aengine.engine.step
    calls = 0

    def flaky_step() -> list[OutputDelta]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return real_step()

    aengine.engine.step = flaky_step  # type: ignore[method-assign]

    async def body() -> None:
        aengine.submit(requests(2, max_tokens=50))
        got = await collect(aengine, {"q0", "q1"})
        for deltas in got.values():
            assert deltas[-1].finish_reason == "error" and "boom" in (deltas[-1].error or "")
        result = await aengine.poll(10.0)  # answers at once: nothing more will come
        assert result.deltas == [] and not result.stats.healthy
        assert not aengine.stats().healthy and "boom" in (aengine.error or "")
        with pytest.raises(EngineDeadError, match="boom"):
            aengine.submit(requests(1))

    asyncio.run(asyncio.wait_for(body(), 15))


def test_the_engine_is_built_and_stepped_on_one_thread(tiny_model_dir) -> None:
    # One thread for all torch work keeps one OpenMP pool in the process; with a second pool
    # (model built on the caller's thread) libgomp stops spinning and GEMMs lose a core.
    seen: dict[str, set[int]] = {"build": set(), "step": set()}

    def build() -> Engine:
        seen["build"].add(threading.get_ident())
        engine = make_engine(tiny_model_dir("llama-gqa"))
        step = engine.step

        def recording_step() -> list[OutputDelta]:
            seen["step"].add(threading.get_ident())
            return step()

        engine.step = recording_step  # type: ignore[method-assign]
        return engine

    aengine = AsyncEngine(build, replica_id="r0")
    try:
        reqs = requests(1, max_tokens=3)
        aengine.submit(reqs)
        asyncio.run(collect(aengine, {r.request_id for r in reqs}))
    finally:
        aengine.shutdown()
    assert seen["step"] and seen["step"] == seen["build"]
    assert threading.get_ident() not in seen["build"]


def test_a_failing_build_raises_in_the_caller() -> None:
    def build() -> Engine:
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):
        AsyncEngine(build, replica_id="r0")
