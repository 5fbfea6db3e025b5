"""Videos/s of ``tal detect --workers 2`` (the Ray Data pipeline) vs the in-process ``tal detect``.

    .venv/bin/python benchmarks/batch_detect.py [--quick] [--cache /tmp/tal-bench-batch-detect]

Prints ONE JSON line. The same synthetic videos for both (``pipelines.synth``, seed 0, 160x120, 10 fps,
4-8 s; 20 of them, 6 with ``--quick``), generated once into ``--cache``. The checkpoint is a seeded,
untrained TemporalMaxer whose provenance is the default mobilenet_v2 at 5 fps, window 2, stride 2: the
cost is decoding and the backbone, which do not depend on the detector's weights.

- ``in_process``: ``jobs.detect.run`` (what ``tal detect`` without ``--workers`` runs), torch's default
  threads (``threads``); ``seconds`` from its first video to its last (``DetectReport.seconds``), its
  model and backbone build excluded. ``in_process_1_thread``: the same with ``torch.set_num_threads(1)``,
  one core's worth (measured here under load, it was 3x faster than 2 threads: oversubscribed cores).
- ``batch``: ``jobs.batch_detect.run`` with 2 actors of 1 CPU and 1 thread each, on a Ray started here
  (``ray.init(num_cpus=2)``, timed apart as ``ray_init_s``) with worker niceness 0, so that the actors
  and the in-process loop get the same share of a loaded machine (Ray's default is nice 15).
  ``seconds`` is ``BatchDetectReport.seconds``: from submitting the videos to the last shard, actor
  start-up (torch import, backbone and detector build) included; ``steady_videos_per_s`` counts only
  the actors' time on videos (the manifest's per-video ``started`` / ``seconds``: videos / (last end -
  first start)).
- ``loadavg``: ``os.getloadavg()`` before and after; the machine is shared, so read the ratio with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # read when Ray starts; Ray's default is 15
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE, FPS, SEED = (160, 120), 10.0, 0
SAMPLING = dict(fps=5.0, window=2, stride=2, chunk_frames=16)


def _videos(cache: Path, count: int) -> Path:
    from pipelines.synth import synthesize

    root = cache / f"synth-{count}"
    if not (root / "videos").is_dir() or len(list((root / "videos").glob("*.mp4"))) != count:
        synthesize(root, videos=count, seed=SEED, classes=3, duration_range=(4.0, 8.0), size=SIZE, fps=FPS, workers=1, progress=False)
    return root / "videos"


def _checkpoint(path: Path) -> Path:
    import torch

    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, provenance_for, settings_json
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.presets import make_config

    sampling = SamplingConfig(**SAMPLING)
    provenance = provenance_for(build_backbone(BackboneConfig(), "cpu"), sampling, settings_json(BackboneConfig(), sampling))
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=3, input_dim=1280, max_seq_len=64, embed_dim=16, levels=3))
    save_checkpoint(Checkpoint.from_model(model.eval(), ["a", "b", "c"], provenance.to_dict()), path)
    return path


def measure(quick: bool = False, cache: str | os.PathLike = "/tmp/tal-bench-batch-detect") -> dict:
    """Videos/s of the batch path (2 actors) and of the in-process path on the same videos (module doc)."""
    import ray
    import torch

    from jobs.batch_detect import BatchDetectRequest, Output, read_state
    from jobs.batch_detect import run as run_batch
    from jobs.detect import DetectRequest
    from jobs.detect import run as run_in_process

    count = 6 if quick else 20
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    videos = _videos(cache, count)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        model = _checkpoint(Path(tmp) / "model.pt")
        common = dict(videos=str(videos), model=str(model), device="cpu", timeline_videos=0, progress=False)

        default_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        single = run_in_process(DetectRequest(output=Path(tmp) / "in_process_1", **common))
        torch.set_num_threads(default_threads)
        in_process = run_in_process(DetectRequest(output=Path(tmp) / "in_process", **common))

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        try:
            out = str(Path(tmp) / "batch")
            batch = run_batch(BatchDetectRequest(output=out, workers=2, cpus_per_worker=1.0, shard_videos=5, **common))
        finally:
            ray.shutdown()
        records = [record for _, record in read_state(Output(out)).done.values()]
    assert len(in_process.videos) == len(batch.videos) == count, (len(in_process.videos), len(batch.videos))
    span = max(r["started"] + r["seconds"] for r in records) - min(r["started"] for r in records)
    return {
        "benchmark": "batch_detect",
        "videos": count,
        "video_seconds": round(sum(v.duration for v in in_process.videos), 1),
        "in_process": {
            "seconds": round(in_process.seconds, 2),
            "videos_per_s": round(count / in_process.seconds, 3),
            "threads": default_threads,
        },
        "in_process_1_thread": {"seconds": round(single.seconds, 2), "videos_per_s": round(count / single.seconds, 3)},
        "batch": {
            "workers": 2,
            "seconds": round(batch.seconds, 2),
            "videos_per_s": round(count / batch.seconds, 3),
            "steady_videos_per_s": round(count / span, 3),
            "ray_init_s": round(ray_init_s, 2),
            "shards": len(batch.shards),
            "row_bytes_max": batch.row_bytes_max,
        },
        "speedup": round(in_process.seconds / batch.seconds, 2),
        "speedup_steady": round(in_process.seconds / span, 2),
        "speedup_vs_1_thread": round(single.seconds / batch.seconds, 2),
        "speedup_steady_vs_1_thread": round(single.seconds / span, 2),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 videos instead of 20")
    parser.add_argument("--cache", default="/tmp/tal-bench-batch-detect", help="where the synthetic videos are kept")
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.cache)))


if __name__ == "__main__":
    main()
