"""``pipelines.ray_runtime``: Ray's own output kept off the terminal, the user's lines kept on it."""

from __future__ import annotations

import subprocess
import sys

import pipelines.native_log_filter as native_log_filter
from pipelines.ray_runtime import DriverConsole, init_ray, owns_ray

RAY_ERROR = (
    b"[2026-12-04 18:32:34,405 E 4554 4554] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(VideoFeatureExtractor))'"
    b" and ID: 'd13428c75da147b690fdf88501000000' has constructor arguments in the object store and max_restarts > 0.\n"
)
RAY_FATAL = b"[2026-12-04 18:32:35,000 F 4554 4554] core_worker.cc:100: Check failed: something\n"


def test_the_filter_drops_ray_s_cxx_error_records_and_nothing_else():
    bar = b"\rextract:   0%|          | 0/3 [00:00<?, ?video/s]"  # a progress bar mid-line: the record follows without a newline
    traceback = b'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: [1, 2] is wrong\n'
    chunk = bar + RAY_ERROR + b"\rextract:  33%|###       | 1/3\n" + RAY_FATAL + traceback + RAY_ERROR
    assert native_log_filter.strip_ray_errors(chunk) == bar + b"\rextract:  33%|###       | 1/3\n" + RAY_FATAL + traceback
    assert native_log_filter.strip_ray_errors(b"[1/5] synthetic archive\n") == b"[1/5] synthetic archive\n"


def test_the_filter_process_copies_stdin_to_stdout_as_it_comes():
    child = subprocess.run(
        [sys.executable, "-I", native_log_filter.__file__], input=b"partial line" + RAY_ERROR + b", rest\n", capture_output=True, timeout=30
    )
    assert child.returncode == 0 and child.stdout == b"partial line, rest\n", child


def test_a_console_prints_what_workers_send_once(ray_session, capsys):
    import ray

    init_ray()  # the session's Ray: left as it is, nothing printed
    assert capsys.readouterr().out == ""
    assert owns_ray()  # the session fixture started it, in this process
    console = DriverConsole()
    send = ray.remote(DriverConsole.print)  # a task in a worker process, as Ray Train's workers do
    with console.printing(poll_s=0.1):
        ray.get([send.remote(console, f"line {i}") for i in range(3)])
    printed = capsys.readouterr().out.splitlines()
    assert sorted(printed) == ["line 0", "line 1", "line 2"]
