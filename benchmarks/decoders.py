"""Decoder backends (``pipelines.decoders``): throughput, memory, and range seeks.

    .venv/bin/python benchmarks/decoders.py [--quick] [--cache /tmp/tal-bench]

Prints ONE JSON line (``measure()``'s dict; ``benchmarks/scale.py`` imports ``measure``). Videos:
the shared H.264 file ``bigbuckbunny_720p_h264.mp4`` (1280x720, 25 fps, 132 frames, one keyframe),
the shared MPEG-PS file ``city_405p_mpeg2.mpg`` (range seeks only: decord and torchcodec hand it to
PyAV) and a synthetic video (``pipelines.synth``, 320x240, 15 fps, a keyframe every 2 s; 120 s, or
30 s with ``--quick``), generated once into ``--cache``.

Each backend runs in a fresh process, one after the other (the machine's other load is in
``loadavg``), with ``num_threads=1`` (a worker owning one core) and no resize:

* ``fps``: sampled frames per second of wall time, ``sequential`` (every native frame) and ``sparse``
  (``fps=1``), per video; the decoder's start (index pass, opening) included.
* ``rss_mb``: ``peak`` (VmHWM over the whole run), ``after`` (VmRSS once every video is decoded
  and dropped) and ``idle_growth`` (VmRSS change while the caller holds a chunk of a 640-frame
  decode of the synthetic video for 3 s without asking for the next: decord's defect is
  background decoding then); for decord also ``kept_reader_idle_growth``, the same for a plain
  ``VideoReader`` kept after one 16-frame ``get_batch`` (what the backend avoids).
* ``seek``: for a range of 64 sampled frames starting at 75% of the video, the seconds to decode it
  with ``start_index`` (a seek to the keyframe before it) and from the start (``start_index=0``, the
  same stop), and their ratio ``speedup``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._machine import loadavg, status_mb  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "videos"
BBB = SHARED / "bigbuckbunny_720p_h264.mp4"
CITY = SHARED / "city_405p_mpeg2.mpg"
BACKENDS = ("pyav", "decord", "torchcodec")
RANGE_FRAMES = 64
IDLE_SECONDS = 3.0


def synthetic_video(cache: Path, seconds: float) -> Path:
    """The synthetic video, generated once under ``cache``."""
    from pipelines.synth import ACTIVITYNET_JSON, synthesize

    root = cache / f"decoders-{seconds:g}s"
    paths = sorted((root / "videos").glob("*.mp4"))
    if (root / ACTIVITYNET_JSON).exists() and len(paths) == 1:
        return paths[0]
    shutil.rmtree(root, ignore_errors=True)
    result = synthesize(root, videos=1, seed=0, duration_range=(seconds, seconds), size=(320, 240), fps=15.0, workers=1, progress=False)
    return next(iter(result.videos.values()))


# --- one backend, in its own process -------------------------------------------------------------
def _decode_seconds(decoder, path: Path, **kwargs) -> tuple[int, float]:
    start = time.perf_counter()
    _, chunks = decoder.iter_frames(path, chunk_frames=64, resize=None, num_threads=1, **kwargs)
    n = sum(len(c) for c in chunks)
    return n, time.perf_counter() - start


def run_backend(name: str, videos: dict[str, str]) -> dict:
    """Every measurement of one backend (call in a fresh process: its memory figures are its own)."""
    from pipelines.decoders import get_decoder
    from pipelines.video import probe, sample_times

    decoder = get_decoder(name)
    out: dict = {"fps": {}, "seek": {}}
    for key in ("bbb", "synth"):
        path = Path(videos[key])
        row = {}
        for label, fps in (("sequential", None), ("sparse", 1.0)):
            n, seconds = _decode_seconds(decoder, path, fps=fps)
            row[label] = round(n / seconds, 1)
        out["fps"][key] = row

    # a caller that holds a chunk for a while: the reader must not decode ahead meanwhile
    _, chunks = decoder.iter_frames(Path(videos["synth"]), fps=None, chunk_frames=64, resize=None, num_threads=1, stop_index=640)
    next(chunks)
    before = status_mb("VmRSS")
    time.sleep(IDLE_SECONDS)
    idle_growth = round(status_mb("VmRSS") - before, 1)
    del chunks

    for key in ("synth", "city", "bbb"):
        path = Path(videos[key])
        info = probe(path)
        n = len(sample_times(info.duration, info.native_fps))
        first = int(0.75 * n)
        stop = min(n, first + RANGE_FRAMES)
        got, ranged = _decode_seconds(decoder, path, fps=None, start_index=first, stop_index=stop)
        _, from_start = _decode_seconds(decoder, path, fps=None, start_index=0, stop_index=stop)
        out["seek"][key] = {
            "range": [first, stop],
            "frames": got,
            "range_s": round(ranged, 3),
            "from_start_s": round(from_start, 3),
            "speedup": round(from_start / ranged, 2),
        }
    out["rss_mb"] = {"peak": status_mb("VmHWM"), "after": status_mb("VmRSS"), "idle_growth": idle_growth}
    if name == "decord":  # what the backend avoids: one reader kept across chunks, as decord is usually used
        out["rss_mb"]["kept_reader_idle_growth"] = _kept_reader_growth(decoder, Path(videos["synth"]))
    out["used"] = dict(decoder.used)
    return out


def _kept_reader_growth(decoder, path: Path) -> float:
    """VmRSS change (MB) in the idle seconds after one 16-frame ``get_batch`` of a decord reader that is kept."""
    reader = decoder._decord.VideoReader(str(path), num_threads=1)
    reader.get_batch(list(range(16))).asnumpy()
    before = status_mb("VmRSS")
    time.sleep(IDLE_SECONDS)
    growth = round(status_mb("VmRSS") - before, 1)
    del reader
    return growth


# --- all of it -----------------------------------------------------------------------------------
def measure(quick: bool = False, cache: str | os.PathLike | None = None) -> dict:
    """Every backend on the three videos, each backend in a fresh process; see the module docstring."""
    cache = Path(cache or os.environ.get("TAL_BENCH_CACHE", "/tmp/tal-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    seconds = 30.0 if quick else 120.0
    videos = {"bbb": str(BBB), "city": str(CITY), "synth": str(synthetic_video(cache, seconds))}
    result: dict = {"loadavg_start": loadavg(), "quick": quick, "synthetic_seconds": seconds, "cpu_count": os.cpu_count(), "backends": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in BACKENDS:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--backend", name, "--videos", json.dumps(videos)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if proc.returncode != 0:
            result["backends"][name] = {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_s"] = round(time.perf_counter() - started, 1)
        result["backends"][name] = row
    result["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 30 s synthetic video instead of 120 s")
    parser.add_argument("--cache", help="where the synthetic video is kept (default /tmp/tal-bench)")
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)  # internal: one backend's process
    parser.add_argument("--videos", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend:
        print(json.dumps(run_backend(args.backend, json.loads(args.videos))))
    else:
        print(json.dumps(measure(quick=args.quick, cache=args.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
