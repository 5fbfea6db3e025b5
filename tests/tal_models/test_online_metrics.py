"""Online metrics: per-frame mAP (OAD protocol) against scikit-learn, latency, instance mAP of events, the offline ceiling."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tal_models.evaluation.online import (
    detection_latency,
    evaluate_offline,
    evaluate_online,
    events_to_detections,
    frame_map,
    instance_map,
    offline_frame_scores,
    offline_latency,
    stream_instances,
)
from tal_models.online.events import Event
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, VideoAnnotation


def ev(kind, instance, label, time, start=None, end=None, score=0.9):
    """An event in its ``Event.to_dict()`` form."""
    return {
        "kind": kind,
        "instance": instance,
        "label": label,
        "start": time if start is None else start,
        "end": end,
        "score": score,
        "time": time,
        "step": int(time * 4),
    }


def one_video(segments, labels, ambiguous=None, names=("a", "b", "c"), ids=None):
    ids = list(range(len(names))) if ids is None else ids
    amb = Segments(np.asarray(ambiguous if ambiguous is not None else np.zeros((0, 2)), np.float64).reshape(-1, 2))
    video = VideoAnnotation("v", Segments(np.asarray(segments, np.float64).reshape(-1, 2)), labels, duration=30.0, ambiguous=amb)
    return AnnotationSet({"v": video}, LabelMap(dict(zip(names, ids))))


# --- per-frame mAP ------------------------------------------------------------------------------


def random_set(rng, num_videos=4, K=4, empty_class=2):
    label_map = LabelMap({f"c{k}": k + 1 for k in range(K)})  # ids 1..K: columns are the ids in order
    videos, scores = {}, {}
    for v in range(num_videos):
        duration = float(rng.uniform(10, 30))
        n = int(rng.integers(1, 5))
        starts = rng.uniform(0, duration - 1, n)
        segs = np.stack([starts, np.minimum(starts + rng.uniform(1, 6, n), duration)], 1)
        labels = rng.choice([k + 1 for k in range(K) if k != empty_class], n)
        a0 = float(rng.uniform(0, duration - 2))
        vid = f"video_{v}"
        videos[vid] = VideoAnnotation(vid, Segments(segs), labels, duration=duration, ambiguous=Segments([[a0, a0 + 1.5]]))
        times = np.arange(0.125, duration, 0.25)  # 4 fps centres, as the OAD setting
        scores[vid] = (times, np.round(rng.random((len(times), K)), 1))  # one decimal: many ties
    return AnnotationSet(videos, label_map), scores


def sklearn_reference(gt, scores, K, empty="exclude"):
    """The references' procedure written out: one-hot-like targets, ambiguous rows removed, sklearn AP per class."""
    S, Y = [], []
    for vid, video in gt.videos.items():
        t, s = scores[vid]
        y = np.zeros((len(t), K), bool)
        for (a, b), c in zip(np.asarray(video.segments.data), video.labels):
            y[(t > a) & (t < b), gt.label_map.ids.index(int(c))] = True
        amb = np.zeros(len(t), bool)
        for a, b in np.asarray(video.ambiguous.data):
            amb |= (t >= a) & (t <= b)
        S.append(s[~amb])
        Y.append(y[~amb])
    S, Y = np.concatenate(S), np.concatenate(Y)
    aps = []
    for k in range(K):
        if Y[:, k].any() or empty == "zero":  # "zero": TRN, which scores every class with sklearn
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns that the class has no positives
                aps.append(average_precision_score(Y[:, k], S[:, k]))
    return float(np.mean(aps)), S.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frame_map_equals_sklearn(seed):
    gt, scores = random_set(np.random.default_rng(seed))
    metrics = frame_map(gt, scores)
    expected, num_frames = sklearn_reference(gt, scores, 4)
    assert metrics.mAP == pytest.approx(expected, abs=1e-12)
    assert metrics.num_frames == num_frames < sum(len(t) for t, _ in scores.values())  # ambiguous frames dropped
    assert np.isnan(metrics.per_class_ap[2])  # the empty class is excluded (LSTR / MiniROAD)
    expected_zero, _ = sklearn_reference(gt, scores, 4, empty="zero")
    assert expected_zero < expected
    assert frame_map(gt, scores, empty_classes="zero").mAP == pytest.approx(expected_zero, abs=1e-12)


def test_frame_map_ignores_frames_in_ambiguous_segments():
    gt = one_video([[1.0, 3.0]], [0], ambiguous=[[5.0, 6.0]])
    t = np.arange(0.125, 8.0, 0.25)
    s = np.zeros((len(t), 3))
    s[(t > 1) & (t < 3), 0] = 0.5
    assert frame_map(gt, {"v": (t, s)}).mAP == 1.0
    s[(t >= 5) & (t <= 6), 0] = 0.9  # high scores, but only on ambiguous frames
    assert frame_map(gt, {"v": (t, s)}).mAP == 1.0
    s[(t > 6) & (t < 7), 0] = 0.9  # the same just outside the ambiguous segment: false positives ranked first
    assert frame_map(gt, {"v": (t, s)}).mAP < 1.0


# --- events -----------------------------------------------------------------------------------


def test_stream_instances_groups_events_and_checks_them():
    events = [
        ev("start", 0, 1, 2.0, start=1.5),
        ev("update", 0, 1, 2.5, start=1.5),
        ev("start", 1, 0, 3.0),
        ev("end", 0, 1, 4.0, start=1.5, end=3.75, score=0.7),
    ]
    inst = {i.instance: i for i in stream_instances(events)}
    assert inst[0].reported == 2.0 and inst[0].closed == 4.0 and inst[0].segment == (1.5, 3.75) and inst[0].score == 0.7
    assert inst[1].segment is None and inst[1].closed == np.inf
    assert stream_instances([Event.from_dict(e) for e in events]) == stream_instances(events)  # Event or its dict
    with pytest.raises(ValueError, match="ends before it starts"):
        stream_instances([ev("end", 3, 0, 1.0, end=1.0)])
    with pytest.raises(ValueError, match="two start events"):
        stream_instances([ev("start", 3, 0, 1.0), ev("start", 3, 0, 2.0)])


def test_events_to_detections_maps_columns_to_label_ids():
    events = [ev("start", 0, 1, 2.0, start=1.5), ev("start", 1, 0, 3.0), ev("end", 0, 1, 4.0, start=1.5, end=3.75, score=0.7)]
    det = events_to_detections(events, "v", [5, 7, 9])
    np.testing.assert_array_equal(det.labels, [7])  # only the ended instance, column 1 -> id 7
    np.testing.assert_allclose(np.asarray(det.segments.data), [[1.5, 3.75]])
    np.testing.assert_allclose(det.scores, [0.7])
    clipped = events_to_detections(
        [ev("start", 0, 2, 29.0, start=-0.25), ev("end", 0, 2, 30.5, start=-0.25, end=30.25)], "v", [5, 7, 9], 30.0
    )
    np.testing.assert_allclose(np.asarray(clipped.segments.data), [[0.0, 30.0]])
    assert len(events_to_detections([], "v", [5])) == 0
    with pytest.raises(ValueError, match="not one of the 3 classes"):
        events_to_detections([ev("start", 0, 3, 1.0), ev("end", 0, 3, 2.0, end=2.0)], "v", [5, 7, 9])


def test_instance_map_of_end_events():
    gt = one_video([[1.0, 3.0], [10.0, 14.0]], [5, 9], names=("a", "b"), ids=[5, 9])
    perfect = [
        ev("start", 0, 0, 1.5, start=1.0),
        ev("end", 0, 0, 3.5, start=1.0, end=3.0),
        ev("start", 1, 1, 11.0, start=10.0),
        ev("end", 1, 1, 14.5, start=10.0, end=14.0),
    ]
    metrics = instance_map(gt, {"v": perfect})
    np.testing.assert_allclose(metrics.tiou, [0.3, 0.4, 0.5, 0.6, 0.7])
    assert metrics.average_mAP == pytest.approx(1.0)
    # the second instance ends at 12 (tIoU 0.5): found at 0.3..0.5, missed at 0.6 and 0.7; still-open instances count for nothing
    half = [*perfect[:3], ev("end", 1, 1, 12.5, start=10.0, end=12.0), ev("start", 2, 0, 20.0)]
    np.testing.assert_allclose(instance_map(gt, {"v": half}).mAP, [1.0, 1.0, 1.0, 0.5, 0.5])


# --- latency ----------------------------------------------------------------------------------


def test_instance_map_clips_segments_to_the_video():
    gt = one_video([[28.0, 30.0]], [0])  # the video lasts 30 s
    events = [ev("start", 0, 0, 28.5, start=28.0), ev("end", 0, 0, 31.0, start=28.0, end=31.0)]  # tIoU 2/3 unclipped
    np.testing.assert_allclose(instance_map(gt, {"v": events}).mAP, 1.0)


def test_latency_inside_early_and_greedy():
    gt = one_video([[2.0, 4.0], [10.0, 12.0], [20.0, 22.0], [30.0, 31.0], [40.0, 41.0]], [0, 0, 1, 1, 2])
    events = [
        ev("start", 0, 0, 2.5),  # inside [2, 4]: 0.5 s
        ev("end", 0, 0, 4.0, start=2.5, end=4.0),
        ev("start", 1, 0, 9.0),  # before [10, 12] and still open at 10: latency 0
        ev("start", 2, 1, 19.0),  # before [20, 22] but closed at 19.5: does not count ...
        ev("end", 2, 1, 19.5, start=19.0, end=19.5),
        ev("start", 3, 0, 21.0),  # ... and a wrong-class report inside it neither
        ev("start", 4, 1, 21.5),  # class b inside [20, 22]: 1.5 s
        ev("end", 1, 0, 25.0, start=9.0, end=24.0),
        # [30, 31] (b): instance 4 is still open, but it already served [20, 22]
        ev("start", 5, 2, 41.5),  # after [40, 41] ended: missed
    ]
    lat = detection_latency(gt, {"v": events})
    np.testing.assert_allclose(lat.latency, [0.5, 0.0, 1.5, np.nan, np.nan])
    assert lat.num_detected == 3 and lat.num_ground_truth == 5 and lat.fraction_detected == pytest.approx(0.6)
    assert lat.median == pytest.approx(0.5) and lat.p90 == pytest.approx(np.quantile([0.0, 0.5, 1.5], 0.9))
    strict = detection_latency(gt, {"v": events}, count_early=False)
    np.testing.assert_allclose(strict.latency, [0.5, np.nan, 1.5, np.nan, np.nan])
    assert json.loads(json.dumps(lat.to_dict()))["num_detected"] == 3


def test_latency_one_report_serves_one_instance_in_time_order():
    gt = one_video([[5.0, 9.0], [2.0, 6.0]], [0, 0])  # file order is not time order
    lat = detection_latency(gt, {"v": [ev("start", 0, 0, 5.5)]})
    np.testing.assert_allclose(lat.latency, [np.nan, 3.5])  # the earlier instance [2, 6] takes the report
    lat = detection_latency(gt, {"v": [ev("start", 0, 0, 5.5), ev("start", 1, 0, 5.75)]})
    np.testing.assert_allclose(lat.latency, [0.75, 3.5])


def test_latency_errors_and_empty():
    gt = one_video([[1.0, 2.0]], [0])
    with pytest.raises(ValueError, match="have no events"):
        detection_latency(gt, {"other": []})
    with pytest.raises(ValueError, match="not one of the 3 classes"):
        detection_latency(gt, {"v": [ev("start", 0, 7, 1.5)]})
    lat = detection_latency(gt, {"v_v": []})  # the v_ prefix is optional, as everywhere
    assert lat.num_detected == 0 and np.isnan(lat.median) and lat.to_dict()["median_s"] is None


# --- the offline ceiling ----------------------------------------------------------------------


def test_offline_frame_scores_take_the_best_covering_detection():
    det = Detections("v", Segments([[1.0, 3.0], [2.0, 5.0], [0.0, 9.0]]), [0.4, 0.8, 0.3], [4, 4, 6])
    s = offline_frame_scores(det, np.array([0.5, 1.0, 2.5, 4.0, 6.0]), [4, 5, 6])
    np.testing.assert_allclose(s[:, 0], [0.0, 0.4, 0.8, 0.8, 0.0])
    np.testing.assert_allclose(s[:, 1], 0.0)
    np.testing.assert_allclose(s[:, 2], 0.3)


def test_offline_latency_uses_the_best_tiou_detection():
    gt = one_video([[2.0, 6.0], [10.0, 12.0], [20.0, 21.0]], [0, 1, 0])
    det = Detections("v", Segments([[1.0, 6.0], [3.0, 6.0], [10.5, 12.0], [20.0, 21.0]]), [0.2, 0.9, 0.5, 0.5], [0, 0, 1, 2])
    lat = offline_latency(gt, {"v": det})
    # [2, 6]: best tIoU is [1, 6] (0.8 > 0.75), early -> 0; [10, 12]: 0.5 s late; [20, 21]: only a wrong-class detection -> missed
    np.testing.assert_allclose(lat.latency, [0.0, 0.5, np.nan])
    # the 0.2 detection left out: [2, 6] takes [3, 6], 1 s late
    np.testing.assert_allclose(offline_latency(gt, {"v": det}, min_score=0.3).latency, [1.0, 0.5, np.nan])
    np.testing.assert_allclose(offline_latency(gt, {"v": det}, min_score=0.95).latency, [np.nan] * 3)


def test_evaluate_online_and_offline_agree_on_a_perfect_model():
    gt = one_video([[2.0, 6.0], [10.0, 12.0]], [0, 1])
    t = np.arange(0.125, 15.0, 0.25)
    det = Detections("v", Segments([[2.0, 6.0], [10.0, 12.0]]), [0.9, 0.8], [0, 1])
    offline = evaluate_offline(gt, {"v": det}, {"v": t})
    events = [ev("start", 0, 0, 2.125, start=2.0), ev("end", 0, 0, 6.125, start=2.0, end=6.0, score=0.9)]
    events += [ev("start", 1, 1, 10.625, start=10.0), ev("end", 1, 1, 12.125, start=10.0, end=12.0, score=0.8)]
    online = evaluate_online(gt, {"v": events}, {"v": (t, offline_frame_scores(det, t, [0, 1, 2]))})
    assert offline.frame_mAP == online.frame_mAP == 1.0
    assert offline.average_mAP == pytest.approx(1.0) and online.average_mAP == pytest.approx(1.0)
    np.testing.assert_allclose(offline.latency.latency, [0.0, 0.0])
    np.testing.assert_allclose(online.latency.latency, [0.125, 0.625])
    out = json.loads(json.dumps(online.to_dict()))
    assert out["latency"]["num_detected"] == 2 and out["frame_mAP"] == 1.0 and out["model"] == "online"
