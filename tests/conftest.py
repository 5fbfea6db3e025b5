"""Fixtures shared across the test packages."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port


@dataclass(frozen=True)
class MotoS3:
    """A local S3 (moto server): ``endpoint_url`` for clients, ``fs`` a ready ``s3fs.S3FileSystem``."""

    endpoint_url: str
    fs: Any


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[MotoS3]:
    """One ``moto_server`` for the session, on a free port of 127.0.0.1.

    Nothing global is set (no environment variables): clients get the endpoint and the dummy
    credentials ``testing``/``testing`` explicitly. Buckets live as long as the session, so give
    each test its own bucket.
    """
    import s3fs

    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():  # the test extras install it: a missing server is a broken setup, not a skip
        pytest.fail(f"moto_server not found at {exe} (pip install -e '.[test]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers, if only with an error: it is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer at {endpoint} within 60 s") from None
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint},
            key="testing",
            secret="testing",
            skip_instance_cache=True,  # this instance is the fixture's own
            use_listings_cache=False,  # other clients write to the same buckets
        )
        yield MotoS3(endpoint_url=endpoint, fs=fs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(moto_s3):
    """Makes a fresh bucket on the session's moto server: ``s3_bucket("name") -> "name-<n>"``."""
    counter = iter(range(10**6))

    def make(prefix: str) -> str:
        name = f"{prefix}-{next(counter)}-{time.monotonic_ns() % 10**9}"
        moto_s3.fs.mkdir(name)
        return name

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray (not local mode) for the whole test session.

    Four logical CPUs on this 2-core machine, so that actor pools and the driver's own work can
    be scheduled together (see STACK_NOTES: Ray waits for free CPUs otherwise).
    """
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2's controller polls slowly by default (~20 s of fixed cost per fit, STACK_NOTES)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    # Workers inherit the environment at start: every S3 in the tests is the local moto server,
    # so dummy credentials go in before Ray starts (and no test can reach a real AWS account).
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    # Serve apps answer HTTP on their ingress replica's own port, as `tal serve` runs them (jobs.serve.run_app)
    from jobs.serve import serve_env

    for key, value in serve_env().items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """One real ``mlflow server`` for the session (SQLite backend, proxied artifacts); yields its ``http://`` URI.

    It starts in its own process group (the server runs uvicorn as a child), which is terminated at the end.
    Startup takes ~20 s on 2 cores (database tables, then uvicorn). A server that does not come up fails the
    test with the end of its log: it is part of the stack, not optional.
    """
    import os
    import signal

    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        pytest.fail(f"mlflow not found at {exe}")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no store of the caller leaks in
    # No job runner (a huey consumer for GenAI jobs): one process less to start, and no store left in /dev/shm.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [
        str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer at {uri}/health within 120 s: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own group: the server and its uvicorn worker, nothing else
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
