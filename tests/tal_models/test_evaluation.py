"""The evaluator against published numbers, hand-computed cases, and a sequential re-statement
of the ActivityNet algorithm written here (one prediction at a time, one threshold at a time)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tal_models.evaluation import (
    ACTIVITYNET_TIOU,
    evaluate_detection,
    evaluate_proposals,
    interpolated_ap,
    parse_tiou,
)
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, VideoAnnotation

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


# --- a sequential statement of the reference algorithm -----------------------------------------


def _seq_tiou(p, g):
    inter = max(0.0, min(p[1], g[1]) - max(p[0], g[0]))
    union = max(0.0, g[1] - g[0]) + max(0.0, p[1] - p[0]) - inter
    if union <= 0:
        return 1.0 if (p[0] == g[0] and p[1] == g[1]) else 0.0
    return inter / union


def _seq_interpolated_ap(prec, rec):
    mprec = [0.0] + list(prec) + [0.0]
    mrec = [0.0] + list(rec) + [1.0]
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def sequential_ap(gt_rows, pred_rows, thresholds):
    """gt_rows: [(video, start, end)], pred_rows: [(video, start, end, score)] of ONE class."""
    ap = np.zeros(len(thresholds))
    if not pred_rows:
        return ap
    scores = np.array([p[3] for p in pred_rows])
    order = scores.argsort()[::-1]  # the reference's ordering, ties included
    preds = [pred_rows[i] for i in order]
    gt_by_video = {}
    for j, (v, s, e) in enumerate(gt_rows):
        gt_by_video.setdefault(v, []).append((j, s, e))
    for ti, thr in enumerate(thresholds):
        locked = set()
        tp, fp = [], []
        for v, s, e, _ in preds:
            cands = gt_by_video.get(v, [])
            values = np.array([_seq_tiou((s, e), (gs, ge)) for _, gs, ge in cands])
            hit = False
            for k in values.argsort()[::-1] if len(values) else []:
                if values[k] < thr:
                    break
                if cands[k][0] in locked:
                    continue
                locked.add(cands[k][0])
                hit = True
                break
            tp.append(1.0 if hit else 0.0)
            fp.append(0.0 if hit else 1.0)
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        ap[ti] = _seq_interpolated_ap(tp_c / (tp_c + fp_c), tp_c / len(gt_rows))
    return ap


def random_dataset(seed, n_videos=12, n_classes=4, quantize=True):
    """Ground truth and predictions with many ties: quantised scores, duplicated ground truth,
    zero-length instances, videos without ground truth, classes without predictions."""
    rng = np.random.default_rng(seed)
    videos, preds = {}, {}
    for v in range(n_videos):
        vid = f"vid{v:02d}"
        n = int(rng.integers(0, 9))
        starts = rng.uniform(0, 80, n).round(1)
        segs = np.stack([starts, starts + rng.uniform(0, 15, n).round(1)], axis=1).reshape(-1, 2)
        labels = rng.integers(0, n_classes, n)
        if n >= 2:  # a duplicated instance and a zero-length one
            segs[1] = segs[0]
            labels[1] = labels[0]
            segs[-1, 1] = segs[-1, 0]
        videos[vid] = VideoAnnotation(vid, Segments(segs), labels, duration=100.0, subset="val")
        m = int(rng.integers(0, 25))
        base = segs[rng.integers(0, n, m)] if n else rng.uniform(0, 80, (m, 2))
        jitter = rng.normal(0, 2.0, (m, 2)).round(1)
        p = np.sort(base + jitter, axis=1)
        scores = rng.integers(1, 6, m) / 5 if quantize else rng.uniform(0, 1, m)
        plabels = np.where(rng.uniform(size=m) < 0.8, labels[rng.integers(0, n, m)] if n else 0, rng.integers(0, n_classes, m))
        preds[vid] = Detections(vid, Segments(p), scores, plabels)
    preds["ghost"] = Detections("ghost", Segments([[1.0, 2.0]]), [0.99], [0])  # a video not in the ground truth
    names = {f"c{c}": c for c in range(n_classes)}
    return AnnotationSet(videos, LabelMap(names)), preds


def sequential_map(gt, preds, thresholds):
    classes = sorted({int(c) for v in gt for c in v.labels})
    aps = []
    for c in classes:
        gt_rows = [(v.video_id, s, e) for v in gt for (s, e), lab in zip(v.segments, v.labels) if lab == c]
        pred_rows = [
            (vid, s, e, sc)
            for vid, d in preds.items()
            for (s, e), sc, lab in zip(d.segments, d.scores, d.labels)
            if lab == c
        ]
        aps.append(sequential_ap(gt_rows, pred_rows, thresholds))
    return np.array(aps).T  # [T, K]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("quantize", [True, False])
def test_agrees_with_sequential_reference_including_ties(seed, quantize):
    gt, preds = random_dataset(seed, quantize=quantize)
    thresholds = parse_tiou("0.1:0.9:0.1")
    metrics = evaluate_detection(gt, preds, thresholds)
    expected = sequential_map(gt, preds, thresholds)
    np.testing.assert_allclose(metrics.ap, expected, rtol=0, atol=1e-12)
    assert metrics.unknown_videos == ["ghost"]


# --- published numbers ---------------------------------------------------------------------------


def _case(name):
    from pipelines.annotations import read_activitynet_results, read_annotations

    gt = read_annotations(DATA / "eval_cases" / name / "ground_truth.json")
    preds = read_activitynet_results(DATA / "eval_cases" / name / "predictions.json", gt.label_map)
    expected = json.loads((DATA / "eval_cases" / name / "expected.json").read_text())
    return gt, preds.detections, expected


@needs_data
def test_mmaction2_two_videos_exact():
    gt, preds, expected = _case("mmaction2_two_videos")
    m = evaluate_detection(gt, preds, expected["tiou"])
    np.testing.assert_allclose(m.mAP, expected["mAP"], rtol=0, atol=1e-8)
    assert abs(m.average_mAP - expected["average_mAP"]) < 1e-8
    assert m.unknown_videos == []  # ground truth says v_..., predictions do not


@needs_data
@pytest.mark.parametrize("name", ["autoloc_thumos14_test", "autoloc_activitynet12_val"])
def test_autoloc_published_tables(name):
    gt, preds, expected = _case(name)
    m = evaluate_detection(gt, preds, expected["tiou"])
    np.testing.assert_array_equal(np.round(m.mAP, 3), expected["mAP"])
    assert round(m.average_mAP, 3) == expected["average_mAP"]


@needs_data
def test_activitynet_sample_submission_is_perfect():
    from pipelines.annotations import read_activitynet, read_activitynet_results

    gt = read_activitynet(DATA / "activitynet13" / "validation_ground_truth.json")
    preds = read_activitynet_results(DATA / "activitynet13" / "sample_detection_prediction.json", gt.label_map)
    m = evaluate_detection(gt, preds.detections, ACTIVITYNET_TIOU)
    assert not np.isnan(m.ap).any()
    np.testing.assert_array_equal(m.mAP, np.ones(10))
    assert m.num_ground_truth == 7654 and m.num_predictions == 7654
    for k in (1, 5):
        np.testing.assert_array_equal(m.recall_at_k[k], np.ones(10))


# --- hand-computed cases -------------------------------------------------------------------------


def _one_class(gt_segs, pred_segs, scores, video="a", labels=None):
    gt = AnnotationSet({video: VideoAnnotation(video, Segments(gt_segs), [0] * len(gt_segs), subset="test")}, LabelMap({"x": 0}))
    preds = {video: Detections(video, Segments(pred_segs), scores, labels if labels is not None else [0] * len(scores))}
    return gt, preds


def test_hand_computed_ap():
    # Two instances; predictions by score: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    gt, preds = _one_class([[0, 10], [20, 30]], [[0, 10], [50, 60], [21, 30]], [0.9, 0.8, 0.7])
    m = evaluate_detection(gt, preds, [0.5])
    assert m.ap[0, 0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # A duplicate of a matched prediction is a false positive: the instance is locked.
    gt, preds = _one_class([[0, 10]], [[0, 10], [0, 10]], [0.9, 0.8])
    assert evaluate_detection(gt, preds, [0.5]).ap[0, 0] == pytest.approx(1.0)
    gt, preds = _one_class([[0, 10]], [[0, 10], [0, 10]], [0.8, 0.9])
    assert evaluate_detection(gt, preds, [0.5]).ap[0, 0] == pytest.approx(1.0)


def test_threshold_is_inclusive_and_per_threshold_locking():
    # tIoU exactly 0.5 counts at 0.5 (>=), not at 0.6.
    gt, preds = _one_class([[0, 10]], [[0, 5]], [0.9])
    m = evaluate_detection(gt, preds, [0.5, 0.6])
    assert m.ap[:, 0].tolist() == [1.0, 0.0]


def test_zero_length_instances_match_only_themselves():
    gt, preds = _one_class([[5, 5], [10, 20]], [[5, 5], [6, 6], [10, 20]], [0.9, 0.8, 0.7])
    m = evaluate_detection(gt, preds, [0.5, 0.95])
    assert not np.isnan(m.ap).any()
    # hit, miss, hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    np.testing.assert_allclose(m.ap[:, 0], [0.5 + 0.5 * 2 / 3] * 2)


def test_unknown_videos_are_false_positives_other_subsets_ignored():
    gt = AnnotationSet(
        {
            "a": VideoAnnotation("a", Segments([[0, 10]]), [0], subset="test"),
            "b": VideoAnnotation("b", Segments([[0, 10]]), [0], subset="validation"),
        },
        LabelMap({"x": 0}),
    )
    preds = {
        "ghost": Detections("ghost", Segments([[0, 10]]), [0.95], [0]),  # FP before the hit
        "a": Detections("a", Segments([[0, 10]]), [0.9], [0]),
        "b": Detections("b", Segments([[0, 10]]), [0.99], [0]),  # other subset: ignored
    }
    m = evaluate_detection(gt, preds, [0.5], subset="test")
    assert m.ap[0, 0] == pytest.approx(0.5)  # precision 1/2 at recall 1
    assert m.unknown_videos == ["ghost"] and m.num_ignored_predictions == 1 and m.num_predictions == 2


def test_predictions_of_classes_without_ground_truth_are_ignored_and_absent_classes_score_zero():
    gt = AnnotationSet(
        {"a": VideoAnnotation("a", Segments([[0, 10], [20, 30]]), [0, 1])},
        LabelMap({"x": 0, "y": 1, "z": 2}),
    )
    preds = {"a": Detections("a", Segments([[0, 10], [20, 30]]), [0.9, 0.8], [0, 2])}
    m = evaluate_detection(gt, preds, [0.5])
    assert m.class_names == ["x", "y"]
    assert m.ap[0].tolist() == [1.0, 0.0] and m.mAP[0] == 0.5
    assert m.num_ignored_predictions == 1


def test_ambiguous_false_positives_are_dropped_only_when_asked():
    video = VideoAnnotation("a", Segments([[0, 10]]), [0], ambiguous=Segments([[40, 50]]))
    gt = AnnotationSet({"a": video}, LabelMap({"x": 0}))
    preds = {"a": Detections("a", Segments([[45, 48], [0, 10]]), [0.9, 0.8], [0, 0])}
    assert evaluate_detection(gt, preds, [0.5]).ap[0, 0] == pytest.approx(0.5)
    assert evaluate_detection(gt, preds, [0.5], ignore_ambiguous=True).ap[0, 0] == pytest.approx(1.0)


def test_recall_at_k_counts_top_k_times_instances():
    # 2 instances; top-1x = 2 best predictions: one hits, one misses -> 1/2; top-2x -> both.
    gt, preds = _one_class([[0, 10], [20, 30]], [[0, 10], [50, 60], [20, 30]], [0.9, 0.8, 0.7])
    m = evaluate_detection(gt, preds, [0.5], top_k=(1, 2))
    assert m.recall_at_k[1][0] == pytest.approx(0.5)
    assert m.recall_at_k[2][0] == pytest.approx(1.0)


def test_interpolated_ap_hand_computed_and_empty():
    prec = np.array([[1.0, 0.5, 2 / 3]])
    rec = np.array([[0.5, 0.5, 1.0]])
    assert interpolated_ap(prec, rec)[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    gt, _ = _one_class([[0, 10]], [[0, 1]], [0.1])
    m = evaluate_detection(gt, {}, [0.5])
    assert m.ap.tolist() == [[0.0]] and m.num_predictions == 0


def test_parse_tiou_matches_reference_floats_and_rejects_bad_input():
    np.testing.assert_array_equal(parse_tiou("0.5:0.95:0.05"), np.linspace(0.5, 0.95, 10))
    np.testing.assert_array_equal(parse_tiou(["0.3:0.7:0.1"]), np.linspace(0.3, 0.7, 5))
    assert parse_tiou(["0.3", "0.5"]).tolist() == [0.3, 0.5]
    for bad in (["0"], ["1.5"], ["a"], ["0.5:0.1:0.1"], ["0.1:0.5"]):
        with pytest.raises(ValueError):
            parse_tiou(bad)


# --- proposals -----------------------------------------------------------------------------------


def sequential_ar_an(gt, proposals, thresholds, max_avg):
    """AR-AN restated one video at a time (ActivityNet's average_recall_vs_avg_nr_proposals)."""
    videos = [v for v in gt if len(v)]
    total = sum(len(d) for d in proposals.values())
    ratio = max_avg * len(videos) / total
    scores, total_kept = [], 0
    for v in videos:
        d = proposals.get(v.video_id)
        if d is None or len(d) == 0:
            scores.append(np.zeros((len(v), 1)))
            continue
        order = np.asarray(d.scores).argsort()[::-1]
        n = min(int(len(order) * ratio), len(order))
        total_kept += n
        segs = np.asarray(d.segments.data)[order[:n]]
        scores.append(np.array([[_seq_tiou(p, g) for p in segs] for g in v.segments]).reshape(len(v), n))
    pcn = np.arange(1, 101) / 100.0 * (max_avg * len(videos) / total_kept)
    recall = np.zeros((len(thresholds), 100))
    for ti, thr in enumerate(thresholds):
        matches = np.zeros((len(videos), 100))
        for i, s in enumerate(scores):
            budget = np.minimum((s.shape[1] * pcn).astype(int), s.shape[1])
            for j, nr in enumerate(budget):
                matches[i, j] = np.count_nonzero((s[:, :nr] >= thr).sum(axis=1))
        recall[ti] = matches.sum(axis=0) / sum(len(v) for v in videos)
    return recall, pcn * total_kept / len(videos)


@pytest.mark.parametrize("seed", range(4))
def test_proposals_agree_with_sequential_reference(seed):
    gt, preds = random_dataset(seed, n_videos=10, quantize=False)
    preds.pop("ghost")
    preds.pop(next(iter(preds)))  # a video without proposals
    thresholds = ACTIVITYNET_TIOU
    m = evaluate_proposals(gt, preds, thresholds, max_avg_proposals=10)
    recall, an = sequential_ar_an(gt, preds, thresholds, 10)
    np.testing.assert_allclose(m.recall, recall, atol=1e-12)
    np.testing.assert_allclose(m.proposals_per_video, an)
    assert 0 <= m.auc <= 1


def test_proposals_hand_computed():
    gt = AnnotationSet({"a": VideoAnnotation("a", Segments([[0, 10], [20, 30]]), [0, 0])}, LabelMap({"x": 0}))
    props = {"a": Detections("a", Segments([[0, 10], [50, 60], [20, 30], [70, 80]]), [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])}
    m = evaluate_proposals(gt, props, [0.5], max_avg_proposals=4)
    assert m.ar_at(1) == 0.5  # the best proposal recalls one of two instances
    assert m.ar_at(2) == 0.5
    assert m.ar_at(3) == 1.0 and m.ar_at(4) == 1.0
