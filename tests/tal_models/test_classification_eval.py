"""Video-level classification: the evaluator against hand-computed values and against the ActivityNet
reference evaluator's numbers, and the classification results JSON (write -> read)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.annotations import read_annotations, read_video_classification, write_video_classification
from tal_models.evaluation import ClassificationMetrics, evaluate_classification
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "activitynet13"
GT_FILE, SAMPLE_FILE = DATA / "validation_ground_truth.json", DATA / "sample_classification_prediction.json"
needs_data = pytest.mark.skipif(not GT_FILE.exists(), reason=f"ActivityNet sample data not at {DATA}")

A, B, C = 0, 1, 2


def tiny_ground_truth() -> AnnotationSet:
    """v1: A; v2: B; v3: A and B (A twice); v4: no annotation; w: B but in the training subset. C is never annotated."""

    def video(vid, labels, subset="validation"):
        segs = Segments(np.array([[float(i), i + 1.0] for i in range(len(labels))]).reshape(-1, 2))
        return VideoAnnotation(vid, segs, np.array(labels, np.int64), duration=10.0, subset=subset)

    videos = [video("v1", [A]), video("v2", [B]), video("v3", [A, B, A]), video("v4", []), video("w", [B], "training")]
    return AnnotationSet({v.video_id: v for v in videos}, LabelMap.from_names(["A", "B", "C"]))


def test_hand_computed_case():
    scores = {
        "v1": {A: 0.9, B: 0.2, C: 0.95},  # C, absent from the ground truth, still takes v1's top-1 place
        "v2": {A: 0.8, B: 0.7},
        "v3": {B: 0.6},  # A not predicted
        "v4": {A: 0.97},  # a video without labels: a false positive
        "x": {A: 0.95},  # unknown video: a false positive
        "w": {B: 0.99},  # another subset: ignored with subset="validation"
    }
    m = evaluate_classification(tiny_ground_truth(), scores, top_k=(1, 2, 3), subset="validation")
    assert isinstance(m, ClassificationMetrics) and m.class_names == ["A", "B"]
    # A, by score: v4 FP, x FP, v1 TP, v2 FP (npos 2: v1, v3) -> precision 1/3 at recall 1/2, then none: AP 1/6
    # B: v2 TP, v3 TP, v1 FP (npos 2) -> AP 1
    np.testing.assert_allclose(m.ap, [1 / 6, 1.0])
    assert m.mAP == pytest.approx(7 / 12)
    # top-1: v1 C (miss), v2 A (miss), v3 B (hit); top-2: v1 C A (hit), v2 A B (hit), v3 B (hit, half its labels)
    assert m.hit_at_k == pytest.approx({1: 1 / 3, 2: 1.0, 3: 1.0})
    assert m.avg_hit_at_k == pytest.approx({1: 0.5 / 3, 2: 2.5 / 3, 3: 2.5 / 3})
    assert (m.num_videos, m.num_predicted_videos, m.num_predictions, m.num_ignored_predictions) == (3, 3, 8, 1)
    assert m.unknown_videos == ["v4", "x"]
    d = json.loads(json.dumps(m.to_dict()))
    assert d["mAP"] == pytest.approx(7 / 12) and d["hit@1"] == pytest.approx(1 / 3) and d["per_class_AP"]["B"] == 1.0
    # without subset, w counts: B's ranking gains a TP at the top (npos 3): 1/3 + 1/3 + 1/3 at precision 1
    assert evaluate_classification(tiny_ground_truth(), scores).per_class_ap["B"] == pytest.approx(1.0)
    assert evaluate_classification(tiny_ground_truth(), scores).num_videos == 4


def test_dense_arrays_predict_every_class():
    gt = tiny_ground_truth().subset("validation")
    arrays = {"v1": np.array([0.9, 0.2, 0.1]), "v2": np.array([0.8, 0.7, 0.3]), "v3": np.array([0.5, 0.6, 0.4])}
    as_maps = {v: dict(enumerate(s.tolist())) for v, s in arrays.items()}
    a, b = evaluate_classification(gt, arrays), evaluate_classification(gt, as_maps)
    np.testing.assert_array_equal(a.ap, b.ap)
    assert a.hit_at_k == b.hit_at_k and a.num_predictions == 9
    # A: v1 TP, v2 FP, v3 TP -> 1/2 + 1/2 * 2/3; B: v2 TP, v3 TP, v1 FP -> 1
    np.testing.assert_allclose(a.ap, [0.5 + 1 / 3, 1.0])


def test_ties_follow_the_reference_order():
    """The reference ranks with ``argsort()[::-1]``: of two equal scores the one given later comes first."""
    gt = tiny_ground_truth().subset("validation")
    later_fp = evaluate_classification(gt, {"v1": {A: 0.5}, "x": {A: 0.5}})
    later_tp = evaluate_classification(gt, {"x": {A: 0.5}, "v1": {A: 0.5}})
    assert later_fp.per_class_ap["A"] == pytest.approx(0.25)  # x first: precision 1/2 at recall 1/2
    assert later_tp.per_class_ap["A"] == pytest.approx(0.5)  # v1 first: precision 1 at recall 1/2
    # within a video, likewise: the later of two equal scores is its top-1
    assert evaluate_classification(gt, {"v1": {B: 0.5, A: 0.5}}, top_k=(1,)).hit_at_k[1] == pytest.approx(1 / 3)
    assert evaluate_classification(gt, {"v1": {A: 0.5, B: 0.5}}, top_k=(1,)).hit_at_k[1] == 0.0


def test_no_predictions_and_bad_input():
    gt = tiny_ground_truth().subset("validation")
    m = evaluate_classification(gt, {})
    assert m.mAP == 0.0 and m.hit_at_k == {1: 0.0, 3: 0.0} and m.num_videos == 3 and m.num_predicted_videos == 0
    with pytest.raises(ValueError, match=r"\[3\]"):
        evaluate_classification(gt, {"v1": np.zeros(2)})
    with pytest.raises(ValueError, match="label ids"):
        evaluate_classification(gt, {"v1": {7: 0.5}})
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_classification(gt, {"v1": np.array([0.1, np.nan, 0.2])})
    with pytest.raises(ValueError, match="top_k"):
        evaluate_classification(gt, {}, top_k=(0,))


def test_v_prefix_matches():
    gt = tiny_ground_truth().subset("validation")
    m = evaluate_classification(gt, {"v_v1": {A: 0.9}})
    assert m.unknown_videos == [] and m.num_predicted_videos == 1


# --- against the reference evaluator ---------------------------------------------------------------
def scores_by_id(path: Path, gt: AnnotationSet) -> dict[str, dict[int, float]]:
    ids = gt.label_map.to_dict()
    return {vid: {ids[name]: s for name, s in preds.items()} for vid, preds in read_video_classification(path).items()}


def noisy_scores(gt: AnnotationSet, seed: int = 13) -> dict[str, np.ndarray]:
    """Per video, uniform scores over the 200 classes plus up to 0.7 on its true classes; 5% of the
    videos unscored; 20 videos unknown to the ground truth."""
    rng = np.random.default_rng(seed)
    K = len(gt.label_map)
    out = {}
    for video in gt:
        s = rng.random(K)
        for c in video.labels.tolist():
            s[c] += 0.7 * rng.random()
        if rng.random() < 0.05:
            continue
        out[video.video_id] = s
    for i in range(20):
        out[f"not_a_video_{i}"] = rng.random(K)
    return out


@needs_data
def test_reference_numbers_on_the_sample_submission():
    # Expected values: ActivityNet's Evaluation/eval_classification.py (activitynet/ActivityNet, commit
    # e7ed7bc, unmodified) run under Python 2.7 with numpy 1.16.6 / pandas 0.24.2, check_status=False
    # (the blocked-videos server is gone), subset="validation", top_k=1 and top_k=3. The sample is the
    # ground truth itself: every AP is 1 (up to rounding: the reference gives 'Archery' 0.9999999999999999).
    gt = read_annotations(GT_FILE)
    m = evaluate_classification(gt, scores_by_id(SAMPLE_FILE, gt), top_k=(1, 3), subset="validation")
    assert m.mAP == 1.0 and m.hit_at_k == {1: 1.0, 3: 1.0}
    assert m.avg_hit_at_k[1] == pytest.approx(0.9992894843686561, abs=1e-15) and m.avg_hit_at_k[3] == 1.0
    assert m.num_videos == 4926 and len(m.class_names) == 200
    assert m.per_class_ap["Archery"] == pytest.approx(0.9999999999999999, abs=1e-15)


@needs_data
def test_reference_numbers_on_noisy_scores_through_the_json(tmp_path):
    """``noisy_scores``' top 5 per video, written with ``write_video_classification`` and read back,
    scored against the reference evaluator's numbers for the same file."""
    # Expected values: the same reference run (see above) on the file this test writes
    # (write_video_classification(..., top_k=5) of noisy_scores(gt)).
    gt = read_annotations(GT_FILE)
    path = tmp_path / "noisy.json"
    write_video_classification(path, noisy_scores(gt), gt.label_map, top_k=5)
    m = evaluate_classification(gt, scores_by_id(path, gt), top_k=(1, 3), subset="validation")
    assert m.mAP == pytest.approx(0.44604596291794235, abs=1e-12)
    assert m.hit_at_k[1] == pytest.approx(0.44884287454323996, abs=1e-12)
    assert m.hit_at_k[3] == pytest.approx(0.4581810799837596, abs=1e-12)
    assert m.avg_hit_at_k[1] == pytest.approx(0.4482338611449452, abs=1e-12)
    assert m.avg_hit_at_k[3] == pytest.approx(0.4577750710515631, abs=1e-12)
    reference_ap = {"Applying sunscreen": 0.5217391304347826, "Archery": 0.4714912280701754, "Arm wrestling": 0.44930789375233815}
    reference_ap |= {"Assembling bicycle": 0.3340864204919504, "BMX": 0.5874060150375939}
    for name, ap in reference_ap.items():
        assert m.per_class_ap[name] == pytest.approx(ap, abs=1e-12), name
    assert float(m.ap.sum()) == pytest.approx(89.20919258358849, abs=1e-12)  # the reference's 200 APs summed (each agrees within 2e-16)
    assert m.num_videos == 4926 and m.unknown_videos == [f"not_a_video_{i}" for i in range(20)]


# --- the results JSON ----------------------------------------------------------------------------
def test_write_read_round_trip(tmp_path):
    labels = LabelMap.from_names(["jump", "run", "throw"])
    scores = {"vid_a": np.array([0.1, 0.7, 0.3]), "v_b": np.array([0.5, 0.5, 0.9], np.float32)}
    path = tmp_path / "out" / "classification.json"
    write_video_classification(path, scores, labels)
    data = json.loads(path.read_text())
    assert set(data) == {"version", "results", "external_data"} and data["version"] == "VERSION 1.3"
    assert data["external_data"] == {"used": False, "details": ""}
    assert [p["label"] for p in data["results"]["vid_a"]] == ["run", "throw", "jump"]  # best first
    assert [p["label"] for p in data["results"]["v_b"]] == ["throw", "jump", "run"]  # ties in id order
    back = read_video_classification(path)
    assert list(back) == ["vid_a", "v_b"]
    for vid, s in scores.items():
        assert back[vid] == {labels.name(c): float(s[c]) for c in range(3)}  # exact: JSON keeps float64
    write_video_classification(path, scores, labels, top_k=1, external_data={"used": True, "details": "TSP features"})
    assert read_video_classification(path) == {"vid_a": {"run": 0.7}, "v_b": {"throw": float(np.float32(0.9))}}
    assert json.loads(path.read_text())["external_data"]["used"] is True


def test_write_refuses_bad_scores_before_writing(tmp_path):
    labels = LabelMap.from_names(["jump", "run"])
    path = tmp_path / "c.json"
    for bad in ({"a": np.zeros(3)}, {"a": np.array([0.1, np.inf])}):
        with pytest.raises(ValueError, match="video 'a'"):
            write_video_classification(path, {"ok": np.zeros(2)} | bad, labels)
        assert not path.exists()
    with pytest.raises(ValueError, match="top_k"):
        write_video_classification(path, {"ok": np.zeros(2)}, labels, top_k=0)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
