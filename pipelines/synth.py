"""The embedded synthetic archive (``tal synth``, the demo's data): H.264 videos of K visually
distinct action classes on a cluttered, panning, noisy background, with their ground truth.

Layout written under ``out_dir``::

    videos/<video_id>.mp4            H.264 (libx264, yuv420p), a keyframe every ~2 s
    annotations_activitynet.json     ActivityNet-1.3 ground truth (subset, duration)
    annotations_thumos14.json        ActionFormer's THUMOS14 layout (label_id, fps, duration)

What makes it a localization problem rather than a drawing:

- **Classes.** Class ``c`` is a shape, a motion, a colour and an interior pattern (e.g.
  ``red_disc_slide``: a striped red disc sliding across the frame and bouncing off its edges).
  The first six classes differ in all of shape, motion and colour; up to ``MAX_CLASSES``
  designs are distinct. Objects are large (their bounding box is ~1/5 of the frame's area),
  saturated and two-tone, so a frozen ImageNet backbone per frame plus a small temporal model
  tells them apart; the background is muted.
- **Background-dominated timelines.** Actions cover 20-50% of a video. Instance lengths are
  drawn from a mixture (0.5-1.5 s, 1.5-8 s, 8-40 s); ~30% of instances of at least 1 s get a
  partner of another class that starts inside them (overlapping ground truth, drawn on the
  other half of the frame).
- **Clutter and noise.** A multi-octave tinted texture with small random distractor shapes pans
  slowly (a few to ~20 px/s); every frame gets sensor-like Gaussian noise (from a bank of
  pre-drawn noise frames: fresh noise per frame is the slowest thing one could do here).

Boundary convention (soft boundaries). An object fades in and out linearly over 0.3-0.5 s
(``fade_in``/``fade_out``, at most the instance's length). Its opacity at time t is

    alpha(t) = clip(min((t - start) / fade_in, (end - t) / fade_out) + 1/2, 0, 1)

so the annotated segment ``[start, end]`` is exactly the span where the object is at least half
visible: it starts appearing at ``start - fade_in / 2`` and is gone at ``end + fade_out / 2``.
Frame ``k`` shows the scene at its centre time ``t = (k + 1/2) / fps`` (the frame spans
``[k / fps, (k + 1) / fps)``, as in ``tal_models.timing``). Segment times are rounded to 1 ms
before rendering, so the files hold the exact values the frames were drawn from.

Determinism. Everything is a function of the arguments: video ``i``'s timeline and pixels come
from its own random stream ``[seed, i]`` (so they do not depend on ``videos`` or on the number
of workers), each x264 encoder runs on one thread, and the same seed gives byte-identical
annotation files and identical decoded frames.

This module is imported by every worker process, so it stays free of torch: the structures and
annotation writers are imported only where the parent process builds the ground truth.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import av
import cv2
import numpy as np
from tqdm import tqdm

from pipelines.atomic import atomic_path

if TYPE_CHECKING:
    from tal_models.structures import AnnotationSet

__all__ = [
    "ACTIVITYNET_JSON",
    "MAX_CLASSES",
    "MIN_DURATION",
    "SUBSETS",
    "THUMOS14_JSON",
    "ActionClass",
    "PlannedInstance",
    "SynthResult",
    "VideoPlan",
    "action_classes",
    "annotations_of",
    "opacity",
    "parse_size",
    "plan_archive",
    "summary",
    "synthesize",
]

SUBSETS = ("train", "validation", "test")
_SPLIT = (0.6, 0.2, 0.2)  # fractions of the videos, in SUBSETS order
MIN_DURATION = 2.0  # s; the shortest video the timeline can hold an action and background in
ACTIVITYNET_JSON = "annotations_activitynet.json"
THUMOS14_JSON = "annotations_thumos14.json"

# --- class designs -----------------------------------------------------------------------------
SHAPES = ("disc", "square", "triangle", "ring", "cross", "star")
MOTIONS = ("slide", "spin", "pulse", "blink", "orbit", "bounce")
COLOURS = {  # RGB, saturated; the first five are the most distinct (the default K = 5)
    "red": (225, 30, 30),
    "yellow": (245, 215, 0),
    "blue": (30, 70, 235),
    "green": (20, 190, 50),
    "magenta": (225, 40, 200),
    "cyan": (0, 200, 220),
    "orange": (255, 130, 0),
    "violet": (130, 60, 230),
}
PATTERNS = ("stripes", "checker", "sectors")  # two-tone, so rotation of any shape is visible
MAX_CLASSES = len(SHAPES) * len(MOTIONS)  # (shape, motion) pairs are unique below this
_FLASH = (250, 250, 250)  # "blink" alternates the class colour with this

# motion parameters (seconds, fractions of the frame)
_SLIDE_SPEED = 0.3  # frame widths per second
_SPIN_PERIOD = 2.0
_PULSE_PERIOD, _PULSE_RANGE = 1.2, (0.55, 1.15)
_BLINK_HALF_PERIOD = 0.2
_ORBIT_PERIOD, _ORBIT_RADIUS = 2.5, 0.15  # radius in units of min(width, height)
_BOUNCE_PERIOD, _BOUNCE_HEIGHT = 0.9, 0.3  # height in units of the frame height

# sprites are cached per quantized pose: angle and scale bins
_ANGLE_BINS = 48
_SCALE_BINS = 24
_SCALE_LIMITS = (0.45, 1.3)

# background and encoding
_NOISE_SIGMA = 6.0  # grey levels
_NOISE_BANK = 16
_CLUTTER_PER_PIXEL = 1 / 4000
_KEYFRAME_SECONDS = 2.0
_X264 = {"preset": "veryfast", "crf": "23", "threads": "1"}  # one thread: deterministic, one core per worker


@dataclass(frozen=True)
class ActionClass:
    """One class's look: ``shape`` drawn in ``colour`` (RGB) with a two-tone ``pattern``, moving by ``motion``."""

    name: str
    shape: str
    motion: str
    colour: tuple[int, int, int]
    pattern: str


def action_classes(k: int) -> tuple[ActionClass, ...]:
    """The K class designs, indexed by label id.

    Design ``c`` is shape ``c % 6``, colour ``c % 8``, motion ``(c + c // 6) % 6``: the first six
    differ in every attribute and no two of the first ``MAX_CLASSES`` share shape and motion.
    Label ids follow the sorted names, so the ActivityNet file (whose readers number the sorted
    names) and the THUMOS14 file (which stores ``label_id``) agree on every id.
    """
    _check_whole("classes", k, low=1, high=MAX_CLASSES)
    colours = list(COLOURS.items())
    designs = []
    for c in range(k):
        shape, motion = SHAPES[c % len(SHAPES)], MOTIONS[(c + c // len(SHAPES)) % len(MOTIONS)]
        colour_name, rgb = colours[c % len(colours)]
        designs.append(ActionClass(f"{colour_name}_{shape}_{motion}", shape, motion, rgb, PATTERNS[c % len(PATTERNS)]))
    return tuple(sorted(designs, key=lambda d: d.name))


# --- timelines (drawn in the parent process) -----------------------------------------------------
@dataclass(frozen=True)
class PlannedInstance:
    """One action instance: the annotated ``[start, end]`` (s, where opacity >= 1/2) and how it looks.

    ``anchor`` (u, v) in [0, 1]^2 places the motion inside the area the object may occupy;
    ``scale`` multiplies the class's nominal size, ``angle`` (rad) is its resting orientation,
    ``phase`` in [0, 1) offsets periodic motions, ``direction`` (+1 / -1) their sense.
    """

    label: int
    start: float
    end: float
    fade_in: float
    fade_out: float
    anchor: tuple[float, float]
    scale: float
    angle: float
    phase: float
    direction: int


@dataclass(frozen=True)
class VideoPlan:
    """Everything a worker needs to render one video; ``render_seed`` seeds its background and noise."""

    video_id: str
    subset: str
    num_frames: int
    fps: float
    size: tuple[int, int]  # (width, height)
    instances: tuple[PlannedInstance, ...]
    classes: tuple[ActionClass, ...]
    render_seed: tuple[int, ...]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def opacity(t: np.ndarray | float, start: float, end: float, fade_in: float, fade_out: float) -> np.ndarray:
    """Object opacity in [0, 1] at times ``t`` (s); >= 1/2 exactly on ``[start, end]``."""
    t = np.asarray(t, dtype=np.float64)
    return np.clip(np.minimum((t - start) / fade_in, (end - t) / fade_out) + 0.5, 0.0, 1.0)


def plan_archive(
    *,
    videos: int,
    seed: int,
    classes: int = 5,
    duration_range: tuple[float, float] = (20.0, 120.0),
    size: tuple[int, int] = (320, 240),
    fps: float = 15.0,
) -> list[VideoPlan]:
    """The timelines ``synthesize`` renders, in video-id order (cheap: no pixels).

    Video ``i`` opens with an instance of class ``i % classes``, so every class appears once
    there are at least ``classes`` videos (a format without label ids can only name the classes
    it holds)."""
    _check_arguments(videos=videos, seed=seed, classes=classes, duration_range=duration_range, size=size, fps=fps, workers=None)
    designs = action_classes(classes)
    subsets = _split(videos, seed)
    width = max(5, len(str(videos - 1)))
    plans = []
    for i in range(videos):
        rng = np.random.default_rng([seed, i])
        num_frames = max(1, round(rng.uniform(*duration_range) * fps))
        instances = _timeline(rng, num_frames / fps, classes, first_label=i % classes)
        plans.append(
            VideoPlan(
                video_id=f"synth_{i:0{width}d}",
                subset=subsets[i],
                num_frames=num_frames,
                fps=float(fps),
                size=(int(size[0]), int(size[1])),
                instances=instances,
                classes=designs,
                render_seed=(seed, i, 1),
            )
        )
    return plans


def _split(videos: int, seed: int) -> list[str]:
    """Subset per video: 60/20/20 of a seeded permutation; every subset has a video once there are 3."""
    counts = [round(f * videos) for f in _SPLIT[1:]]
    if videos >= len(SUBSETS):
        counts = [max(1, c) for c in counts]
    counts = [videos - sum(counts), *counts]
    names = np.repeat(np.array(SUBSETS), counts)
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(videos)  # a stream no video index uses
    subsets = [""] * videos
    for rank, i in enumerate(order.tolist()):
        subsets[i] = str(names[rank])
    return subsets


def _instance_length(rng: np.random.Generator) -> float:
    """Seconds: short (0.5-1.5), medium (1.5-8) or long (8-40) with probabilities 0.35 / 0.4 / 0.25."""
    kind = rng.choice(3, p=[0.35, 0.4, 0.25])
    low, high = ((0.5, 1.5), (1.5, 8.0), (8.0, 40.0))[kind]
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _fades(rng: np.random.Generator, length: float) -> tuple[float, float]:
    fade_in, fade_out = rng.uniform(0.3, 0.5, size=2)
    return min(float(fade_in), length), min(float(fade_out), length)  # fully visible for a moment


def _appearance(rng: np.random.Generator, u_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    return {
        "anchor": (float(rng.uniform(*u_range)), float(rng.uniform(0.0, 1.0))),
        "scale": float(rng.uniform(0.9, 1.1)),
        "angle": float(rng.uniform(0.0, 2 * np.pi)),
        "phase": float(rng.uniform(0.0, 1.0)),
        "direction": int(rng.choice([-1, 1])),
    }


def _timeline(rng: np.random.Generator, duration: float, num_classes: int, first_label: int) -> tuple[PlannedInstance, ...]:
    """Non-overlapping base instances covering a drawn 20-40% of the video, separated by random
    background gaps, plus partners of other classes that start inside a base instance; what the
    partners add beyond their hosts keeps the union of the segments under ~50% of the video.
    The first base instance is of class ``first_label``, the others of random classes."""
    budget = rng.uniform(0.2, 0.4) * duration
    lengths: list[float] = []
    while sum(lengths) < budget - 1e-9:
        length = min(_instance_length(rng), budget - sum(lengths))
        if length < 0.5 and lengths:
            break
        lengths.append(max(length, min(0.5, budget)))
    fades = [_fades(rng, length) for length in lengths]
    # full visible span of an instance: length + fade_in / 2 + fade_out / 2
    footprints = [length + (fi + fo) / 2 for length, (fi, fo) in zip(lengths, fades)]
    while sum(footprints) > 0.6 * duration and len(lengths) > 1:
        lengths.pop(), fades.pop(), footprints.pop()
    gaps = rng.dirichlet(np.ones(len(lengths) + 1)) * (duration - sum(footprints))
    labels = rng.integers(num_classes, size=len(lengths))
    labels[0] = first_label
    extension_left = 0.5 * duration - sum(lengths)  # what partners may add to the covered time

    instances = []
    cursor = 0.0
    for length, (fade_in, fade_out), gap, label in zip(lengths, fades, gaps, labels.tolist()):
        start = cursor + gap + fade_in / 2
        host = _instance(label, start, start + length, fade_in, fade_out, **_appearance(rng))
        cursor = start + length + fade_out / 2
        instances.append(host)
        if num_classes > 1 and length >= 1.0 and rng.random() < 0.3:
            # the partner starts inside the host and is drawn on the other half of the frame
            p_start = start + rng.uniform(0.15, 0.75) * length
            p_length = min(_instance_length(rng), start + length + max(extension_left, 0.0) - p_start, duration - 0.25 - p_start)
            p_label = int((label + rng.integers(1, num_classes)) % num_classes)
            p_fades = _fades(rng, max(p_length, 0.0))
            look = _appearance(rng, (0.55, 1.0) if host.anchor[0] < 0.5 else (0.0, 0.45))
            if p_length >= 0.5:
                instances.append(_instance(p_label, p_start, p_start + p_length, *p_fades, **look))
                extension_left -= max(0.0, p_start + p_length - (start + length))
    return tuple(sorted(instances, key=lambda x: (x.start, x.end, x.label)))


def _instance(label: int, start: float, end: float, fade_in: float, fade_out: float, **look) -> PlannedInstance:
    start, end = round(start, 3), round(end, 3)  # the files hold exactly the values rendered
    length = end - start
    return PlannedInstance(label, start, end, min(fade_in, length), min(fade_out, length), **look)


def annotations_of(plans: Sequence[VideoPlan], source: str = "") -> AnnotationSet:
    """The ground truth of planned videos: segments in seconds, labels indexing the class designs."""
    from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation  # torch: kept out of the workers (module doc)

    classes = plans[0].classes if plans else ()
    label_map = LabelMap({c.name: i for i, c in enumerate(classes)})
    videos = {}
    for plan in plans:
        segments = np.array([[x.start, x.end] for x in plan.instances], dtype=np.float64).reshape(-1, 2)
        labels = np.array([x.label for x in plan.instances], dtype=np.int64)
        videos[plan.video_id] = VideoAnnotation(
            plan.video_id, Segments(segments), labels, duration=plan.duration, subset=plan.subset, fps=plan.fps
        )
    return AnnotationSet(videos, label_map, source=source)


# --- rendering (runs in the workers) ---------------------------------------------------------------
def _object_size(width: int, height: int) -> float:
    """Nominal object size (px): its bounding box covers 1/5 of the frame, at most 60% of the short side."""
    return min(math.sqrt(width * height / 5), 0.6 * min(width, height))


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance to the shape's edge in object units (size 1), negative inside (exact or close to it)."""
    match shape:
        case "disc":
            return np.hypot(u, v) - 0.5
        case "square":
            return np.maximum(np.abs(u), np.abs(v)) - 0.45
        case "triangle":  # equilateral, circumradius 0.62: the outward normals of its three sides
            ri = 0.31
            return np.maximum.reduce([v - ri, -0.866 * u - 0.5 * v - ri, 0.866 * u - 0.5 * v - ri])
        case "ring":
            return np.abs(np.hypot(u, v) - 0.39) - 0.11
        case "cross":
            return np.minimum(np.maximum(np.abs(u) - 0.5, np.abs(v) - 0.17), np.maximum(np.abs(u) - 0.17, np.abs(v) - 0.5))
        case "star":
            return np.hypot(u, v) - 0.5 * (0.75 + 0.25 * np.cos(5 * np.arctan2(v, u)))
    raise ValueError(f"unknown shape {shape!r}")  # pragma: no cover


def _shade(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Two-tone interior in [0.55, 1], softened over ~1/3 of a stripe so it does not alias."""
    match pattern:
        case "stripes":
            wave = np.sin(2 * np.pi * u / 0.25)
        case "checker":
            wave = 4 * np.sin(2 * np.pi * u / 0.3) * np.sin(2 * np.pi * v / 0.3)
        case "sectors":
            wave = np.sin(4 * np.arctan2(v, u))
        case _:  # pragma: no cover
            raise ValueError(f"unknown pattern {pattern!r}")
    return 0.775 + 0.225 * np.clip(3 * wave, -1, 1)


@functools.lru_cache(maxsize=128)  # a video's poses; up to ~0.7 MB each at 320x240
def _sprite(shape: str, pattern: str, colour: tuple[int, int, int], size: float, angle_bin: int, scale_bin: int):
    """-> (premultiplied colour [h, w, 3] float32, coverage [h, w] float32, top, left): one pose of
    one object, cropped to its pixels; (top, left) is the crop's corner relative to the centre pixel."""
    angle = 2 * np.pi * angle_bin / _ANGLE_BINS
    scale = _SCALE_LIMITS[0] + (_SCALE_LIMITS[1] - _SCALE_LIMITS[0]) * scale_bin / (_SCALE_BINS - 1)
    extent = size * scale  # px per object unit
    r = math.ceil(0.72 * extent) + 1  # every shape fits in radius 0.72 (the square's corners: 0.64)
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x * c + y * s) / extent, (-x * s + y * c) / extent
    coverage = np.clip(0.5 - _signed_distance(shape, u, v) * extent, 0.0, 1.0).astype(np.float32)  # 1-px antialiasing
    rows, cols = np.flatnonzero(coverage.any(axis=1)), np.flatnonzero(coverage.any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    coverage = np.ascontiguousarray(coverage[crop])
    shade = _shade(pattern, u[crop], v[crop]).astype(np.float32)
    premultiplied = (shade * coverage)[..., None] * np.asarray(colour, dtype=np.float32)  # [h, w, 3]
    return premultiplied, coverage, int(rows[0]) - r, int(cols[0]) - r


@dataclass
class _Track:
    """One instance's pose over the frames where it is visible: frames ``[first, first + n)``."""

    first: int
    alpha: np.ndarray  # [n] opacity
    cx: np.ndarray  # [n] int, centre pixel
    cy: np.ndarray
    angle_bin: np.ndarray  # [n] int
    scale_bin: np.ndarray  # [n] int
    colour: list  # [n] RGB tuples (blink alternates two)
    design: ActionClass


def _track(x: PlannedInstance, design: ActionClass, t: np.ndarray, width: int, height: int, size: float) -> _Track | None:
    alpha = opacity(t, x.start, x.end, x.fade_in, x.fade_out)
    visible = np.flatnonzero(alpha > 1 / 255)
    if visible.size == 0:
        return None
    first, last = int(visible[0]), int(visible[-1])
    t = t[first : last + 1]
    tau = t - (x.start - x.fade_in / 2)  # seconds since the object began to appear
    n = t.shape[0]
    half = 0.5 * size * x.scale
    x_lo, x_hi, y_lo, y_hi = half, width - half, half, height - half  # centres that keep it in frame
    u, v = x.anchor
    cx = np.full(n, x_lo + u * (x_hi - x_lo))
    cy = np.full(n, y_lo + v * (y_hi - y_lo))
    angle = np.full(n, x.angle)
    scale = np.full(n, x.scale)
    colour = [design.colour] * n
    match design.motion:
        case "slide":  # constant speed, reflected at the frame's edges
            span = max(x_hi - x_lo, 1.0)
            p = (cx - x_lo) + x.direction * _SLIDE_SPEED * width * tau
            q = np.mod(p, 2 * span)
            cx = x_lo + np.where(q <= span, q, 2 * span - q)
        case "spin":
            angle = x.angle + x.direction * 2 * np.pi * tau / _SPIN_PERIOD
        case "pulse":
            low, high = _PULSE_RANGE
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * (tau / _PULSE_PERIOD + x.phase))
            scale = x.scale * (low + (high - low) * wave)
        case "blink":
            on = (np.floor(tau / _BLINK_HALF_PERIOD + 2 * x.phase).astype(np.int64) % 2) == 0
            colour = [design.colour if o else _FLASH for o in on.tolist()]
        case "orbit":
            radius = min(_ORBIT_RADIUS * min(width, height), (x_hi - x_lo) / 2, (y_hi - y_lo) / 2)
            ox = x_lo + radius + u * max(x_hi - x_lo - 2 * radius, 0.0)
            oy = y_lo + radius + v * max(y_hi - y_lo - 2 * radius, 0.0)
            theta = 2 * np.pi * (x.phase + x.direction * tau / _ORBIT_PERIOD)
            cx, cy = ox + radius * np.cos(theta), oy + radius * np.sin(theta)
        case "bounce":  # a ball bouncing on a floor at the bottom of its range
            rise = min(_BOUNCE_HEIGHT * height, y_hi - y_lo)
            cy = y_hi - rise * np.abs(np.sin(np.pi * (tau / _BOUNCE_PERIOD + x.phase)))
    lo, hi = _SCALE_LIMITS
    return _Track(
        first=first,
        alpha=alpha[first : last + 1],
        cx=np.rint(cx).astype(np.int64),
        cy=np.rint(cy).astype(np.int64),
        angle_bin=np.rint(np.mod(angle, 2 * np.pi) / (2 * np.pi) * _ANGLE_BINS).astype(np.int64) % _ANGLE_BINS,
        scale_bin=np.clip(np.rint((scale - lo) / (hi - lo) * (_SCALE_BINS - 1)), 0, _SCALE_BINS - 1).astype(np.int64),
        colour=colour,
        design=design,
    )


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, int]:
    """-> (canvas [H + 2m, W + 2m, 3] uint8, margin m): a tinted multi-octave texture with clutter,
    larger than the frame by the margin the camera pans over."""
    margin = round(0.3 * min(width, height))
    ch, cw = height + 2 * margin, width + 2 * margin

    def octave(cell: int, channels: int = 1) -> np.ndarray:  # smooth noise in [0, 1] with features ~cell px
        small = rng.random((ch // cell + 2, cw // cell + 2, channels)).astype(np.float32)
        big = cv2.resize(small, (cw, ch), interpolation=cv2.INTER_CUBIC)
        return big.reshape(ch, cw, channels)

    luminance = 0.5 * octave(96) + 0.3 * octave(24) + 0.2 * octave(6)  # [ch, cw, 1]
    tint = octave(128, 3) - 0.5  # [ch, cw, 3]
    canvas = np.clip(45 + 160 * luminance + 70 * tint, 0, 255).astype(np.uint8)

    # clutter: small muted shapes (at most ~1/4 of an action object) that pan with the texture
    unit = min(width, height)
    for _ in range(round(_CLUTTER_PER_PIXEL * ch * cw)):
        colour = tuple(int(c) for c in (0.5 * rng.integers(0, 256, size=3) + 0.5 * rng.integers(60, 190)))
        cx, cy = int(rng.integers(cw)), int(rng.integers(ch))
        r = int(rng.integers(max(2, unit // 60), max(3, unit // 12)))
        match int(rng.integers(4)):
            case 0:
                cv2.circle(canvas, (cx, cy), r, colour, -1, cv2.LINE_AA)
            case 1:
                cv2.rectangle(canvas, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, -1, cv2.LINE_AA)
            case 2:
                dx, dy = (int(d) for d in rng.integers(-2 * r, 2 * r + 1, size=2))
                cv2.line(canvas, (cx, cy), (cx + dx, cy + dy), colour, max(1, r // 4), cv2.LINE_AA)
            case _:
                cv2.ellipse(canvas, (cx, cy), (r, max(1, r // 2)), float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return canvas, margin


def _pan(rng: np.random.Generator, t: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer crop offsets [n] of a slow, smooth camera pan (periods of 20-45 s)."""
    offsets = []
    for _ in range(2):
        period, phase = rng.uniform(20.0, 45.0), rng.uniform(0.0, 2 * np.pi)
        offsets.append(np.rint(margin + 0.9 * margin * np.sin(2 * np.pi * t / period + phase)).astype(np.int64))
    return offsets[0], offsets[1]


def _blend(frame: np.ndarray, track: _Track, j: int, size: float) -> None:
    """Draw pose ``j`` of ``track`` into ``frame`` [H, W, 3] float32 in place (clipped at the edges)."""
    d = track.design
    premultiplied, coverage, top, left = _sprite(
        d.shape, d.pattern, track.colour[j], size, int(track.angle_bin[j]), int(track.scale_bin[j])
    )
    h, w = coverage.shape
    y0, x0 = int(track.cy[j]) + top, int(track.cx[j]) + left
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, frame.shape[0]), max(x0, 0), min(x0 + w, frame.shape[1])
    if ya >= yb or xa >= xb:
        return
    a = float(track.alpha[j])
    sprite = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
    region = frame[ya:yb, xa:xb]
    region *= (1.0 - a * coverage[sprite])[..., None]
    region += a * premultiplied[sprite]


def _render_video(plan: VideoPlan, path: str) -> tuple[str, int, int]:
    """Encode ``plan`` to ``path`` (atomically: a temporary name in the same folder, then a rename).
    -> (video id, frames written, bytes)."""
    width, height = plan.size
    rng = np.random.default_rng(list(plan.render_seed))
    canvas, margin = _background(rng, width, height)
    t = (np.arange(plan.num_frames) + 0.5) / plan.fps  # frame centres, s
    pan_x, pan_y = _pan(rng, t, margin)
    # +0.5 so that the final float -> uint8 truncation rounds to nearest
    noise = (rng.normal(0.0, _NOISE_SIGMA, size=(_NOISE_BANK, height, width, 3)) + 0.5).astype(np.float32)
    noise_index = rng.integers(_NOISE_BANK, size=plan.num_frames)
    size = _object_size(width, height)
    tracks = [tr for x in plan.instances if (tr := _track(x, plan.classes[x.label], t, width, height, size)) is not None]

    final = Path(path)
    gop = max(1, round(_KEYFRAME_SECONDS * plan.fps))
    # bitexact: no library version string in the file, so that the bytes do not depend on
    # which FFmpeg build PyAV resolved to (decord2 bundles its own, and wins if imported first)
    with atomic_path(final) as tmp, av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(plan.fps).limit_denominator(1001), options=_encoder_options(gop))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = np.empty((height, width, 3), dtype=np.float32)
        for k in range(plan.num_frames):
            frame[:] = canvas[pan_y[k] : pan_y[k] + height, pan_x[k] : pan_x[k] + width]
            for tr in tracks:  # in start order: a later instance is drawn on top
                j = k - tr.first
                if 0 <= j < tr.alpha.shape[0]:
                    _blend(frame, tr, j, size)
            frame += noise[noise_index[k]]
            np.clip(frame, 0.0, 255.0, out=frame)
            video_frame = av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")
            video_frame.pts = k
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return plan.video_id, plan.num_frames, final.stat().st_size


def _encoder_options(gop: int) -> dict[str, str]:
    """libx264 options: a keyframe every ``gop`` frames exactly (no scene-cut keyframes), and no
    macroblock-tree rate control: with it, PyAV 18's libx264 encoded identical frames into
    different bitstreams from run to run (about one encode in three, even on one thread);
    without it, 16 of 16 encodes were identical (it costs a few percent of file size)."""
    return {**_X264, "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "x264-params": "mbtree=0"}


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


# --- the public entry point ------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthResult:
    """What ``synthesize`` wrote: ``videos`` (id -> MP4, in id order), the two ground-truth files,
    the ``annotations`` they hold, the class designs by label id, and what it cost."""

    root: Path
    videos: dict[str, Path]
    activitynet_json: Path
    thumos14_json: Path
    annotations: AnnotationSet
    classes: tuple[ActionClass, ...]
    size: tuple[int, int]  # (width, height)
    fps: float
    frames: int
    bytes_written: int
    seconds: float
    workers: int


def synthesize(
    out_dir: str | os.PathLike,
    *,
    videos: int,
    seed: int,
    classes: int = 5,
    duration_range: tuple[float, float] = (20.0, 120.0),
    size: tuple[int, int] = (320, 240),
    fps: float = 15.0,
    workers: int | None = None,
    progress: bool = True,
) -> SynthResult:
    """Write a synthetic TAL archive under ``out_dir``: ``videos/<id>.mp4`` and both JSON files.

    ``videos`` >= 1 videos with durations uniform in ``duration_range`` (s, rounded to whole
    frames; at least ``MIN_DURATION``), ``classes`` in 1..``MAX_CLASSES``, frames of ``size``
    (width, height; even, >= 32 px) at ``fps``. Subsets ``SUBSETS`` split the videos 60/20/20.
    ``workers`` processes render in parallel (default ``os.cpu_count()``; they are spawned, so a
    script that calls this with workers > 1 needs the ``if __name__ == "__main__":`` guard);
    ``progress`` shows a bar over videos. Existing files of the same names are replaced; a
    reader never sees a half-written file. Bad arguments raise ``ValueError`` saying what to fix.
    """
    _check_arguments(videos=videos, seed=seed, classes=classes, duration_range=duration_range, size=size, fps=fps, workers=workers)
    from pipelines.annotations import write_activitynet, write_thumos14_json  # torch: kept out of the workers (module doc)

    t0 = time.perf_counter()
    root = Path(out_dir)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_archive(videos=videos, seed=seed, classes=classes, duration_range=duration_range, size=size, fps=fps)
    paths = {p.video_id: video_dir / f"{p.video_id}.mp4" for p in plans}
    workers = min(workers or os.cpu_count() or 1, videos)

    written = 0
    with tqdm(total=videos, unit="video", desc="tal synth", disable=not progress) as bar:
        if workers == 1:
            for plan in plans:
                written += _render_video(plan, str(paths[plan.video_id]))[2]
                bar.update()
            _sprite.cache_clear()  # do not keep tens of MB of sprites in the caller's process
        else:
            # spawn, not fork: the caller may hold torch's thread pools or other threads
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
                # longest first, so that no worker is left with a long video at the end
                order = sorted(plans, key=lambda p: -p.num_frames)
                pending = {pool.submit(_render_video, p, str(paths[p.video_id])) for p in order}
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in done:
                            written += future.result()[2]  # re-raises a worker's error
                            bar.update()
                except BrokenProcessPool as e:
                    raise RuntimeError(
                        "a synth worker process died; when calling synthesize from a script, put the call under "
                        "`if __name__ == '__main__':` (workers are spawned processes that import the script), or pass workers=1"
                    ) from e
                finally:
                    for future in pending:
                        future.cancel()

    annotations = annotations_of(plans, source=str(root))
    activitynet_json, thumos14_json = root / ACTIVITYNET_JSON, root / THUMOS14_JSON
    write_activitynet(activitynet_json, annotations)
    write_thumos14_json(thumos14_json, annotations, version="tal-synth")
    return SynthResult(
        root=root,
        videos=paths,
        activitynet_json=activitynet_json,
        thumos14_json=thumos14_json,
        annotations=annotations,
        classes=plans[0].classes,
        size=plans[0].size,
        fps=plans[0].fps,
        frames=sum(p.num_frames for p in plans),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        workers=workers,
    )


def _check_whole(name: str, value, *, low: int, high: int | None = None) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        limit = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be a whole number {limit}, got {value!r}")


def _check_arguments(*, videos, seed, classes, duration_range, size, fps, workers) -> None:
    _check_whole("videos", videos, low=1)
    _check_whole("seed", seed, low=0)
    _check_whole("classes", classes, low=1, high=MAX_CLASSES)
    if workers is not None:
        _check_whole("workers", workers, low=1)
    try:
        low, high = (float(d) for d in duration_range)
    except (TypeError, ValueError):
        raise ValueError(f"duration_range must be (min_seconds, max_seconds), got {duration_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and MIN_DURATION <= low <= high):
        raise ValueError(
            f"duration_range must be (min_seconds, max_seconds) with {MIN_DURATION:g} <= min <= max, got {tuple(duration_range)!r}"
        )
    bad_size = f"size must be (width, height), two even whole numbers >= 32 (H.264 4:2:0 needs even sizes), got {size!r}"
    if not (isinstance(size, Sequence) and len(size) == 2):
        raise ValueError(bad_size)
    for d in size:
        if not (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 32 and d % 2 == 0):
            raise ValueError(bad_size)
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and 1.0 <= fps <= 120.0):
        raise ValueError(f"fps must be a number in 1..120, got {fps!r}")


def parse_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> (320, 240)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"expected WIDTHxHEIGHT such as 320x240, got {text!r}")
    return int(m[1]), int(m[2])


def summary(result: SynthResult) -> str:
    """One paragraph: what was written, where, and how long it took."""
    ann = result.annotations
    durations = np.array([v.duration for v in ann], dtype=np.float64)
    covered = sum(_union_length(v.segments.data) for v in ann)
    overlapping = sum(_overlapping_pairs(v.segments.data) for v in ann)
    width, height = result.size
    per_subset = ", ".join(f"{s} {sum(v.subset == s for v in ann)}" for s in SUBSETS)
    return (
        f"Wrote {len(ann)} videos ({durations.sum() / 60:.1f} min, {result.frames:,} frames, {width}x{height} at "
        f"{result.fps:g} fps, {result.bytes_written / 1e6:.1f} MB of H.264) to {result.root / 'videos'} in "
        f"{result.seconds:.1f} s with {result.workers} worker{'s' if result.workers != 1 else ''} "
        f"({result.frames / max(result.seconds, 1e-9):.0f} frames/s). Ground truth: {ann.num_instances} action instances "
        f"of {len(result.classes)} classes ({', '.join(c.name for c in result.classes)}), covering "
        f"{100 * covered / durations.sum():.0f}% of the time, {overlapping} overlapping pairs; subsets {per_subset}; "
        f"written to {result.activitynet_json} and {result.thumos14_json}."
    )


def _union_length(segments: np.ndarray) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(map(tuple, segments.tolist())):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _overlapping_pairs(segments: np.ndarray) -> int:
    s, e = segments[:, 0], segments[:, 1]
    overlap = (np.minimum(e[:, None], e[None, :]) > np.maximum(s[:, None], s[None, :])).sum()
    return int(overlap - len(s)) // 2
