"""A THUMOS14-timed feature set in a shared vision-language space: synthetic text-aligned features.

No VLM weights (CLIP and the like) can be reached from this machine, so the open-vocabulary detectors
(a text-conditioned head, training-free zero-shot detection) are measured on this stand-in. Every video
of the real THUMOS14 annotation file keeps its real duration and segments (``benchmarks/_thumos_like.py``
writes the layout: the same videos, splits, timing and ``annotations.json``), and its features live in
one space of width ``E`` (``input_dim``) shared with the class-name "text embeddings":

- each class ``k`` has a text embedding ``t_k``: a random unit vector (``_thumos_like.class_directions``), of the
  whole space or (``text_rank`` r) of one random r-dimensional subspace shared by every class, as real class-name
  embeddings share a low-dimensional structure (what lets a head trained on some classes transfer to others),
  written as the embedding table ``text_embeddings.npz`` (``names [K]``, ``embeddings [K, E]`` float32:
  the keys of ``pipelines.vlm``'s table, so a ``table`` TextEncoderConfig reads it);
- its visual prototype is ``p_k = t_k + o_k``, with ``o_k`` a fixed offset of norm ``proto_noise``
  orthogonal to ``t_k`` (image and text embeddings of a class never coincide, as CLIP's modality gap:
  cos(p_k, t_k) = 1 / sqrt(1 + proto_noise^2));
- a step whose centre falls inside a segment of class ``k`` carries ``signal * p_k`` (overlaps add);
  a step inside no segment carries ``background * b``, one random background direction per data set;
- every step also carries i.i.d. Gaussian noise (std ``noise`` per element) and a slow per-video drift
  (``_thumos_like``'s sine drift, amplitude ``drift``).

The classes' prototypes are as far apart as their text embeddings. A detector that learns the seen classes'
visual-text relation can transfer it to an unseen class only along directions the seen classes span (all of
them when ``text_rank`` is at most the number of seen classes; about K_seen / E of an unseen class otherwise); a
training-free detector that scores steps by their cosine with ``t_k`` works up to the modality gap and the noise.

``class_splits`` draws the zero-shot protocol's seen / unseen class splits (EffPrompt, STALE: THUMOS14's
20 classes split 75/25 or 50/50, 10 random splits each).

Output layout (``_thumos_like``'s, plus the table):
    out_dir/features/{video_id}.npy   [T, E] float32
    out_dir/annotations.json          ActionFormer THUMOS JSON restricted to the written videos
    out_dir/meta.json                 fps, stride, window, input_dim, classes, splits, ..., profile "aligned"
    out_dir/text_embeddings.npz       names [K], embeddings [K, E] float32 (unit rows)

Usage:
    python benchmarks/_aligned_like.py OUT_DIR [--input-dim 64] [--max-videos-per-split N] [--seed 0]
        [--signal 3.0] [--proto-noise 0.5] [--noise 1.0] [--drift 0.5] [--background 1.0] [--text-rank R]
        [--fps 30 | --fps video] [--stride 4] [--window 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

try:  # imported as benchmarks._aligned_like, or run as a script from benchmarks/
    from benchmarks._thumos_like import DEFAULT_ANNOTATIONS, _inside, _sine_drift, class_directions, make_thumos_like, step_centres
except ImportError:  # pragma: no cover
    from _thumos_like import DEFAULT_ANNOTATIONS, _inside, _sine_drift, class_directions, make_thumos_like, step_centres

TEXT_TABLE = "text_embeddings.npz"


def text_embeddings(num_classes: int, input_dim: int, seed: int, rank: int | None = None) -> np.ndarray:
    """The classes' text embeddings ``t_k`` ``[K, E]``, unit rows: random directions of the whole space (``rank``
    None: ``_thumos_like.class_directions``), or of a random ``rank``-dimensional subspace that every class shares."""
    if rank is None:
        return class_directions(num_classes, input_dim, seed)
    if not 0 < rank <= input_dim:
        raise ValueError(f"text_rank must be in 1..input_dim={input_dim}, got {rank}")
    basis = np.linalg.qr(np.random.default_rng([seed, 0x5E6]).standard_normal((input_dim, rank)))[0]  # [E, r], orthonormal columns
    return class_directions(num_classes, rank, seed) @ basis.T


def prototype_offsets(text: np.ndarray, proto_noise: float, seed: int) -> np.ndarray:
    """The fixed per-class offsets ``o_k`` ``[K, E]``: norm ``proto_noise``, orthogonal to ``text [K, E]``'s unit row ``k``."""
    rng = np.random.default_rng([seed, 0xA1196])
    offsets = rng.standard_normal(text.shape)
    offsets -= (offsets * text).sum(axis=1, keepdims=True) * text  # Gram-Schmidt against t_k: |p_k|^2 = 1 + proto_noise^2 exactly
    return proto_noise * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)


def background_direction(input_dim: int, seed: int) -> np.ndarray:
    """The data set's background direction ``b`` ``[E]``, a unit vector."""
    b = np.random.default_rng([seed, 0xB6]).standard_normal(input_dim)
    return b / np.linalg.norm(b)


def aligned_features(rng, centres, segments, prototypes, background, *, signal, noise, drift, background_level) -> np.ndarray:
    """One video's features ``[T, E]`` float64 from its generator, step centres (s), ``(start, end, label)``
    segments (s), the class prototypes ``[K, E]`` and the background direction ``[E]``."""
    T, E = len(centres), prototypes.shape[1]
    feats = noise * rng.standard_normal((T, E))
    if drift:
        feats += _sine_drift(rng, centres, E, drift)
    action = np.zeros(T, dtype=bool)
    for start, end, label in segments:
        inside = _inside(centres, start, end)
        feats[inside] += signal * prototypes[label]
        action |= inside
    feats[~action] += background_level * background
    return feats


def make_aligned_like(
    out_dir: str | Path,
    *,
    annotations: str | Path = DEFAULT_ANNOTATIONS,
    input_dim: int = 64,
    fps: float | None = 30.0,
    stride: int = 4,
    window: int = 16,
    signal: float = 3.0,
    proto_noise: float = 0.5,
    noise: float = 1.0,
    drift: float = 0.5,
    background: float = 1.0,
    text_rank: int | None = None,
    seed: int = 0,
    max_videos_per_split: int | None = None,
) -> dict[str, Any]:
    """Write the data set to ``out_dir`` and return ``_thumos_like``'s summary plus the text table's path.

    ``input_dim``: ``E``, the width of the shared space (features and text embeddings); ``signal``: the
    scale of a class prototype inside its segments; ``proto_noise``: the norm of each class's fixed
    visual-text offset (0: the prototype is the text embedding); ``noise``: std of the per-step Gaussian
    noise per element; ``drift``: amplitude of the slow background drift; ``background``: norm of the
    background direction on steps outside every segment; ``text_rank``: the text embeddings span a random subspace
    of this dimension (None: the whole space; see the module docstring). ``fps``, ``stride``, ``window``, ``seed`` and
    ``max_videos_per_split`` as ``make_thumos_like``.
    """
    if proto_noise < 0 or background < 0:
        raise ValueError(f"proto_noise and background must be >= 0, got {proto_noise} and {background}")
    out = Path(out_dir)
    # the videos, splits, timing and annotations of the THUMOS14-timed set; its (empty) features are replaced below
    summary = make_thumos_like(out, annotations=annotations, input_dim=input_dim, fps=fps, stride=stride, window=window, signal=0.0,
                               noise=0.0, drift=0.0, seed=seed, max_videos_per_split=max_videos_per_split)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    database = json.loads((out / "annotations.json").read_text())["database"]
    classes = meta["classes"]

    text = text_embeddings(len(classes), input_dim, seed, text_rank)  # t_k
    prototypes = text + prototype_offsets(text, proto_noise, seed)  # p_k = t_k + o_k
    b = background_direction(input_dim, seed)
    for vid in meta["splits"]["train"] + meta["splits"]["test"]:
        video = database[vid]
        n = len(np.load(out / "features" / f"{vid}.npy", mmap_mode="r"))
        centres = step_centres(n, float(video["fps"]), stride, window)
        segments = [(float(a["segment"][0]), float(a["segment"][1]), int(a["label_id"])) for a in video["annotations"]]
        rng = np.random.default_rng([seed, 0xA11, *vid.encode()])  # per video: the same features whatever else is written
        feats = aligned_features(
            rng, centres, segments, prototypes, b, signal=signal, noise=noise, drift=drift, background_level=background
        )
        np.save(out / "features" / f"{vid}.npy", feats.astype(np.float32))

    np.savez(out / TEXT_TABLE, names=np.asarray(classes), embeddings=text.astype(np.float32))
    meta.update(profile="aligned", signal=signal, proto_noise=proto_noise, noise=noise, drift=drift, background=background,
                text_rank=text_rank, text_table=TEXT_TABLE)  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return summary | {"text_table": str(out / TEXT_TABLE)}


def load_text_table(data_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """The data set's class names ``[K]`` and text embeddings ``[K, E]`` float32."""
    with np.load(Path(data_dir) / TEXT_TABLE) as table:
        return [str(n) for n in table["names"]], table["embeddings"].astype(np.float32)


def class_splits(classes: list[str], unseen_fraction: float, n_splits: int = 10, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """``n_splits`` distinct random ``(seen, unseen)`` splits of ``classes`` (each list in the order of ``classes``),
    ``round(K * unseen_fraction)`` unseen classes each, fixed by ``seed`` and the fraction (THUMOS14: 0.25 -> 15 / 5,
    0.5 -> 10 / 10)."""
    K = len(classes)
    n_unseen = round(K * unseen_fraction)
    if not 0 < n_unseen < K:
        raise ValueError(f"unseen_fraction {unseen_fraction} of {K} classes leaves no seen or no unseen class")
    rng = np.random.default_rng([seed, round(unseen_fraction * 1000)])
    drawn: list[frozenset[int]] = []
    for _ in range(100 * n_splits):
        if len(drawn) == n_splits:
            break
        unseen = frozenset(rng.permutation(K)[:n_unseen].tolist())
        if unseen not in drawn:
            drawn.append(unseen)
    if len(drawn) < n_splits:
        raise ValueError(f"could not draw {n_splits} distinct splits of {K} classes with {n_unseen} unseen")
    return [([c for i, c in enumerate(classes) if i not in u], [c for i, c in enumerate(classes) if i in u]) for u in drawn]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    parser.add_argument("--input-dim", type=int, default=64, help="E: the width of the shared space")
    parser.add_argument("--fps", default="30", help="grid frame rate, or 'video' for each video's own fps")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--signal", type=float, default=3.0)
    parser.add_argument("--proto-noise", type=float, default=0.5, help="norm of each class's visual-text offset")
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--drift", type=float, default=0.5)
    parser.add_argument("--background", type=float, default=1.0, help="norm of the background direction outside the segments")
    parser.add_argument("--text-rank", type=int, default=None, help="the text embeddings' subspace dimension (default: all of E)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-videos-per-split", type=int, default=None)
    args = parser.parse_args()
    summary = make_aligned_like(
        args.out_dir,
        annotations=args.annotations,
        input_dim=args.input_dim,
        fps=None if args.fps == "video" else float(args.fps),
        stride=args.stride,
        window=args.window,
        signal=args.signal,
        proto_noise=args.proto_noise,
        noise=args.noise,
        drift=args.drift,
        background=args.background,
        text_rank=args.text_rank,
        seed=args.seed,
        max_videos_per_split=args.max_videos_per_split,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
