"""Per-class Soft-NMS on a THUMOS-sized candidate set: ours vs the sequential reference vs ActionFormer's C++.

Candidates: 2,304 feature steps x 6 pyramid levels (stride 2 per level: 2304 + 1152 + ... + 72 =
4,536 points) x 20 classes, thresholded to about 5,000. Segments are centred near their points
with level-dependent lengths (points near a true action regress its boundaries, with noise);
scores are a sigmoid of noisy logits that rise in and around 15 true actions, for their class and
a confusable one, so candidates cluster and overlap for real. Gaussian Soft-NMS, sigma 0.5, min score 0.001,
at most 200 detections, per class.

ActionFormer's compiled extension is timed when ``/work/refvenv/bin/python`` can import
``nms_1d_cpu``: its own ``batched_nms`` (a Python loop over classes around the C++ ``softnms``)
when its package imports, else the same loop written here around ``nms_1d_cpu.softnms``.

Run: ``.venv/bin/python benchmarks/postprocess.py``; prints one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tal_models.postprocess import NMSConfig, postprocess
from tal_models.structures import Detections, Segments, Unit

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = Path("/work/refvenv/bin/python")
STEPS, LEVELS, CLASSES, TARGET = 2304, 6, 20, 5000
SIGMA, MIN_SCORE, MAX_DETECTIONS = 0.5, 0.001, 200


def thumos_like_candidates(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> segments [N, 2] (feature steps, float32), scores [N] (float32), labels [N] (int64)."""
    g = np.random.default_rng(seed)
    # 15 true actions (THUMOS14 averages ~15 per video), ~30 steps (4 s) long, mostly of one class
    # (most THUMOS14 videos hold one); each class has one confusable class (e.g. diving, cliff diving)
    num_actions = 15
    classes = g.choice(CLASSES, size=4, replace=False)
    action_class = g.choice(classes[:2], size=num_actions, p=[0.8, 0.2])
    confusable = np.where(action_class == classes[0], classes[2], classes[3])
    action_len = np.clip(g.lognormal(np.log(30), 0.7, size=num_actions), 4, 400)
    action_start = g.uniform(0, STEPS - action_len)
    action_end = action_start + action_len

    segs, logits = [], []
    for level in range(LEVELS):
        stride = 2**level
        points = (np.arange(STEPS // stride) + 0.5) * stride  # [T_l] centres, in feature steps
        length = 2.0 ** (level + 1) * np.exp(g.normal(0, 0.35, size=points.shape))  # level-dependent
        left = length * g.uniform(0.3, 0.7, size=points.shape)
        seg = np.stack([points - left, points - left + length], axis=1)  # [T_l, 2]
        logit = g.normal(-7.0, 1.0, size=(points.shape[0], CLASSES))  # [T_l, K] background
        for a in range(num_actions):
            # response fades outside the action and away from the level whose range fits its length
            outside = np.maximum(action_start[a] - points, points - action_end[a]).clip(min=0)
            near = np.exp(-((outside / (0.3 * action_len[a])) ** 2))
            fit = np.exp(-0.5 * ((np.log2(action_len[a]) - (level + 1.5)) / 1.5) ** 2)
            boost = 9.0 * fit * near
            responding = near > 0.05
            logit[:, action_class[a]] += boost + g.normal(0, 1.0, size=points.shape) * responding
            logit[:, confusable[a]] += 0.6 * boost
            # points that respond regress the action's boundaries, worse from far away
            noise = (0.05 + 0.2 * (1 - near[responding, None])) * action_len[a] * g.normal(size=(int(responding.sum()), 2))
            seg[responding] = np.stack([action_start[a], action_end[a]]) + noise
        seg = np.sort(seg, axis=1)  # noisy regression may invert a tiny segment
        segs.append(np.repeat(seg, CLASSES, axis=0))  # [T_l * K, 2], one row per (point, class)
        logits.append(logit.reshape(-1))
    segs, scores = np.concatenate(segs), 1 / (1 + np.exp(-np.concatenate(logits)))
    labels = np.tile(np.arange(CLASSES), segs.shape[0] // CLASSES)
    threshold = np.sort(scores)[-TARGET - 1]  # keep score > threshold: about TARGET candidates
    keep = scores > threshold
    return segs[keep].astype(np.float32), scores[keep].astype(np.float32), labels[keep]


def times_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def load_reference():
    """The sequential reference lives in the test module; import it by path (tests/ is no package)."""
    path = ROOT / "tests" / "tal_models" / "test_postprocess.py"
    spec = importlib.util.spec_from_file_location("_postprocess_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACTIONFORMER_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np, torch
import nms_1d_cpu
torch.set_num_threads(int(sys.argv[2]))
data = np.load(sys.argv[1])
segs, scores, labels = (torch.from_numpy(np.ascontiguousarray(data[k])) for k in ("segs", "scores", "labels"))
sigma, min_score, max_num = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
try:
    from actionformer.utils.nms import batched_nms, HAS_CPP_NMS
    assert HAS_CPP_NMS
    which = "actionformer.utils.nms.batched_nms"
    def run():
        return batched_nms(segs, scores, labels, 0.1, min_score, max_num, use_soft_nms=True, multiclass=True, sigma=sigma)
except Exception:
    which = "nms_1d_cpu.softnms per class"
    def run():
        out_segs, out_scores, out_labels = [], [], []
        for c in torch.unique(labels):
            idx = torch.where(labels == c)[0]
            dets = segs.new_empty((idx.numel(), 3))
            inds = nms_1d_cpu.softnms(segs[idx].contiguous(), scores[idx].contiguous(), dets, 0.1, sigma, min_score, 2)
            n = min(len(inds), max_num)
            out_segs.append(dets[:n, :2]); out_scores.append(dets[:n, 2]); out_labels.append(labels[idx][inds[:n]])
        s, o = torch.cat(out_scores).sort(descending=True)
        o = o[:max_num]
        return torch.cat(out_segs)[o], s[:max_num], torch.cat(out_labels)[o]
for _ in range(3):
    run()
times = []
for _ in range(int(sys.argv[6])):
    t0 = time.perf_counter(); out = run(); times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"ms": statistics.median(times), "which": which,
                  "segs": out[0].tolist(), "scores": out[1].tolist(), "labels": out[2].tolist()}))
"""


def time_actionformer(segs, scores, labels, threads: int, repeats: int) -> dict | None:
    if not REF_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidates.npz"
        np.savez(path, segs=segs, scores=scores, labels=labels)
        args = [str(path), str(threads), str(SIGMA), str(MIN_SCORE), str(MAX_DETECTIONS), str(repeats)]
        proc = subprocess.run([str(REF_PYTHON), "-c", ACTIONFORMER_SCRIPT, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"ActionFormer extension not usable: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    segs, scores, labels = thumos_like_candidates()
    dets = Detections("bench", Segments(torch.from_numpy(segs), Unit.STEPS), torch.from_numpy(scores), torch.from_numpy(labels))
    config = NMSConfig(method="soft_gaussian", sigma=SIGMA, min_score=MIN_SCORE, max_detections=MAX_DETECTIONS)

    our_times = times_ms(lambda: postprocess(dets, config), repeats=50, warmup=5)
    ours = postprocess(dets, config)

    reference = load_reference()
    ref_args = ([tuple(map(float, s)) for s in segs], [float(s) for s in scores], [int(x) for x in labels])
    reference_ms = statistics.median(times_ms(lambda: reference.ref_postprocess(*ref_args, config), repeats=3, warmup=0))
    expected = reference.ref_postprocess(*ref_args, config)
    agrees = (
        len(expected) == len(ours)
        and ours.labels.tolist() == [e[3] for e in expected]
        and np.allclose(ours.scores.numpy(), [e[2] for e in expected], atol=1e-5, rtol=0)
        and np.allclose(ours.segments.data.numpy(), [e[:2] for e in expected], atol=1e-5, rtol=0)
    )

    af = time_actionformer(segs, scores, labels, threads, repeats=30)
    af_overlap = None
    if af is not None:  # how many of its detections (segment, label) we keep too
        ours_set = {(round(s, 3), round(e, 3), lab) for (s, e), lab in zip(ours.segments.data.tolist(), ours.labels.tolist())}
        theirs = [(round(s, 3), round(e, 3), lab) for (s, e), lab in zip(af["segs"], af["labels"])]
        af_overlap = round(sum(t in ours_set for t in theirs) / max(len(theirs), 1), 3)

    counts = np.bincount(labels, minlength=CLASSES)
    print(json.dumps({
        "benchmark": "soft_nms_gaussian_per_class",
        "candidates": len(scores),
        "classes": CLASSES,
        "largest_class": int(counts.max()),
        "kept": len(ours),
        "our_ms": round(statistics.median(our_times), 2),
        "our_ms_min": round(min(our_times), 2),
        "reference_ms": round(reference_ms, 1),
        "ratio": round(reference_ms / statistics.median(our_times), 1),
        "actionformer_ext_ms": None if af is None else round(af["ms"], 2),
        "actionformer_path": None if af is None else af["which"],
        "agrees_with_reference": bool(agrees),
        "actionformer_kept_also_ours": af_overlap,
        "torch_threads": threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "device": "cpu",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
