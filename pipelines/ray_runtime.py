"""Ray for our entry points: one way to start or join it, with Ray's own output in its log files.

Every place that needs Ray calls ``init_ray()`` instead of ``ray.init()``. Left to itself, Ray shows
the user everything: each worker's stdout and stderr (``log_to_driver``), its driver-side INFO logs,
Ray Data's lines about every run, the ERROR records of its C++ core worker. None of it is the user's
business unless something fails, and then the exception (a worker's traceback included) says so.
What ``init_ray`` sets, checked against Ray 2.60.0 as installed:

- ``log_to_driver=False``: workers' output stays in ``<session>/logs/worker-*.out|err``; what a
  worker has to tell the user goes through a ``DriverConsole``, which the driver prints;
- the driver's ``ray`` logger writes to ``<session>/logs/tal-driver-<pid>.log``, errors to stderr too
  (what ``ray.init`` itself logs, such as the token-authentication notice, is buffered until then);
  so do Serve's driver-side INFO lines ("Started Serve in namespace", "Application ... is ready");
- Ray Data's console handler shows errors only (``ray_data_logging.yaml`` through
  ``RAY_DATA_LOGGING_CONFIG``); its files keep every record;
- the C++ ERROR records Ray copies to a driver's stderr are dropped there (``native_log_filter``):
  they are in ``<session>/logs/python-core-driver-*.log`` already;
- the log folder is printed once, when this process starts or joins Ray.

Two things are the callers': Ray Train's own INFO lines (``RunConfig(logging_config=...)`` in
``jobs.train``), and not calling ``serve.shutdown()`` on a local Ray that ends anyway (``owns_ray``):
it makes Ray print "Task ServeController.graceful_shutdown failed ... will be retried".

``ray.LoggingConfig`` is not used: in Ray 2.60 it adds a stderr handler to the root and ``ray``
loggers of the driver and of every worker of the job (``DefaultLoggingConfigurator``), which puts
more on the terminal, not less. A process whose Ray someone else started (a notebook, the tests'
session fixture) keeps that Ray's settings; only Ray Data's console level, a setting of this
process, is applied.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
_LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own
_ray_data_quiet = False
_driver_log: logging.Handler | None = None  # <session>/logs/tal-driver-<pid>.log, once this process has started or joined Ray


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` (a new local Ray, or the cluster of ``RAY_ADDRESS``) with Ray's output in its
    log files, as the module says; prints where they are. Does nothing to a Ray already initialized in
    this process but quieten Ray Data's console."""
    import ray

    global _driver_log
    _quiet_ray_data()
    if ray.is_initialized():
        _quiet_ray_serve()
        return
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):  # Ray's own: stderr, from INFO up
        ray_logger.removeHandler(handler)
    ray_logger.propagate = False
    ray_logger.addHandler(_stderr_handler(logging.ERROR))
    pending = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)  # until the log folder exists
    ray_logger.addHandler(pending)
    try:
        context = ray.init(log_to_driver=False, **kwargs)  # configure_logging (the default) keeps these handlers; level INFO
    except BaseException:
        explain = _stderr_handler(logging.WARNING)  # what Ray logged may say why; its errors are on stderr already
        explain.addFilter(lambda record: record.levelno < logging.ERROR)
        _flush_into(pending, explain)
        raise
    session = getattr(context, "address_info", {}).get("session_dir")  # none through a Ray Client (ray://)
    if session is None:
        _flush_into(pending, _stderr_handler(logging.WARNING))
        return
    logs = Path(session) / "logs"
    to_file = logging.FileHandler(logs / f"tal-driver-{os.getpid()}.log")
    to_file.setFormatter(logging.Formatter(_LOG_FORMAT))
    _flush_into(pending, to_file)
    _driver_log = to_file
    _quiet_ray_serve()
    _strip_ray_errors_from_stderr()
    print(f"Ray logs: {logs}", flush=True)


def owns_ray() -> bool:
    """Whether this process started the (local) Ray it is connected to, which then ends with ``ray.shutdown()`` or
    the process, everything on it included; False when it joined a cluster, or has no Ray."""
    import ray

    node = ray._private.worker._global_node  # no public API says it (Ray 2.60): the head node object of a driver that started it
    return ray.is_initialized() and node is not None and bool(node.head)


def _quiet_ray_serve() -> None:
    """Serve's driver-side INFO lines ("Started Serve in namespace", "Application ... is ready") into this process's
    Ray log file; its warnings and errors still on stderr. Serve configures the ``ray.serve`` logger when imported."""
    if "ray.serve" not in sys.modules or _driver_log is None:
        return
    serve_logger = logging.getLogger("ray.serve")
    if _driver_log in serve_logger.handlers:
        return
    for handler in serve_logger.handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    serve_logger.addHandler(_driver_log)


def _stderr_handler(level: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    return handler


def _flush_into(pending: logging.handlers.MemoryHandler, target: logging.Handler) -> None:
    """Replace ``pending`` on the ``ray`` logger by ``target``, which gets what ``pending`` held first."""
    ray_logger = logging.getLogger("ray")
    pending.setTarget(target)
    ray_logger.removeHandler(pending)
    pending.close()  # flushes into target
    ray_logger.addHandler(target)


def _quiet_ray_data() -> None:
    """Ray Data's console at ERROR (unless the environment names another config), now and at every reconfiguration."""
    global _ray_data_quiet
    if _ray_data_quiet:
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    if "ray.data" in sys.modules:  # it read its config when imported (ray.train and ray.serve import it): again, now
        from ray.data._internal.logging import configure_logging

        configure_logging()
    _ray_data_quiet = True


def _strip_ray_errors_from_stderr() -> None:
    """This process's stderr through ``native_log_filter`` (a child process) to where it went before, until exit."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        # its own session: a Ctrl-C for this process must not stop what shows its traceback
        child = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("native_log_filter.py"))],
            stdin=read_end,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
        )
    finally:
        os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe loses its last writer here: the filter drains it and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)

    atexit.register(restore)


class DriverConsole:
    """Lines that Ray workers have for the user, printed once, by the driver (workers' own output stays in
    Ray's log files).

    The driver makes one, passes it to the workers (it pickles as a handle) and wraps the call that waits
    for them in ``with console.printing():``; a worker calls ``console.print(line)``. Underneath: a
    ``ray.util.queue.Queue`` (a small actor that takes no CPU) that a thread of the driver drains.
    """

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self._queue = Queue(actor_options={"num_cpus": 0})

    def print(self, line: str) -> None:
        """In a worker: ``line`` on the driver's stdout."""
        self._queue.put(line)

    @contextlib.contextmanager
    def printing(self, poll_s: float = 0.5) -> Iterator[None]:
        """Prints the workers' lines as they come while the block runs, and the last ones after it; then ends the queue."""
        import ray
        from ray.util.queue import Empty

        done = threading.Event()

        def pump() -> None:
            while not done.is_set():
                try:
                    print(self._queue.get(timeout=poll_s), flush=True)
                except Empty:
                    pass
                except ray.exceptions.RayError:  # the queue is gone (Ray shut down): nothing more will come
                    return

        thread = threading.Thread(target=pump, name="tal-driver-console", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            with contextlib.suppress(ray.exceptions.RayError):
                for line in self._queue.get_nowait_batch(self._queue.qsize()):
                    print(line, flush=True)
                self._queue.shutdown()
