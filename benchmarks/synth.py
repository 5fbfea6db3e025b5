"""How fast ``tal synth`` writes the demo archive: 40 one-minute 320x240 videos at 15 fps by default.

    .venv/bin/python benchmarks/synth.py [--videos 40] [--duration 60] [--workers W] [--size 320x240] [--fps 15]

Writes into a temporary folder (deleted afterwards) and prints ONE JSON line: wall seconds, frames
per second in total and per worker, workers, MB written, and the machine's load and CPU count.
The target on a 2-core machine is at most ~120 s for the default archive.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from pipelines.synth import parse_size, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per video (default 60)")
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tal-synth-bench-") as tmp:
        t0 = time.perf_counter()
        result = synthesize(
            tmp, videos=args.videos, seed=args.seed, duration_range=(args.duration, args.duration),
            size=parse_size(args.size), fps=args.fps, workers=args.workers, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "synth_archive",
        "videos": args.videos,
        "duration_s": args.duration,
        "size": args.size,
        "fps": args.fps,
        "frames": result.frames,
        "seconds": round(seconds, 2),
        "frames_per_s": round(result.frames / seconds, 1),
        "frames_per_s_per_worker": round(result.frames / seconds / result.workers, 1),
        "workers": result.workers,
        "mb_written": round(result.bytes_written / 1e6, 1),
        "instances": result.annotations.num_instances,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
