"""Post-processing against a sequential textbook reference, plus hand-computed cases.

The reference below is deliberately plain: Python floats (float64), one class at a time, one
candidate at a time, Bodla et al. 2017 Algorithm 1 with the conventions ``postprocess.py``
documents (``>=`` thresholds, drop below ``min_score``, lowest index first on ties).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tal_models.postprocess as pp
from tal_models.postprocess import NMSConfig, fuse_video_classifier, hard_nms, postprocess, score_voting, soft_nms
from tal_models.structures import Detections, Segments, Unit


# --- the sequential reference ----------------------------------------------------------------
def ref_tiou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    if union <= 0:  # two empty segments
        return 1.0 if (a[0], a[1]) == (b[0], b[1]) else 0.0
    return inter / union


def ref_nms_one_class(segs, scores, members, method, iou_threshold, sigma, min_score):
    """Greedy (Soft-)NMS over the candidates ``members`` of one class -> [(index, score)] in selection order."""
    current = {i: scores[i] for i in members if scores[i] >= min_score and scores[i] > 0}
    kept = []
    while current:
        best = max(current, key=lambda i: (current[i], -i))  # highest score, then lowest index
        kept.append((best, current.pop(best)))
        for i in list(current):
            iou = ref_tiou(segs[best], segs[i])
            if method == "hard":
                if iou >= iou_threshold:
                    current[i] = 0.0
            elif method == "linear":
                if iou >= iou_threshold:
                    current[i] *= 1.0 - iou
            else:
                current[i] *= math.exp(-iou * iou / sigma)
            if current[i] < min_score or current[i] == 0:
                del current[i]
    return kept


def ref_nms(segs, scores, labels, method, iou_threshold=0.5, sigma=0.5, min_score=0.001, max_detections=None):
    """All classes one after the other (``labels`` None: one class) -> (indices, scores), best first."""
    n = len(scores)
    classes = [0] * n if labels is None else list(labels)
    kept = []
    for c in sorted(set(classes)):
        members = [i for i in range(n) if classes[i] == c]
        kept += ref_nms_one_class(segs, scores, members, method, iou_threshold, sigma, min_score)
    kept.sort(key=lambda t: (-t[1], t[0]))
    kept = kept[:max_detections] if max_detections is not None else kept
    return [i for i, _ in kept], [s for _, s in kept]


def ref_voting(kept_segs, kept_labels, segs, scores, labels, threshold, class_agnostic):
    out = []
    for ks, kl in zip(kept_segs, kept_labels):
        total, start, end = 0.0, 0.0, 0.0
        for s, sc, lab in zip(segs, scores, labels):
            iou = ref_tiou(ks, s)
            if iou >= threshold and (class_agnostic or lab == kl):
                total += sc * iou
                start += sc * iou * s[0]
                end += sc * iou * s[1]
        out.append((start / total, end / total) if total > 0 else tuple(ks))
    return out


def ref_postprocess(segs, scores, labels, cfg: NMSConfig):
    """The whole chain -> list of (start, end, score, label), best first."""
    idx = [i for i in range(len(scores)) if scores[i] > cfg.pre_nms_threshold]
    if cfg.pre_nms_topk is not None:
        idx = sorted(idx, key=lambda i: (-scores[i], i))[: cfg.pre_nms_topk]
    segs, scores, labels = [segs[i] for i in idx], [scores[i] for i in idx], [labels[i] for i in idx]
    if cfg.method == "none":
        keep = sorted((i for i in range(len(scores)) if scores[i] >= cfg.min_score), key=lambda i: (-scores[i], i))
        keep = keep[: cfg.max_detections]
        kept_scores = [scores[i] for i in keep]
    else:
        method = {"hard": "hard", "soft_linear": "linear", "soft_gaussian": "gaussian"}[cfg.method]
        keep, kept_scores = ref_nms(
            segs, scores, None if cfg.class_agnostic else labels, method,
            cfg.iou_threshold, cfg.sigma, cfg.min_score, cfg.max_detections,
        )  # fmt: skip
    kept_segs = [segs[i] for i in keep]
    kept_labels = [labels[i] for i in keep]
    if cfg.voting_threshold is not None:
        kept_segs = ref_voting(kept_segs, kept_labels, segs, scores, labels, cfg.voting_threshold, cfg.class_agnostic)
    return [(s[0], s[1], sc, lab) for s, sc, lab in zip(kept_segs, kept_scores, kept_labels)]


# --- random candidate sets -------------------------------------------------------------------
def random_candidates(seed: int, n: int = 200, num_classes: int = 4):
    """Float32 candidates clustered around a few actions (real overlap), continuous scores (no ties)."""
    g = np.random.default_rng(seed)
    anchors = g.uniform(0, 100, size=6)
    centers = g.choice(anchors, size=n) + g.normal(0, 3, size=n)
    lengths = g.lognormal(np.log(8), 0.6, size=n)
    segs = np.stack([centers - lengths / 2, centers + lengths / 2], axis=1).astype(np.float32)
    scores = g.uniform(0.005, 1.0, size=n).astype(np.float32)
    labels = g.integers(0, num_classes, size=n)
    return segs, scores, labels


def as_lists(segs, scores, labels):
    return [tuple(map(float, s)) for s in segs], [float(s) for s in scores], [int(x) for x in labels]


SEEDS = [0, 1, 2, 3]
NMS_CASES = [
    ("hard", dict(iou_threshold=0.5, min_score=0.0)),
    ("hard", dict(iou_threshold=0.3, min_score=0.2)),
    ("linear", dict(iou_threshold=0.5, min_score=0.001)),
    ("linear", dict(iou_threshold=0.2, min_score=0.05)),
    ("gaussian", dict(sigma=0.5, min_score=0.001)),
    ("gaussian", dict(sigma=0.2, min_score=0.05)),
]


def run_module_nms(method, segs, scores, labels, **kw):
    if method == "hard":
        return hard_nms(segs, scores, labels, **kw)
    return soft_nms(segs, scores, labels, method=method, **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("method,params", NMS_CASES)
@pytest.mark.parametrize("max_detections", [None, 25])
def test_nms_matches_sequential_reference(seed, class_agnostic, method, params, max_detections):
    segs, scores, labels = random_candidates(seed)
    keep, kept_scores = run_module_nms(
        method, torch.from_numpy(segs), torch.from_numpy(scores),
        None if class_agnostic else torch.from_numpy(labels), max_detections=max_detections, **params,
    )  # fmt: skip
    ref_segs, ref_scores, ref_labels = as_lists(segs, scores, labels)
    ref_keep, ref_kept_scores = ref_nms(
        ref_segs, ref_scores, None if class_agnostic else ref_labels, method, max_detections=max_detections, **params
    )
    assert keep.dtype == torch.long and keep.shape == kept_scores.shape == (len(ref_keep),)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(kept_scores.numpy(), ref_kept_scores, atol=1e-5, rtol=0)
    assert len(ref_keep) > 1  # the cases are not trivial


@pytest.mark.parametrize("seed", [20, 21])
@pytest.mark.parametrize("method,params", NMS_CASES[::2])
@pytest.mark.parametrize("max_detections", [None, 15])
def test_imbalanced_classes_in_several_tables_match_the_reference(monkeypatch, seed, method, params, max_detections):
    """A few big classes and many small ones: with no padding allowance they need several tables."""
    monkeypatch.setattr(pp, "_PADDING_ALLOWANCE", 0)
    segs, scores, _ = random_candidates(seed, n=240)
    labels = np.random.default_rng(seed).choice(8, size=240, p=[0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01])
    sizes = sorted(np.bincount(labels).tolist(), reverse=True)
    assert len(pp._table_bounds(sizes)) >= 2
    keep, kept_scores = run_module_nms(
        method, torch.from_numpy(segs), torch.from_numpy(scores), torch.from_numpy(labels), max_detections=max_detections, **params
    )
    ref_keep, ref_scores = ref_nms(*as_lists(segs, scores, labels), method, max_detections=max_detections, **params)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(kept_scores.numpy(), ref_scores, atol=1e-5, rtol=0)


def test_table_bounds():
    assert pp._table_bounds([5]) == [(0, 1)]
    assert pp._table_bounds([600, 590, 580]) == [(0, 3)]
    assert pp._table_bounds([100, 10, 10]) == [(0, 3)]  # padding 180 cells: within the allowance
    # 3 x 3000 cells for 6000 candidates: padding 3000, half the real ones, still fine; not with a fourth row
    assert pp._table_bounds([3000, 2900, 100, 90, 5]) == [(0, 3), (3, 5)]
    assert pp._table_bounds([4000] + [50] * 19) == [(0, 1), (1, 20)]


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_lagged_stop_tests_give_the_same_result(monkeypatch, class_agnostic):
    """On CUDA the stop test runs only every few steps; the extra steps must not change the result."""
    segs, scores, labels = (torch.from_numpy(x) for x in random_candidates(7, n=300))
    labels = None if class_agnostic else labels
    expected = soft_nms(segs, scores, labels, max_detections=40, min_score=0.05)
    monkeypatch.setattr(pp, "_steps_between_stop_tests", lambda device: (8, 8))
    got = soft_nms(segs, scores, labels, max_detections=40, min_score=0.05)
    assert got[0].tolist() == expected[0].tolist()
    torch.testing.assert_close(got[1], expected[1])


CHAIN_CONFIGS = [
    NMSConfig(),
    NMSConfig(method="soft_gaussian", class_agnostic=True, voting_threshold=0.7, max_detections=30),
    NMSConfig(method="soft_linear", iou_threshold=0.4, pre_nms_threshold=0.3, pre_nms_topk=120, voting_threshold=0.75),
    NMSConfig(method="hard", iou_threshold=0.5, pre_nms_topk=80, max_detections=20, voting_threshold=0.6),
    NMSConfig(method="hard", class_agnostic=True, min_score=0.1, voting_threshold=0.9),
    NMSConfig(method="none", pre_nms_threshold=0.5, max_detections=50, voting_threshold=0.8),
]


@pytest.mark.parametrize("seed", [10, 11, 12])
@pytest.mark.parametrize("cfg", CHAIN_CONFIGS, ids=lambda c: f"{c.method}-{'agn' if c.class_agnostic else 'cls'}-{c.voting_threshold}")
def test_postprocess_matches_reference_chain(seed, cfg):
    segs, scores, labels = random_candidates(seed, n=250, num_classes=3)
    dets = Detections("v", Segments(torch.from_numpy(segs), Unit.SECONDS), torch.from_numpy(scores), torch.from_numpy(labels))
    out = postprocess(dets, cfg)
    ref = ref_postprocess(*as_lists(segs, scores, labels), cfg)
    assert isinstance(out.scores, torch.Tensor) and out.segments.unit == Unit.SECONDS
    assert len(out) == len(ref) > 0
    assert out.labels.tolist() == [r[3] for r in ref]
    np.testing.assert_allclose(out.scores.numpy(), [r[2] for r in ref], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.segments.data.numpy(), [r[:2] for r in ref], atol=1e-5, rtol=1e-6)
    assert bool((out.scores[:-1] >= out.scores[1:]).all())


# --- hand-computed cases ---------------------------------------------------------------------
PAIR = torch.tensor([[0.0, 10.0], [5.0, 15.0]])  # tIoU 5 / 15 = 1/3
PAIR_SCORES = torch.tensor([0.9, 0.8])


def test_hard_nms_suppresses_at_or_above_threshold_only():
    keep, scores = hard_nms(PAIR, PAIR_SCORES, torch.tensor([3, 3]), iou_threshold=0.3)
    assert keep.tolist() == [0] and scores.tolist() == pytest.approx([0.9])
    keep, _ = hard_nms(PAIR, PAIR_SCORES, torch.tensor([3, 3]), iou_threshold=0.34)
    assert keep.tolist() == [0, 1]
    keep, _ = hard_nms(torch.tensor([[0.0, 10.0], [0.0, 10.0]]), PAIR_SCORES, iou_threshold=1.0)  # tIoU 1 >= 1
    assert keep.tolist() == [0]


def test_soft_nms_decays_by_the_exact_amount():
    labels = torch.tensor([1, 1])
    keep, scores = soft_nms(PAIR, PAIR_SCORES, labels, method="linear", iou_threshold=0.3)
    assert keep.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.8 * (1 - 1 / 3)], abs=1e-6)
    _, scores = soft_nms(PAIR, PAIR_SCORES, labels, method="linear", iou_threshold=0.34)
    assert scores.tolist() == pytest.approx([0.9, 0.8], abs=1e-6)  # below the threshold: untouched
    _, scores = soft_nms(PAIR, PAIR_SCORES, labels, method="gaussian", sigma=0.5)
    assert scores.tolist() == pytest.approx([0.9, 0.8 * math.exp(-(1 / 9) / 0.5)], abs=1e-6)


@pytest.mark.parametrize("method,expected_keep,expected_scores", [("hard", [0], [0.9]), ("linear", [0, 1], [0.9, 0.2])])
def test_tiou_equal_to_the_threshold_counts_as_overlap(method, expected_keep, expected_scores):
    segs = torch.tensor([[0.0, 4.0], [1.0, 4.0]])  # tIoU 3 / 4, exact in binary
    keep, scores = run_module_nms(method, segs, PAIR_SCORES, None, iou_threshold=0.75)
    assert keep.tolist() == expected_keep
    assert scores.tolist() == pytest.approx(expected_scores, abs=1e-6)  # linear: 0.8 * (1 - 0.75)


def test_soft_nms_reorders_after_decay_and_drops_below_min_score():
    segs = torch.tensor([[0.0, 10.0], [1.0, 10.0], [20.0, 30.0]])  # 0 and 1: tIoU 0.9
    keep, scores = soft_nms(segs, torch.tensor([0.9, 0.8, 0.5]), method="gaussian", sigma=0.5)
    assert keep.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.8 * math.exp(-0.81 / 0.5)], abs=1e-6)
    keep, _ = soft_nms(segs, torch.tensor([0.9, 0.8, 0.5]), method="gaussian", sigma=0.5, min_score=0.2)
    assert keep.tolist() == [0, 2]  # 0.8 * 0.198 = 0.158 < 0.2


@pytest.mark.parametrize("method", ["hard", "linear", "gaussian"])
def test_other_classes_are_untouched(method):
    keep, scores = run_module_nms(method, PAIR, PAIR_SCORES, torch.tensor([0, 1]), iou_threshold=0.3)
    assert keep.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.8])


def test_equal_scores_go_to_the_lowest_index():
    segs = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    keep, scores = soft_nms(segs, torch.tensor([0.5, 0.7, 0.7]), method="gaussian")
    assert keep.tolist() == [1, 2, 0]
    assert scores.tolist() == pytest.approx([0.7, 0.7 * math.exp(-2), 0.5 * math.exp(-4)], abs=1e-6)


def test_equal_scores_across_classes_go_to_the_lowest_index():
    segs = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 6.0]])
    keep, _ = soft_nms(segs, torch.tensor([0.7, 0.7, 0.7]), torch.tensor([1, 0, 2]))
    assert keep.tolist() == [0, 1, 2]


@pytest.mark.parametrize("refresh", [(1, 1), None])
def test_a_pick_tying_with_the_last_place_still_competes(monkeypatch, refresh):
    """The top-k stop test must not stop on a tie: a later pick with a lower index wins it."""
    if refresh is not None:
        monkeypatch.setattr(pp, "_steps_between_stop_tests", lambda device: refresh)
    segs = torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])  # no overlap
    scores = torch.tensor([0.5, 0.9, 0.1, 0.5])
    keep, scores = soft_nms(segs, scores, torch.tensor([0, 0, 1, 1]), max_detections=2)
    assert keep.tolist() == [1, 0] and scores.tolist() == pytest.approx([0.9, 0.5])


@pytest.mark.parametrize("method", ["hard", "linear", "gaussian"])
def test_empty_and_single_candidate(method):
    keep, scores = run_module_nms(method, torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.shape == scores.shape == (0,) and keep.dtype == torch.long
    keep, scores = run_module_nms(method, torch.tensor([[2.0, 3.0]]), torch.tensor([0.4]), None)
    assert keep.tolist() == [0] and scores.tolist() == pytest.approx([0.4])
    empty = Detections("v", Segments(torch.zeros(0, 2)), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert len(postprocess(empty, NMSConfig(voting_threshold=0.5))) == 0


@pytest.mark.parametrize("method", ["hard", "linear", "gaussian"])
def test_zero_length_candidates_give_no_nan(method):
    segs = torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.0, 10.0], [7.0, 7.0]])
    keep, scores = run_module_nms(method, segs, torch.tensor([0.9, 0.8, 0.7, 0.6]), None, iou_threshold=0.5)
    assert not torch.isnan(scores).any()
    # [5, 5] twice: tIoU 1; a point against [0, 10] or another point: tIoU 0
    expected = {"hard": ([0, 2, 3], [0.9, 0.7, 0.6]), "linear": ([0, 2, 3], [0.9, 0.7, 0.6])}
    expected["gaussian"] = ([0, 2, 3, 1], [0.9, 0.7, 0.6, 0.8 * math.exp(-2)])
    assert keep.tolist() == expected[method][0]
    assert scores.tolist() == pytest.approx(expected[method][1], abs=1e-6)
    dets = Detections("v", Segments(segs), torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.zeros(4, dtype=torch.long))
    out = postprocess(dets, NMSConfig(voting_threshold=0.5))
    assert not torch.isnan(out.segments.data).any() and not torch.isnan(out.scores).any()


def test_score_voting_hand_computed():
    cands = Detections(
        "v", Segments(torch.tensor([[0.0, 10.0], [2.0, 12.0], [1.0, 11.0], [40.0, 50.0]], dtype=torch.float64)),
        torch.tensor([0.9, 0.6, 0.5, 0.8], dtype=torch.float64), torch.tensor([0, 0, 1, 0]),
    )  # fmt: skip
    kept = cands[torch.tensor([0, 3])]
    voted = score_voting(kept, cands, 0.5)
    # [0, 10] votes with itself (0.9 * 1) and [2, 12] (0.6 * 8/12 = 0.4); [1, 11] is another class
    assert voted.segments.data[0].tolist() == pytest.approx([0.8 / 1.3, 13.8 / 1.3])
    assert voted.segments.data[1].tolist() == [40.0, 50.0]
    assert voted.scores.tolist() == kept.scores.tolist() and voted.labels.tolist() == [0, 0]
    agnostic = score_voting(kept, cands, 0.5, class_agnostic=True)
    w = [0.9, 0.4, 0.5 * 9 / 11]
    assert agnostic.segments.data[0].tolist() == pytest.approx(
        [(2 * w[1] + 1 * w[2]) / sum(w), (10 * w[0] + 12 * w[1] + 11 * w[2]) / sum(w)]
    )


def test_fusion_hand_computed():
    dets = Detections("v", Segments(torch.tensor([[0.0, 4.0], [6.0, 9.0]])), torch.tensor([0.5, 0.8]), torch.tensor([0, 0]))
    fused = fuse_video_classifier(dets, torch.tensor([0.1, 0.6, 0.3, 0.05]), top_k=2)
    # 0.8 * 0.6, 0.5 * 0.6, 0.8 * 0.3, 0.5 * 0.3
    assert fused.scores.tolist() == pytest.approx([0.48, 0.30, 0.24, 0.15])
    assert fused.labels.tolist() == [1, 1, 2, 2]
    assert fused.segments.data.tolist() == [[6.0, 9.0], [0.0, 4.0], [6.0, 9.0], [0.0, 4.0]]
    assert len(fuse_video_classifier(dets, torch.tensor([0.7]), top_k=3)) == 2  # top_k capped at C
    with pytest.raises(ValueError, match="top_k"):
        fuse_video_classifier(dets, torch.tensor([0.7]), top_k=0)


def test_pre_nms_threshold_is_strict_and_topk_keeps_the_best():
    dets = Detections(
        "v", Segments(torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])),
        torch.tensor([0.3, 0.9, 0.5, 0.7]), torch.tensor([0, 1, 2, 3]),
    )  # fmt: skip
    out = postprocess(dets, NMSConfig(pre_nms_threshold=0.3))
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    out = postprocess(dets, NMSConfig(pre_nms_topk=2))
    assert out.labels.tolist() == [1, 3]
    out = postprocess(dets, NMSConfig(max_detections=1))
    assert out.labels.tolist() == [1]


def test_numpy_detections_come_back_as_numpy():
    segs, scores, labels = random_candidates(3, n=60)
    dets = Detections("v", Segments(segs.astype(np.float64), Unit.STEPS), scores.astype(np.float64), labels)
    out = postprocess(dets, NMSConfig())
    expected = postprocess(_torch64(dets), NMSConfig())
    assert isinstance(out.scores, np.ndarray) and out.segments.unit == Unit.STEPS
    np.testing.assert_allclose(out.scores, expected.scores.numpy())


def _torch64(dets: Detections) -> Detections:
    return Detections(
        dets.video_id, Segments(torch.from_numpy(dets.segments.data), dets.segments.unit),
        torch.from_numpy(dets.scores), torch.from_numpy(dets.labels),
    )  # fmt: skip


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        soft_nms(PAIR, torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        hard_nms(PAIR, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="'linear' or 'gaussian'"):
        soft_nms(PAIR, PAIR_SCORES, method="hard")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="soft"), "method must be one of"),
        (dict(iou_threshold=0.0), "iou_threshold must be in"),
        (dict(iou_threshold=1.5), "iou_threshold must be in"),
        (dict(sigma=0.0), "sigma must be a positive"),
        (dict(min_score=-0.1), "min_score must be >= 0"),
        (dict(max_detections=0), "max_detections must be a positive int"),
        (dict(max_detections=2.5), "max_detections must be a positive int"),
        (dict(pre_nms_topk=0), "pre_nms_topk must be a positive int or None"),
        (dict(pre_nms_threshold=-1.0), "pre_nms_threshold must be >= 0"),
        (dict(voting_threshold=0.0), "voting_threshold must be in"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NMSConfig(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_cuda_matches_cpu(class_agnostic):
    segs, scores, labels = random_candidates(5, n=400, num_classes=6)
    dets = Detections("v", Segments(torch.from_numpy(segs)), torch.from_numpy(scores), torch.from_numpy(labels))
    cfg = NMSConfig(class_agnostic=class_agnostic, voting_threshold=0.7, max_detections=60)
    cpu = postprocess(dets, cfg)
    gpu = postprocess(dets.to_torch("cuda"), cfg)
    assert gpu.scores.device.type == "cuda"
    assert gpu.labels.cpu().tolist() == cpu.labels.tolist()
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.segments.data.cpu(), cpu.segments.data, atol=1e-4, rtol=1e-6)
