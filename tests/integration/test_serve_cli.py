"""`tandem serve` as a process: the ready line, and SIGTERM draining in-flight requests."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.serve_utils import text_model

READY = re.compile(r"^tandem: serving (\S+) on (\S+) with (\d+) replica\(s\)$")


def read_ready_line(proc: subprocess.Popen, timeout: float) -> tuple[str, list[str]]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        match = READY.match(lines[-1])
        if match:
            return match.group(2), lines
    raise AssertionError(f"no ready line; output so far: {lines}")


def test_serve_prints_ready_and_drains_on_sigterm(tmp_path: Path) -> None:
    model = text_model(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model), "--port", "0",
         "--replicas", "1", "--replica-cpus", "0.5", "--kv-cache-bytes", str(1 << 20),
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address, lines = read_ready_line(proc, 90)
        assert any(line.startswith("tandem: router listening on") for line in lines)

        async def stream_through_sigterm() -> list[pb.GenerateResponse]:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                request = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                    sampling=pb.SamplingParams(temperature=0, max_tokens=240, ignore_eos=True))
                responses = []
                async for r in stub.Generate(request, timeout=60):
                    if not responses:
                        proc.send_signal(signal.SIGTERM)
                    responses.append(r)
                return responses

        responses = asyncio.run(stream_through_sigterm())
        # Draining let the in-flight request finish.
        assert sum(len(r.token_ids) for r in responses) == 240
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "tandem: SIGTERM: draining" in out and "tandem: stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_with_a_bad_config_says_which_field(tmp_path: Path) -> None:
    from cluster import cli

    config = tmp_path / "serve.yaml"
    config.write_text("replicas: 2\nengine:\n  max_num_seqz: 4\n")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown field `max_num_seqz` - at `$.engine`" in proc.stderr
    assert cli  # imported to make sure the module imports without Ray running


@pytest.mark.parametrize("preset", ["latency", "throughput"])
def test_preset_reaches_the_config(preset: str) -> None:
    from cluster.cli import build_parser, serve_overrides
    from cluster.serve_config import PRESETS, build_serve_config

    args = build_parser().parse_args(["serve", "--preset", preset, "--replicas", "3"])
    config = build_serve_config(None, serve_overrides(args))
    assert config.engine.max_num_seqs == PRESETS[preset]["max_num_seqs"]
    assert config.replicas == 3
