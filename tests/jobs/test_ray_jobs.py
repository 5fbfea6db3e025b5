"""Every stage as a Ray job on an existing cluster (docs/cluster_jobs.md), on a real head node of the test's own.

``ray start --head --block`` runs in a process of the test with its own ports, its own ``--temp-dir`` and its own
auth token; jobs go through the Jobs API (``JobSubmissionClient``) and run the real command line from an uploaded
``working_dir``, exactly as a user's ``ray job submit --working-dir . -- tal ...`` does.

Isolation from every other Ray on the machine (the session's ``ray_session``, other test runs):
- a plain ``ray.init()`` looks for ``ray_current_cluster`` in *its* temp dir (``/tmp/ray``): this head writes its
  address into its own ``--temp-dir`` only, so nothing finds it by accident (checked below with a real ``ray.init()``);
- ``ray.init(address="auto")`` (and ``ray status`` without ``--address``) falls back to any ``gcs_server`` found in
  ``ps``: the head's private token makes that connection fail (measured: "InvalidAuthToken") instead of joining;
- it is stopped by its own process ids (every process of the head carries a marker in its environment, which
  survives re-parenting and the new sessions the job supervisor starts drivers in), never ``ray stop``, which
  stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.store import FeatureStore
from pipelines.synth import synthesize
from tal_models.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TAL = [sys.executable, "-m", "jobs.cli"]  # on a cluster whose image has the package: `tal`
# Ray 2.60 already skips what .gitignore lists; these keep the upload small in a checkout with another .gitignore.
EXCLUDES = [".git", ".venv", ".venv-*", "out", "mlruns", "data", "features", ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info"]
MARKER_VAR = "TAL_TEST_RAY_HEAD"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# --- the head node ------------------------------------------------------------------------------
@dataclass
class RayHead:
    """A head node started by this test: ``stop()`` ends exactly its processes."""

    process: subprocess.Popen  # `ray start --head --block`: the parent of the node's own processes
    temp_dir: Path
    dashboard_url: str  # http://127.0.0.1:<port>: the Jobs API
    gcs_port: int
    token: str  # RAY_AUTH_TOKEN of the head; clients send it as a bearer token
    marker: str  # MARKER_VAR's value in the environment of every process of this head
    watchdog: subprocess.Popen | None = None  # stops the head if the test process dies without its teardown

    @property
    def gcs_address(self) -> str:
        return (self.temp_dir / "ray_current_cluster").read_text().strip()

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def processes(self) -> dict[int, int]:
        """Live processes of this head: pid -> start time (to never signal a reused pid)."""
        needle, path = f"{MARKER_VAR}={self.marker}".encode(), str(self.temp_dir).encode()
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = Path(entry.path, "stat").read_bytes()
                ours = needle in Path(entry.path, "environ").read_bytes().split(b"\0") or path in Path(entry.path, "cmdline").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            fields = stat.rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
            if ours and fields[0] != b"Z":  # a zombie is dead already: only its parent's wait is missing
                found[int(entry.name)] = int(fields[19])
        return found

    def stop(self, grace_s: float = 20.0) -> list[str]:
        """SIGTERM ``ray start --block`` (it stops the node in order), then SIGTERM and SIGKILL whatever of the
        head is left (workers, job drivers, the watchdog); returns the command lines of any survivors."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            deadline = time.monotonic() + wait_s
            while (alive := self.processes()) and time.monotonic() < deadline:
                for pid, started in alive.items():
                    _signal(pid, started, sig)
                time.sleep(0.5)
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
        if self.watchdog is not None:
            self.watchdog.wait()  # ours: reap it
        return [_cmdline(pid) for pid in self.processes()]


def _signal(pid: int, started: int, sig: int) -> None:
    try:
        if int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19]) == started:
            os.kill(pid, sig)
    except (OSError, IndexError, ValueError):
        pass


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: (gone)"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]  # held open together: n distinct ports
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(size: int) -> int:
    """First port of ``size`` free consecutive ports below the ephemeral range (where `_free_ports` draws from)
    and above Ray's default worker ports (10002-19999, which another local Ray may use)."""
    for _ in range(50):
        low = random.randrange(20000, 32768 - size)
        try:
            for port in range(low, low + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return low
        except OSError:
            continue
    raise RuntimeError(f"no {size} free consecutive ports in 20000-32767")


def start_ray_head(num_cpus: int = 4, timeout_s: float = 90.0) -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="tal-rj-", dir="/tmp"))  # short: Ray's Unix sockets live under it (<108 chars)
    gcs, dashboard, client_server, node_manager, object_manager, agent_listen, agent_grpc, runtime_env_agent, metrics = _free_ports(9)
    low = _free_port_range(200)
    token, marker = secrets.token_hex(32), secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}  # no address, mode or store leaks in
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", **{MARKER_VAR: marker})
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM, stop at once (the default drains the node for up to 30 s)
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--temp-dir", str(temp_dir),
        "--num-cpus", str(num_cpus), "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
        "--port", str(gcs), "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_server),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
        "--min-worker-port", str(low), "--max-worker-port", str(low + 199),
    ]  # fmt: skip
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the head
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(process, temp_dir, f"http://127.0.0.1:{dashboard}", gcs, token, marker)
    try:
        # A killed test run (CI timeout, SIGKILL) skips every teardown: this shell then stops the head instead.
        watch = f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill -TERM {process.pid}"
        head.watchdog = subprocess.Popen(["/bin/sh", "-c", watch], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(f"{head.dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"})
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}: {log_path.read_text(errors='replace')[-3000:]}")
            if (temp_dir / "ray_current_cluster").exists():
                try:
                    with urllib.request.urlopen(request, timeout=2) as answer:
                        if answer.status == 200:
                            return head
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head did not come up within {timeout_s:.0f} s: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
    except BaseException:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


@pytest.fixture(scope="module")
def ray_head():
    head = start_ray_head()
    try:
        yield head
    finally:
        survivors = head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert not survivors, f"processes of the test's Ray head survived its stop: {survivors}"


# --- jobs ---------------------------------------------------------------------------------------
def _runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    return {"working_dir": str(REPO), "excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}


def _run_job(client, argv: list[str], env_vars: dict[str, str] | None = None, timeout_s: float = 150.0):
    """Submit ``argv`` as a job and wait for it: (status name, logs, JobDetails)."""
    job_id = client.submit_job(entrypoint=shlex.join(argv), runtime_env=_runtime_env(env_vars))
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} ({argv[3]}) still {status} after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(1.0)
    return status, client.get_job_logs(job_id), client.get_job_info(job_id)


def _packages(head: RayHead) -> list[Path]:
    """The working_dir packages as the head unpacked them for its jobs (one per distinct upload: the checkout may
    change between two jobs, as others edit it)."""
    return sorted(
        p for p in (head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob("_ray_pkg_*") if p.is_dir()
    )


def test_a_plain_ray_init_elsewhere_does_not_join_the_head(ray_head):
    """What conftest's ``ray_session`` (and any script) does: it starts its own Ray, not a driver on this head."""
    assert ray_head.gcs_address.endswith(f":{ray_head.gcs_port}")  # its address is in its own temp dir, not /tmp/ray
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    probe = "import ray; ray.init(num_cpus=1, include_dashboard=False); print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    joined = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS ")]
    assert joined and joined[0] != ray_head.gcs_address, (joined, ray_head.gcs_address)
    # Without the head's token its Jobs API answers 401, whatever token the caller's ~/.ray holds.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=5)
    assert refused.value.code == 401


def test_a_job_with_bad_input_fails_with_the_cli_error(ray_head, tmp_path):
    missing = tmp_path / "no-such-folder"
    status, logs, info = _run_job(ray_head.client(), [*TAL, "extract", "--videos", str(missing), "--out", str(tmp_path / "store")])
    assert status == "FAILED", logs[-3000:]
    assert info.driver_exit_code == 2, info
    errors = [line for line in logs.splitlines() if line.startswith("tal extract: error:")]
    assert errors == [f"tal extract: error: no such video, directory or manifest: {missing}"], logs[-3000:]
    assert "Traceback" not in logs


@pytest.mark.timeout(480)  # ~70 s here; each job has its own 150 s limit, which fails with the job's logs
def test_extract_train_evaluate_as_ray_jobs(ray_head, tmp_path):
    from mlflow import MlflowClient

    archive = synthesize(tmp_path / "archive", videos=5, seed=3, classes=2, duration_range=(4.0, 5.0), size=(160, 120), fps=10.0,
                         workers=1, progress=False)  # fmt: skip
    client = ray_head.client()

    store = tmp_path / "store"
    argv = [*TAL, "extract", "--videos", str(tmp_path / "archive" / "videos"), "--out", str(store), "--num-workers", "1", "--no-progress"]
    status, logs, _ = _run_job(client, argv)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "5 extracted, 0 failed" in logs, logs[-3000:]
    sequences = FeatureStore(str(store)).read_all()
    assert sorted(sequences) == sorted(archive.videos)
    assert {s.features.shape[1] for s in sequences.values()} == {1280}
    packages = _packages(ray_head)  # what the jobs ran: the checkout's code without .venv, outputs, .git
    assert packages
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"jobs", "pipelines", "tal_models", "pyproject.toml"} <= names and not names & {".venv", ".git", "out", "mlruns"}, names
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 10 * 2**20, f"the working_dir upload {package.name} is {size / 2**20:.1f} MiB"

    mlflow_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    argv = [
        *TAL, "train", "--config", "demo-temporalmaxer", "--features", str(store),
        "--annotations", str(archive.activitynet_json),
        "--out", str(tmp_path / "runs"), "--run-name", "as-a-job", "--workers", "2", "--epochs", "2",
    ]  # fmt: skip
    # the job sets one of the Ray Train variables tal train also sets: tal train must leave it to the job (Ray refuses to merge)
    env_vars = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3"}
    status, logs, _ = _run_job(client, argv, env_vars=env_vars)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "registered tal-detector version 1" in logs, logs[-3000:]
    checkpoints = sorted((tmp_path / "runs" / "as-a-job").glob("checkpoint_*/model.pt"))
    assert checkpoints, sorted(p.name for p in (tmp_path / "runs" / "as-a-job").iterdir())
    assert load_checkpoint(checkpoints[-1]).provenance["backbone"] == "mobilenet_v2"
    tracking = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    runs = tracking.search_runs([tracking.get_experiment_by_name("tal").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("as-a-job", "FINISHED")]
    assert [m.step for m in tracking.get_metric_history(runs[0].info.run_id, "val_average_mAP")] == [0, 1]
    assert runs[0].data.params["workers"] == "2"

    # the champion the training job registered, resolved by the evaluation job through the same MLflow store
    argv = [
        *TAL, "evaluate", "--model", "models:/tal-detector@champion", "--features", str(store),
        "--annotations", str(archive.activitynet_json), "--subset", "test", "--output", str(tmp_path / "eval"),
    ]  # fmt: skip
    status, logs, _ = _run_job(client, argv, env_vars={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert status == "SUCCEEDED", logs[-4000:]
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())["results"]
    assert set(predictions) == set(archive.annotations.subset("test").videos)
    assert "average_mAP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
