"""A feature-level data set with the real THUMOS14 annotation timings and synthetic features.

No I3D features of THUMOS14 can be reached from this machine, so the benchmarks that train and
evaluate a detector (ours and the ActionFormer reference) use this stand-in: every video of the real
annotation file (ActionFormer's ``thumos14.json``: Validation = training split, Test = test split)
keeps its real duration and its real annotated segments, and gets a feature sequence ``[T, C]``
float32 whose step ``i`` covers the frames ``[i * stride, i * stride + window)`` (centre
``(i * stride + window / 2) / fps`` seconds), as ActionFormer's THUMOS loader assumes.

Features are deliberately simple: Gaussian noise everywhere, a slow per-video background drift along a
random direction, and, on the steps whose centres fall inside an annotated segment, the segment's class
prototype (a fixed random unit direction per class, scaled by ``signal``); overlapping segments add.
There is no boundary cue beyond the change of content itself.

Output layout (what ActionFormer's THUMOS dataset class reads, plus a summary):
    out_dir/features/{video_id}.npy   [T, C] float32
    out_dir/annotations.json          ActionFormer THUMOS JSON restricted to the written videos
    out_dir/meta.json                 fps, stride, window, input_dim, classes (label_id order), splits, ...

Usage:
    python benchmarks/_thumos_like.py OUT_DIR [--input-dim 2048] [--max-videos-per-split N] [--seed 0]
        [--signal 3.0] [--noise 1.0] [--drift 0.5] [--fps 30 | --fps video] [--stride 4] [--window 16]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ANNOTATIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thumos14" / "thumos14.json"
SPLITS = {"train": "validation", "test": "test"}  # our split name -> THUMOS subset (lower case)


def num_feature_steps(duration: float, fps: float, stride: int, window: int) -> int:
    """Number of sliding windows of ``window`` frames every ``stride`` frames over ``duration`` seconds (at least 1)."""
    n_frames = int(math.floor(duration * fps + 1e-6))
    return max(1, (n_frames - window) // stride + 1)


def step_centres(num_steps: int, fps: float, stride: int, window: int) -> np.ndarray:
    """Centre time (seconds) of each feature step."""
    return (np.arange(num_steps, dtype=np.float64) * stride + 0.5 * window) / fps


def class_directions(num_classes: int, input_dim: int, seed: int) -> np.ndarray:
    """A fixed random unit direction per class, ``[num_classes, input_dim]`` float64."""
    rng = np.random.default_rng([seed, 0x7C1A55])
    directions = rng.standard_normal((num_classes, input_dim))
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def _select(ids: list[str], limit: int | None) -> list[str]:
    """Evenly spaced videos over the sorted ids (all of them without a limit): deterministic, seed independent."""
    ids = sorted(ids)
    if limit is None or limit >= len(ids):
        return ids
    if limit <= 0:
        return []
    picks = np.unique(np.linspace(0, len(ids) - 1, limit).round().astype(int))
    return [ids[i] for i in picks]


def make_thumos_like(
    out_dir: str | Path,
    *,
    annotations: str | Path = DEFAULT_ANNOTATIONS,
    input_dim: int = 2048,
    fps: float | None = 30.0,
    stride: int = 4,
    window: int = 16,
    signal: float = 3.0,
    noise: float = 1.0,
    drift: float = 0.5,
    seed: int = 0,
    max_videos_per_split: int | None = None,
) -> dict[str, Any]:
    """Write the data set to ``out_dir`` and return a summary.

    ``fps``: the frame rate that defines the feature grid of every video, written as each video's ``fps``
    in ``annotations.json`` so that loaders convert seconds with the same value; ``None`` keeps each
    video's own fps from the annotation file (30, 29.97, 25 or 24 in THUMOS14).
    ``signal``: norm of the class prototype added inside segments; ``noise``: standard deviation of the
    i.i.d. Gaussian noise per element; ``drift``: amplitude of the slow background drift.
    """
    if input_dim < 1 or stride < 1 or window < 1:
        raise ValueError("input_dim, stride and window must be positive")
    out = Path(out_dir)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)

    with open(annotations) as f:
        source = json.load(f)
    database = source["database"]

    classes_by_id: dict[int, str] = {}
    for video in database.values():
        for ann in video["annotations"]:
            name = classes_by_id.setdefault(int(ann["label_id"]), ann["label"])
            if name != ann["label"]:
                raise ValueError(f"label_id {ann['label_id']} names both {name!r} and {ann['label']!r}")
    if sorted(classes_by_id) != list(range(len(classes_by_id))):
        raise ValueError(f"label ids are not 0..K-1: {sorted(classes_by_id)}")
    classes = [classes_by_id[i] for i in range(len(classes_by_id))]
    directions = class_directions(len(classes), input_dim, seed)

    splits: dict[str, list[str]] = {}
    for split, subset in SPLITS.items():
        ids = [vid for vid, v in database.items() if v["subset"].lower() == subset]
        splits[split] = _select(ids, max_videos_per_split)

    out_db: dict[str, Any] = {}
    total_steps = 0
    num_instances = {split: 0 for split in splits}
    for split, ids in splits.items():
        for vid in ids:
            video = database[vid]
            video_fps = float(video["fps"]) if fps is None else float(fps)
            duration = float(video["duration"])
            num_steps = num_feature_steps(duration, video_fps, stride, window)
            centres = step_centres(num_steps, video_fps, stride, window)

            # one generator per video, keyed by the seed and the video id: same features whatever else is written
            rng = np.random.default_rng([seed, *vid.encode()])
            feats = noise * rng.standard_normal((num_steps, input_dim))
            if drift:
                background = rng.standard_normal(input_dim)
                background /= np.linalg.norm(background)
                period = rng.uniform(30.0, 120.0)  # seconds
                phase = rng.uniform(0.0, 2 * np.pi)
                feats += drift * np.sin(2 * np.pi * centres / period + phase)[:, None] * background[None, :]
            for ann in video["annotations"]:
                start, end = (float(x) for x in ann["segment"])
                inside = (centres >= start) & (centres <= end)
                feats[inside] += signal * directions[int(ann["label_id"])]
            np.save(feat_dir / f"{vid}.npy", feats.astype(np.float32))
            total_steps += num_steps
            num_instances[split] += len(video["annotations"])

            entry = {key: value for key, value in video.items() if key != "annotations"}
            entry["fps"] = video_fps
            entry["annotations"] = []
            for ann in video["annotations"]:
                ann = dict(ann)
                if "segment(frames)" in ann:
                    ann["segment(frames)"] = [round(float(t) * video_fps, 3) for t in ann["segment"]]
                entry["annotations"].append(ann)
            out_db[vid] = entry

    with open(out / "annotations.json", "w") as f:
        json.dump({"version": source.get("version", "thumos14"), "database": out_db}, f)

    meta = {
        "source": str(annotations),
        "fps": fps,
        "stride": stride,
        "window": window,
        "input_dim": input_dim,
        "classes": classes,
        "splits": splits,
        "subsets": SPLITS,
        "signal": signal,
        "noise": noise,
        "drift": drift,
        "seed": seed,
        "max_videos_per_split": max_videos_per_split,
    }
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)

    return {
        "out_dir": str(out),
        "num_videos": {split: len(ids) for split, ids in splits.items()},
        "num_instances": num_instances,
        "num_classes": len(classes),
        "total_steps": total_steps,
        "feature_bytes": total_steps * input_dim * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    parser.add_argument("--input-dim", type=int, default=2048)
    parser.add_argument("--fps", default="30", help="grid frame rate, or 'video' for each video's own fps")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--signal", type=float, default=3.0)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--drift", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-videos-per-split", type=int, default=None)
    args = parser.parse_args()
    summary = make_thumos_like(
        args.out_dir,
        annotations=args.annotations,
        input_dim=args.input_dim,
        fps=None if args.fps == "video" else float(args.fps),
        stride=args.stride,
        window=args.window,
        signal=args.signal,
        noise=args.noise,
        drift=args.drift,
        seed=args.seed,
        max_videos_per_split=args.max_videos_per_split,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
