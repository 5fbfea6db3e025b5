"""DETAD error analysis (tal_models.evaluation.diagnosis): a case worked by hand, edge cases, and invariants on a real
detector's THUMOS14 outputs (shared eval case)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tal_models.evaluation import Diagnosis, diagnose, evaluate_detection
from tal_models.evaluation.diagnosis import BIN_PRESETS, FP_TYPES
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, VideoAnnotation

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")
TP, DD, WL, LOC, CONF, BG = range(6)
A, B, C = 0, 1, 2


def _gt() -> AnnotationSet:
    """Two classes, four instances. Characteristics (length s, coverage, instances in the video):
    v1 (100 s): A1 [10, 20] (10, 0.1, 2), B1 [50, 60] (10, 0.1, 2); v2 (100 s): A2 [0, 10] (10, 0.1, 1);
    v3 (50 s): B2 [20, 40] (20, 0.4, 1). C has no ground truth."""

    def video(vid, duration, segments, labels):
        return VideoAnnotation(vid, Segments(np.array(segments, float)), np.array(labels), duration=duration, subset="test")

    videos = {
        "v1": video("v1", 100.0, [[10, 20], [50, 60]], [A, B]),
        "v2": video("v2", 100.0, [[0, 10]], [A]),
        "v3": video("v3", 50.0, [[20, 40]], [B]),
    }
    return AnnotationSet(videos, LabelMap({"A": A, "B": B, "C": C}))


def _det(vid, rows) -> Detections:
    rows = np.array(rows, float).reshape(-1, 4)  # start, end, score, label
    return Detections(vid, Segments(rows[:, :2]), rows[:, 2], rows[:, 3].astype(np.int64))


def _predictions() -> dict[str, Detections]:
    """One prediction of each kind; the comment gives its type at tIoU 0.5 and why.
    Class A in score order: p1 TP, p2 DD, p3 LOC, p4 WL, p5 BG, p6 TP. Class B: q2 CONF, q1 TP, q3 BG."""
    return {
        "v1": _det("v1", [
            [10, 20, 0.90, A],  # p1: A1 exactly -> true positive
            [11, 20, 0.85, A],  # p2: tIoU 0.9 with A1, already taken -> double detection (0.95: localisation)
            [70, 80, 0.70, A],  # p5: no overlap with anything in v1 -> background
            [10, 13, 0.90, B],  # q2: best is A1 at tIoU 0.3 (other class, in [0.1, 0.5)) -> confusion
        ]),
        "v2": _det("v2", [
            [0, 3, 0.80, A],  # p3: tIoU 0.3 with A2 (same class, in [0.1, 0.5)) -> localisation
            [0, 10, 0.60, A],  # p6: A2 exactly, still free -> true positive
        ]),
        "v3": _det("v3", [
            [20, 40, 0.75, A],  # p4: tIoU 1 with B2, another class -> wrong label
            [20, 40, 0.80, B],  # q1: B2 exactly -> true positive
            [0, 5, 0.99, C],  # a class without ground truth: ignored, as evaluate_detection ignores it
        ]),
        "v9": _det("v9", [[0, 1, 0.30, B]]),  # q3: a video without ground truth -> background
    }  # fmt: skip


# Length on THUMOS14's bins (10 s -> M, 20 s -> XL) to spread the four instances; the others ActivityNet's
# (coverage 0.1 -> XS, 0.4 -> S: the bins are closed on the right; 1 instance per video -> XS, 2 -> S).
BINS = {"coverage": BIN_PRESETS["activitynet"]["coverage"], "length": BIN_PRESETS["thumos14"]["length"],
        "num_instances": BIN_PRESETS["activitynet"]["num_instances"]}  # fmt: skip


def test_types_of_each_prediction_by_hand():
    d = diagnose(_gt(), _predictions(), np.array([0.5, 0.95]), bins=BINS)
    t = d.prediction_types
    np.testing.assert_array_equal(t["v1"], [[TP, DD, BG, CONF], [TP, LOC, BG, CONF]])  # p2: 0.9 < 0.95 -> localisation
    np.testing.assert_array_equal(t["v2"], [[LOC, TP], [LOC, TP]])
    np.testing.assert_array_equal(t["v3"], [[WL, TP, -1], [WL, TP, -1]])  # tIoU 1 reaches 0.95 too; C not analysed
    np.testing.assert_array_equal(t["v9"], [[BG], [BG]])
    assert d.num_predictions == 9 and d.num_ground_truth == 4
    fp = d.to_dict()["false_positives"]
    assert fp["types"] == list(FP_TYPES) and fp["top_k"] == list(range(1, 11)) and fp["num_analysed"] == 9
    # Bands of G_c = 2 per class. 1G: p1 p2 | q2 q1 -> at 0.5 TP 2, DD 1, CONF 1; at 0.95 p2 is LOC instead.
    band = {name: shares[0] for name, shares in fp["breakdown"].items()}
    assert band == pytest.approx({"true_positive": 0.5, "double_detection": 0.125, "wrong_label": 0, "localization": 0.125,
                                  "confusion": 0.25, "background": 0})  # fmt: skip
    # 2G: p3 p4 | q3 -> LOC, WL, BG a third each; 3G: p5 p6 -> BG, TP; 4G..10G: empty.
    assert [fp["breakdown"][n][1] for n in FP_TYPES] == pytest.approx([0, 0, 1 / 3, 1 / 3, 0, 1 / 3])
    assert [fp["breakdown"][n][2] for n in FP_TYPES] == pytest.approx([0.5, 0, 0, 0, 0, 0.5])
    assert all(fp["breakdown"][n][3:] == [0.0] * 7 for n in FP_TYPES)
    # Top 10G = all 9: TP 3, DD 1 (0.5) / LOC +1 (0.95), WL 1, LOC 1, CONF 1, BG 2.
    assert [fp["breakdown_cumulative"][n][-1] for n in FP_TYPES] == pytest.approx([3 / 9, 0.5 / 9, 1 / 9, 1.5 / 9, 1 / 9, 2 / 9])


def test_removed_gain_by_hand():
    # At tIoU 0.5 both classes have G_c = 2 = G / K, so AP_N is plain AP here.
    # A: TP DD LOC WL BG TP -> precision 1 at recall 0.5, 2/6 at recall 1: AP = 0.5 + 0.5 / 3 = 2/3.
    # B: CONF TP BG -> precision 1/2 at recall 0.5 (B1 never found): AP = 1/4.   mAP = (2/3 + 1/4) / 2 = 11/24.
    d = diagnose(_gt(), _predictions(), np.array([0.5]), bins=BINS)
    assert d.average_mAP == pytest.approx(11 / 24)
    assert d.average_mAP == pytest.approx(evaluate_detection(_gt(), _predictions(), [0.5]).average_mAP)
    assert d.normalized_average_mAP == pytest.approx(11 / 24)
    # Without one of A's four false positives before p6: precision 2/5 at recall 1 -> AP_A = 0.7 (+1/30, i.e. +1/60 on
    # the mean). Without CONF, B is TP BG -> AP_B = 1/2 (+1/4 -> +1/8). B's BG comes after its last TP: no change.
    gain = d.false_positives["removed_gain"]
    assert gain == pytest.approx({"double_detection": 1 / 60, "wrong_label": 1 / 60, "localization": 1 / 60,
                                  "confusion": 1 / 8, "background": 1 / 60})  # fmt: skip


def test_false_negatives_and_sensitivity_by_hand():
    d = diagnose(_gt(), _predictions(), np.array([0.5]), bins=BINS).to_dict()
    fn = d["false_negatives"]
    # Found: A1 (p1), A2 (p6, running precision_N 2/6 > 0.05), B2 (q1, 1/2). Missed: B1 only.
    assert fn["overall_rate"] == pytest.approx(1 / 4)
    assert fn["coverage"]["count"] == [3, 1, 0, 0, 0] and fn["coverage"]["rate"] == pytest.approx([1 / 3, 0, None, None, None])
    assert fn["length"]["count"] == [0, 0, 3, 0, 1] and fn["length"]["rate"] == pytest.approx([None, None, 1 / 3, None, 0])
    assert fn["num_instances"]["count"] == [2, 2, 0, 0] and fn["num_instances"]["rate"] == pytest.approx([0, 1 / 2, None, None])
    assert fn["length"]["edges"] == [0, 3, 6, 12, 18, None]  # infinity is not JSON
    s = d["sensitivity"]
    assert s["overall_normalized_ap"] == pytest.approx(11 / 24)
    # num_instances XS = {A2, B2}. A keeps the predictions unmatched or on A2 (p1 goes): FP FP FP FP TP with
    # G_c = 1 and G/K = 2 -> precision_N 2 / (2 + 4) = 1/3, AP 1/3. B keeps q2 q1 q3: FP TP FP -> 2/3. Mean 1/2.
    # S = {A1, B1}: A drops p6: TP first -> AP 1; B drops q1, nothing found -> 0. Mean 1/2.
    assert s["num_instances"]["normalized_ap"] == pytest.approx([0.5, 0.5, None, None])
    # length M = {A1, B1, A2}: A as a whole (2/3); B on B1 alone (0) -> 1/3. XL = {B2}: only B counts -> 2/3.
    assert s["length"]["normalized_ap"] == pytest.approx([None, None, 1 / 3, None, 2 / 3])
    assert (s["length"]["min"], s["length"]["max"]) == pytest.approx((1 / 3, 2 / 3))


def test_precision_floor_of_the_false_negative_analysis():
    # With a floor of 0.5: p6 (precision_N 1/3) and q1 (1/2, not above) no longer count: A2 and B2 join B1 as misses.
    d = diagnose(_gt(), _predictions(), np.array([0.5]), bins=BINS, min_normalized_precision=0.5)
    assert d.false_negatives["overall_rate"] == pytest.approx(3 / 4)
    assert d.false_negatives["num_instances"]["rate"] == pytest.approx([1, 1 / 2, None, None])


def test_predictions_beyond_the_limit_are_not_analysed():
    # limit_factor 2: A keeps its top 4 (p1..p4), B all 3 (fewer than 4). p5 and p6 are left out.
    d = diagnose(_gt(), _predictions(), np.array([0.5]), limit_factor=2, bins=BINS)
    np.testing.assert_array_equal(d.prediction_types["v1"], [[TP, DD, -1, CONF]])
    np.testing.assert_array_equal(d.prediction_types["v2"], [[LOC, -1]])
    fp = d.false_positives
    assert fp["top_k"] == [1, 2] and fp["num_analysed"] == 7
    # A without p6 is TP DD LOC WL: AP 1/2; B unchanged 1/4 -> AP_N (3/4) / 2; average_mAP still uses everything.
    assert d.normalized_average_mAP == pytest.approx(3 / 8)
    assert d.average_mAP == pytest.approx(11 / 24)
    # Now no A false positive precedes an A true positive that is kept: removing them changes nothing.
    assert fp["removed_gain"]["double_detection"] == pytest.approx(0) and fp["removed_gain"]["confusion"] == pytest.approx(1 / 8)


def test_no_predictions_and_no_ground_truth():
    d = diagnose(_gt(), {}, np.array([0.5]), bins=BINS).to_dict()
    assert d["average_mAP"] == 0 and d["num_predictions"] == 0
    assert all(v == [0.0] * 10 for v in d["false_positives"]["breakdown"].values())
    assert all(g == 0 for g in d["false_positives"]["removed_gain"].values())
    assert d["false_negatives"]["overall_rate"] == 1
    assert d["false_negatives"]["coverage"]["rate"] == [1.0, 1.0, None, None, None]
    assert d["sensitivity"]["coverage"]["normalized_ap"] == [0.0, 0.0, None, None, None]
    empty = AnnotationSet({}, LabelMap({"A": 0}))
    e = diagnose(empty, {"v1": _det("v1", [[0, 1, 0.5, A]])}, np.array([0.5])).to_dict()
    assert e["num_ground_truth"] == 0 and e["false_negatives"]["overall_rate"] is None
    assert e["sensitivity"]["length"]["min"] is None


def test_json_round_trip_and_bad_arguments():
    d = diagnose(_gt(), _predictions(), np.array([0.5, 0.95]), bins=BINS)
    text = json.dumps(d.to_dict(), allow_nan=False)
    back = Diagnosis.from_dict(json.loads(text))
    assert back.to_dict() == json.loads(text)
    with pytest.raises(ValueError, match="unknown bins"):
        diagnose(_gt(), {}, np.array([0.5]), bins="kinetics")
    with pytest.raises(ValueError, match="limit_factor"):
        diagnose(_gt(), {}, np.array([0.5]), limit_factor=0)


# --- a real detector: AutoLoc on THUMOS14 test (published average mAP 0.217 over tIoU 0.1:0.9) and on ActivityNet 1.2
# validation (0.160 over 0.5:0.95) ---------------------------------------------------------------------------------

CASES = {"autoloc_thumos14_test": ("thumos14", 3234), "autoloc_activitynet12_val": ("activitynet", 3457)}


@pytest.fixture(scope="module", params=sorted(CASES))
def autoloc(request):
    from pipelines.annotations import read_annotations
    from pipelines.annotations.activitynet import read_activitynet_results

    case = DATA / "eval_cases" / request.param
    if not case.exists():
        pytest.skip(f"shared data not found at {case}")
    gt = read_annotations(case / "ground_truth.json")
    predictions = read_activitynet_results(case / "predictions.json", gt.label_map).detections
    expected = json.loads((case / "expected.json").read_text())
    tiou = np.array(expected["tiou"])
    metrics = evaluate_detection(gt, predictions, tiou, keep_curves=True)
    bins, num_gt = CASES[request.param]
    d = diagnose(gt, predictions, tiou, bins=bins, min_normalized_precision=0.0)
    return gt, expected, num_gt, metrics, d


@needs_data
def test_real_detector_invariants(autoloc):
    gt, expected, num_gt, metrics, d = autoloc
    assert d.average_mAP == pytest.approx(metrics.average_mAP, abs=1e-12)
    assert d.average_mAP == pytest.approx(expected["average_mAP"], abs=5e-4)
    fp = d.false_positives
    for k in range(d.limit_factor):  # bands are shares: they sum to 1 (0 for a band that no class reaches)
        total = sum(fp["breakdown"][n][k] for n in FP_TYPES)
        assert total == pytest.approx(1) or (k > 0 and total == 0)
        assert sum(fp["breakdown_cumulative"][n][k] for n in FP_TYPES) == pytest.approx(1)
    # The true-positive share of the analysed predictions is what the matching of evaluate_detection gives:
    # recall at the (10 G_c)-th prediction of each class, times G_c, over the analysed predictions.
    npos = {name: int(np.sum(np.concatenate([v.labels for v in gt]) == gt.label_map.id(name))) for name in metrics.class_names}
    true_positives = sum(
        metrics.curves[c][1][:, min(10 * npos[c], metrics.curves[c][1].shape[1]) - 1] * npos[c] for c in metrics.class_names
    )
    assert fp["breakdown_cumulative"]["true_positive"][-1] == pytest.approx(float(np.mean(true_positives)) / fp["num_analysed"])
    assert all(g >= 0 for g in fp["removed_gain"].values())  # deleting false positives never lowers a precision
    assert fp["removed_gain"]["background"] > 0.01  # and this detector has plenty of background errors
    fn = d.false_negatives
    for name in ("coverage", "length", "num_instances"):
        assert sum(fn[name]["count"]) == d.num_ground_truth == num_gt
        rates = [r for r in fn[name]["rate"] if r is not None]
        assert all(0 <= r <= 1 for r in rates)
        # the rates weighted by the bin sizes give back the overall rate
        weighted = sum(c * r for c, r in zip(fn[name]["count"], fn[name]["rate"]) if c)
        assert weighted / d.num_ground_truth == pytest.approx(fn["overall_rate"])
    # With no precision floor, a miss is an instance the ActivityNet matching leaves unmatched: 1 - recall at the end of
    # each class's ranking (evaluate_detection's curves), pooled over classes, averaged over thresholds.
    found = sum(metrics.curves[c][1][:, -1] * npos[c] for c in metrics.class_names)
    assert fn["overall_rate"] == pytest.approx(float(np.mean(1 - found / d.num_ground_truth)))
    s = d.sensitivity
    assert 0 < s["overall_normalized_ap"] < 1
    for name in ("coverage", "length", "num_instances"):
        assert s[name]["min"] <= s[name]["max"]


@needs_data
def test_agrees_with_detad_itself_on_thumos14():
    """Expected values computed by DETAD's own code (github.com/HumamAlwassel/DETAD, commit 24f7d95: ActionDetectorDiagnosis
    with limit_factor=10, min_tiou_thr=0.1, normalize_ap=True; false_positive_analysis.split_predictions_by_score_ranges,
    false_negative_analysis.fn_distribution_by_characteristic (precision floor 0.05),
    sensitivity_analysis.compute_average_mAP_N_for_characteristic; THUMOS14 bins) on this case at tIoU 0.3:0.7, run outside
    the repository with numpy-2 spelling fixes only, coverage/length/#instances computed from the ground truth.
    The 275 predictions of the three videos absent from the ground truth are dropped first: DETAD compares all but the
    first prediction of such a video with the previous video's ground truth (a stale variable), which we do not copy."""
    from pipelines.annotations import read_annotations
    from pipelines.annotations.activitynet import read_activitynet_results

    case = DATA / "eval_cases" / "autoloc_thumos14_test"
    gt = read_annotations(case / "ground_truth.json")
    predictions = {v: d for v, d in read_activitynet_results(case / "predictions.json", gt.label_map).detections.items() if v in gt}
    assert sum(len(d) for d in predictions.values()) == 20488
    d = diagnose(gt, predictions, np.linspace(0.3, 0.7, 5), bins="thumos14").to_dict()
    close = {"rel": 1e-6}  # sensitivity differs by ~4e-8 where equal scores are ordered differently (pandas sort vs argsort)
    assert d["normalized_average_mAP"] == pytest.approx(0.2297284740, **close)
    fp = d["false_positives"]
    assert fp["num_analysed"] == 19143
    assert fp["removed_gain"] == pytest.approx({"double_detection": 0.0063622058, "wrong_label": 0.0054242083, "localization": 0.0539111554,
                                                "confusion": 0.0054389932, "background": 0.0818734721}, **close)  # fmt: skip
    top_g = [0.3156462585, 0.0262832406, 0.0172541744, 0.3162028448, 0.0385899814, 0.2860235003]  # in FP_TYPES order
    assert [fp["breakdown"][n][0] for n in FP_TYPES] == pytest.approx(top_g, **close)
    fn = d["false_negatives"]
    assert fn["coverage"]["rate"] == pytest.approx([0.4066259808, 0.3408450704, 0.5267973856, 0.4169491525, 0.593258427], **close)
    assert fn["num_instances"]["rate"] == pytest.approx([0.5733333333, 0.402054155, 0.3629518072, 0.4789346247], **close)
    assert fn["length"]["rate"][0] == pytest.approx(0.4046382189, **close) and fn["length"]["count"][1:] == [0] * 4  # durations 1
    s = d["sensitivity"]
    assert s["overall_normalized_ap"] == pytest.approx(0.2320738338, **close)
    assert s["coverage"]["normalized_ap"] == pytest.approx([0.2457135047, 0.2625072796, 0.2691924544, 0.2733570413, 0.1462149538], **close)
    assert s["num_instances"]["normalized_ap"] == pytest.approx([0.2980557373, 0.2396999289, 0.317149459, 0.2402367625], **close)
