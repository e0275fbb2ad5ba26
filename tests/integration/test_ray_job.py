"""`tandem serve` as a Ray job on a real `ray start --head` cluster (loopback only):
`ray job submit --working-dir .`, a gRPC request through it, `tandem status`, then `ray job stop`
draining it (SIGTERM → drain → exit 0).

The cluster is stopped by ending the `ray start --block` process group this test started (and
any worker of its own session left behind), never with `ray stop`: that stops every Ray
instance on the machine, other people's test runs included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.serve_utils import text_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and tandem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env() -> dict[str, str]:
    # Token authentication is on for clusters here: Ray's clients read the token from
    # ~/.ray/auth_token when told to use it.
    return {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=client_env(), capture_output=True,
                          text=True, timeout=timeout)


class Cluster:
    def __init__(self, gcs_port: int, dashboard_port: int, temp_dir: str,
                 proc: subprocess.Popen) -> None:
        self.gcs = f"127.0.0.1:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.temp_dir = temp_dir
        self.proc = proc


def wait_until(check, timeout: float, what: str, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(period)


def dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answers (401 without the token: authentication is on)
    except OSError:
        return False


def stop_cluster(cluster: Cluster) -> None:
    """Ends this test's Ray and only it: its process group, then its session's leftovers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cluster.proc.pid, signal.SIGTERM)
    try:
        cluster.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cluster.proc.pid, signal.SIGKILL)
        cluster.proc.wait(timeout=10)
    time.sleep(1.0)
    # Workers run in process groups of their own; they name the session directory, which lies
    # under this test's private temp dir, on their command line.
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(cluster.temp_dir in arg for arg in p.info["cmdline"] or ()):
                p.kill()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="tdm-ray-", dir="/tmp")  # short: socket paths live here
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs_port),
         "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=client_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(gcs_port, dashboard_port, temp_dir, proc)
    try:
        wait_until(lambda: dashboard_up(c.dashboard) or proc.poll() is not None, 120,
                   "the Ray head's dashboard")
        assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
        yield c
    finally:
        log.close()
        stop_cluster(c)


def job_logs(cluster: Cluster, job_id: str) -> str:
    return ray_cli("job", "logs", "--address", cluster.dashboard, job_id).stdout


def test_serve_as_a_ray_job_answers_and_drains_on_job_stop(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    t0 = time.monotonic()
    model = text_model(tmp_path)
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"name: jobtest\nmodel: {model}\nray_address: auto\nrouter_node: head\nreplicas: 1\n"
        "engine: {kv_cache_bytes: 1048576, num_threads: 1}\n"
        "replica: {num_cpus: 0.5}\n"
        f"router: {{host: 127.0.0.1, port: {port}, drain_timeout_s: 30}}\n")
    job_id = f"tandem-test-{os.getpid()}-{int(time.time())}"
    # RAY_JOB_STOP_WAIT_TIME_S is Ray's own setting: how long `ray job stop` waits after SIGTERM
    # before SIGKILL (3 s by default): the drain needs longer.
    submitted = ray_cli(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
        "--no-wait", "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}),
        "--", "tandem", "serve", "--config", str(config))
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    ready = re.compile(rf"tandem: serving \S+ on 127\.0\.0\.1:{port} with 1 replica\(s\)")
    try:
        wait_until(lambda: ready.search(job_logs(cluster, job_id)), 150, "the ready line",
                   period=1.0)
    except AssertionError:
        raise AssertionError(job_logs(cluster, job_id)[-4000:]) from None
    t_ready = time.monotonic() - t0

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        responses = list(stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
            sampling=pb.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
            timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 8
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH

    status = subprocess.run([str(BIN / "tandem"), "status", "--address", cluster.gcs,
                             "--name", "jobtest"], env=client_env(), capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-3000:]
    row = next(line for line in status.stdout.splitlines() if line.startswith("replica-0"))
    name, state, node, devices, *_, health = row.split()
    assert (name, state, devices, health) == ("replica-0", "ready", "cpu", "ok"), status.stdout
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", node), status.stdout  # Ray's node address
    missing = subprocess.run([str(BIN / "tandem"), "status", "--address", cluster.gcs,
                              "--name", "nope"], env=client_env(), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no deployment named 'nope'" in missing.stderr

    stopped = ray_cli("job", "stop", "--address", cluster.dashboard, job_id, timeout=90)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    logs = job_logs(cluster, job_id)
    assert "tandem: SIGTERM: draining" in logs and "tandem: stopped" in logs, logs[-3000:]
    info = ray_cli("job", "status", "--address", cluster.dashboard, job_id)
    assert "was stopped" in info.stdout + info.stderr
    # The router went with the job: its port no longer answers.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    print(f"ready after {t_ready:.1f} s, whole test {time.monotonic() - t0:.1f} s")
