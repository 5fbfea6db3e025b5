"""A feature-level data set with the real THUMOS14 annotation timings and synthetic features.

No I3D features of THUMOS14 can be reached from this machine, so the benchmarks that train and
evaluate a detector (ours and the ActionFormer reference) use this stand-in: every video of the real
annotation file (ActionFormer's ``thumos14.json``: Validation = training split, Test = test split)
keeps its real duration and its real annotated segments, and gets a feature sequence ``[T, C]``
float32 whose step ``i`` covers the frames ``[i * stride, i * stride + window)`` (centre
``(i * stride + window / 2) / fps`` seconds), as ActionFormer's THUMOS loader assumes.

How the features carry the actions is the *signal model* (``profile``), so that a result can be
checked on data generated differently from the data it was tuned on:

- ``prototype`` (the only one before December 2026): Gaussian noise, a slow per-video background
  drift along a random direction, and, on the steps whose centres fall inside an annotated segment,
  the segment's class prototype (a fixed random unit direction per class, scaled by ``signal``);
  overlapping segments add. No boundary cue beyond the change of content itself.
- ``confusable``: classes in groups of 4 with correlated directions, amplitudes varying per instance,
  soft (ramped) boundaries, and unannotated hard negatives carrying a group's shared component.
- ``cuts``: scene cuts (the background jumps at random shot boundaries unrelated to the actions),
  dropouts inside actions, amplitude flicker.
- ``phases``: content that changes within an action (a start phase that resembles another class),
  heavy-tailed and low-rank correlated noise, unannotated false starts. Meant to be held out: a
  recipe tuned on the other three is checked on it.

Output layout (what ActionFormer's THUMOS dataset class reads, plus a summary):
    out_dir/features/{video_id}.npy   [T, C] float32
    out_dir/annotations.json          ActionFormer THUMOS JSON restricted to the written videos
    out_dir/meta.json                 fps, stride, window, input_dim, classes (label_id order), splits, ...

Usage:
    python benchmarks/_thumos_like.py OUT_DIR [--input-dim 2048] [--max-videos-per-split N] [--seed 0]
        [--signal 3.0] [--noise 1.0] [--drift 0.5] [--fps 30 | --fps video] [--stride 4] [--window 16]
        [--profile prototype|confusable|cuts|phases]
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


def class_directions(num_classes: int, input_dim: int, seed: int, grouped: bool = False) -> np.ndarray:
    """A fixed random unit direction per class, ``[num_classes, input_dim]`` float64.

    ``grouped``: classes come in groups of ``GROUP_SIZE`` (by label id) whose directions share a
    common component (cosine ~0.5 within a group, ~0 across groups): confusable classes."""
    rng = np.random.default_rng([seed, 0x7C1A55])
    directions = rng.standard_normal((num_classes, input_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    if grouped:
        shared = group_directions(num_classes, input_dim, seed)[np.arange(num_classes) // GROUP_SIZE]
        directions = GROUP_SHARE * shared + np.sqrt(1 - GROUP_SHARE**2) * directions
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions


def group_directions(num_classes: int, input_dim: int, seed: int) -> np.ndarray:
    """The shared component of each group of ``GROUP_SIZE`` classes, ``[ceil(K / GROUP_SIZE), input_dim]`` unit rows."""
    rng = np.random.default_rng([seed, 0x6209])
    shared = rng.standard_normal((-(-num_classes // GROUP_SIZE), input_dim))
    return shared / np.linalg.norm(shared, axis=1, keepdims=True)


GROUP_SIZE, GROUP_SHARE = 4, 0.7


# --- signal models ----------------------------------------------------------------------------
# Each fills the [T, C] features of one video from its own generator, the step centres (s), the
# annotated (start, end, label_id) segments and the class directions. Only ``prototype`` was used
# before December 2026 (its output is unchanged); the others stress what it leaves out.


def _sine_drift(rng, centres: np.ndarray, dim: int, amplitude: float) -> np.ndarray:
    """A slow background oscillation along one random direction (period 30-120 s): ``[T, C]``."""
    background = rng.standard_normal(dim)
    background /= np.linalg.norm(background)
    period = rng.uniform(30.0, 120.0)  # seconds
    phase = rng.uniform(0.0, 2 * np.pi)
    return amplitude * np.sin(2 * np.pi * centres / period + phase)[:, None] * background[None, :]


def _inside(centres: np.ndarray, start: float, end: float) -> np.ndarray:
    return (centres >= start) & (centres <= end)


def _free_spans(segments, duration: float, rng, count: int, length: tuple[float, float]) -> list[tuple[float, float]]:
    """Up to ``count`` random spans of ``length`` seconds overlapping no annotated segment (1 s margin)."""
    spans = []
    for _ in range(count * 4):
        if len(spans) == count:
            break
        span = rng.uniform(*length)
        start = rng.uniform(0.0, max(duration - span, 0.0))
        if all(start + span < s - 1.0 or start > e + 1.0 for s, e, _ in segments) and all(start + span < a or start > b for a, b in spans):
            spans.append((start, start + span))
    return spans


def profile_prototype(rng, centres, segments, directions, *, signal, noise, drift):
    """Gaussian noise, a slow drift, and each segment's class direction (``signal``) at every step
    inside it: sharp boundaries, constant amplitude, well-separated classes."""
    feats = noise * rng.standard_normal((len(centres), directions.shape[1]))
    if drift:
        feats += _sine_drift(rng, centres, directions.shape[1], drift)
    for start, end, label in segments:
        feats[_inside(centres, start, end)] += signal * directions[label]
    return feats


def profile_confusable(rng, centres, segments, directions, *, signal, noise, drift):
    """Confusable classes (grouped directions), amplitudes varying per instance (0.5-1.5x), soft
    boundaries (the signal ramps up and down over 0.5-3 s inside each segment), and hard
    negatives: unannotated spans (2-10 s, about one per minute) carrying a group's shared
    component, i.e. what every class of that group has in common and no class on its own."""
    T, C = len(centres), directions.shape[1]
    feats = noise * rng.standard_normal((T, C))
    if drift:
        feats += _sine_drift(rng, centres, C, drift)
    for start, end, label in segments:
        inside = _inside(centres, start, end)
        ramp = min(rng.uniform(0.5, 3.0), max((end - start) / 2, 1e-3))
        envelope = np.clip(np.minimum(centres[inside] - start, end - centres[inside]) / ramp, 0.0, 1.0)
        feats[inside] += rng.uniform(0.5, 1.5) * signal * envelope[:, None] * directions[label]
    duration = float(centres[-1]) + 1.0 if T else 0.0
    shared = _group_components(directions)
    for start, end in _free_spans(segments, duration, rng, max(1, round(duration / 60)), (2.0, 10.0)):
        feats[_inside(centres, start, end)] += rng.uniform(0.6, 1.0) * signal * shared[rng.integers(len(shared))]
    return feats


def _group_components(directions: np.ndarray) -> np.ndarray:
    """The mean direction of each group of ``GROUP_SIZE`` classes (unit rows): their shared component."""
    K, C = directions.shape
    groups = [directions[i : i + GROUP_SIZE].mean(axis=0) for i in range(0, K, GROUP_SIZE)]
    return np.stack([g / np.linalg.norm(g) for g in groups])


def profile_cuts(rng, centres, segments, directions, *, signal, noise, drift):
    """Scene cuts and dropouts: the background is constant within shots (4-20 s on average, a new
    random vector of norm ~0.6 ``signal`` at every cut, unrelated to the actions) on top of the
    slow drift; half of the instances lose their signal for 1-3 gaps of 0.5-2 s (at most 30 % of
    the instance); the signal's amplitude flickers from step to step (0.7-1.3x)."""
    T, C = len(centres), directions.shape[1]
    feats = noise * rng.standard_normal((T, C))
    if drift:
        feats += _sine_drift(rng, centres, C, drift)
    mean_shot = rng.uniform(4.0, 20.0)
    t, shot_start = 0.0, 0
    end_time = float(centres[-1]) if T else 0.0
    while shot_start < T:
        t += rng.exponential(mean_shot)
        shot_end = int(np.searchsorted(centres, t)) if t < end_time else T
        scene = rng.standard_normal(C)
        feats[shot_start : max(shot_end, shot_start + 1)] += 0.6 * signal * scene / np.linalg.norm(scene)
        shot_start = max(shot_end, shot_start + 1)
    for start, end, label in segments:
        inside = _inside(centres, start, end)
        amplitude = signal * rng.uniform(0.7, 1.3, size=int(inside.sum()))
        if rng.random() < 0.5 and end - start > 1.0:
            budget = 0.3 * (end - start)
            for _ in range(rng.integers(1, 4)):
                gap = min(rng.uniform(0.5, 2.0), budget)
                if gap <= 0:
                    break
                budget -= gap
                g0 = rng.uniform(start, end - gap)
                amplitude[_inside(centres[inside], g0, g0 + gap)] = 0.0
        feats[inside] += amplitude[:, None] * directions[label]
    return feats


def profile_phases(rng, centres, segments, directions, *, signal, noise, drift):
    """Held out from tuning: each class moves from a start-phase direction to its own (the
    content changes within an action), heavy-tailed noise (Student t, 3 degrees of freedom,
    unit variance) plus a low-rank background (4 factors following slow random walks), amplitudes
    0.7-1.3x per instance, and short false starts (1-3 s of a random class's start phase, about
    one per 40 s, unannotated)."""
    T, C = len(centres), directions.shape[1]
    feats = noise * rng.standard_t(3, size=(T, C)) / np.sqrt(3.0)
    factors = rng.standard_normal((4, C)) / np.sqrt(C)
    walk = np.cumsum(rng.standard_normal((T, 4)) * 0.05, axis=0)
    walk -= walk.mean(axis=0) if T else 0.0
    feats += drift * 2.0 * walk @ factors * np.sqrt(C) / 2.0
    start_phase = np.roll(directions, 1, axis=0)  # class k starts like class k-1 ends: confusable openings
    for start, end, label in segments:
        inside = _inside(centres, start, end)
        progress = np.clip((centres[inside] - start) / max(end - start, 1e-3), 0.0, 1.0)[:, None]
        direction = (1 - progress) * start_phase[label] + progress * directions[label]
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        feats[inside] += rng.uniform(0.7, 1.3) * signal * direction
    duration = float(centres[-1]) + 1.0 if T else 0.0
    for start, end in _free_spans(segments, duration, rng, max(1, round(duration / 40)), (1.0, 3.0)):
        feats[_inside(centres, start, end)] += 0.8 * signal * start_phase[rng.integers(len(start_phase))]
    return feats


GROUPED_PROFILES = ("confusable", "phases")  # class directions in confusable groups
PROFILES = {
    "prototype": profile_prototype,
    "confusable": profile_confusable,
    "cuts": profile_cuts,
    "phases": profile_phases,
}


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
    profile: str = "prototype",
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
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    directions = class_directions(len(classes), input_dim, seed, grouped=profile in GROUPED_PROFILES)

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
            segments = [(float(a["segment"][0]), float(a["segment"][1]), int(a["label_id"])) for a in video["annotations"]]
            feats = PROFILES[profile](rng, centres, segments, directions, signal=signal, noise=noise, drift=drift)
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
        "profile": profile,
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
    parser.add_argument("--profile", choices=sorted(PROFILES), default="prototype", help="the signal model (see the profile_* functions)")
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
        profile=args.profile,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
