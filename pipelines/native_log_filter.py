"""stdin -> stdout without the ERROR records of Ray's C++ logger: what ``init_ray`` puts between a
driver's stderr and the terminal (``python -m pipelines.native_log_filter``).

Ray's core worker in a driver process writes its log to ``python-core-driver-*.log`` and copies
every ERROR record to the process's stderr as well, with no setting to turn the copy off (Ray
2.60: ``RayLog::StartRayLog`` is given no error file for core workers). Ray Data's actor pools set
one off at every run (ray-project/ray#57733: its own arguments are in the object store and
``max_restarts`` is -1). Those records are in the log file already, so this filter drops them and
passes everything else through unchanged, as it arrives (a progress bar's ``\\r`` updates included).

Only the standard library: it starts in ~30 ms. It reads until every writer has closed the pipe,
so a driver that dies abruptly still has its last words shown.
"""

from __future__ import annotations

import os
import re
import sys

# [2026-12-04 18:32:34,405 E 4554 4554] core_worker.cc:2465: Actor with class name: ...
# ERROR only: FATAL records (the driver is about to die) stay on the terminal.
RAY_ERROR_RECORD = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} E \d+ \d+\] [\w./-]+\.(?:cc|h):\d+: [^\n]*\n")
# A read takes all the pipe holds (64 KiB by default), and a record (one write of < PIPE_BUF bytes)
# is written atomically, so a record never straddles two reads.
READ_SIZE = 1 << 20


def strip_ray_errors(chunk: bytes) -> bytes:
    return RAY_ERROR_RECORD.sub(b"", chunk)


def main() -> int:
    try:
        while chunk := os.read(0, READ_SIZE):
            view = memoryview(strip_ray_errors(chunk))
            while view:
                view = view[os.write(1, view) :]
    except OSError:  # the terminal went away (EPIPE, EIO)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
