"""Annotation and prediction formats: the real files in ../shared/data and small malformed ones."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.annotations import (
    AnnotationFormatError,
    PredictionSet,
    detect_format,
    parse_timestamp,
    read_activitynet,
    read_activitynet_results,
    read_annotations,
    read_epic_kitchens,
    read_multithumos,
    read_thumos14_json,
    read_thumos14_txt,
    read_video_classification,
    write_activitynet,
    write_activitynet_results,
    write_thumos14_json,
)
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, Unit, UnknownLabelError, VideoAnnotation

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ANET = DATA / "activitynet13"
THUMOS = DATA / "thumos14"
EPIC = DATA / "epic_kitchens_100"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real annotation files not found at {DATA} (the shared data folder beside the repository)")
    return DATA


@pytest.fixture(scope="module")
def anet(data) -> AnnotationSet:
    return read_activitynet(ANET / "validation_ground_truth.json")


@pytest.fixture(scope="module")
def thumos_json(data) -> AnnotationSet:
    return read_thumos14_json(THUMOS / "thumos14.json")


@pytest.fixture(scope="module")
def thumos_txt(data) -> AnnotationSet:
    return read_thumos14_txt(THUMOS / "original_annotations")


def sorted_rows(video: VideoAnnotation) -> list[tuple[int, float, float]]:
    return sorted(zip(video.labels.tolist(), *video.segments.data.T.tolist()))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- ActivityNet ground truth ----------------------------------------------------------------
def test_activitynet_counts(anet):
    assert len(anet) == 4926
    assert anet.num_instances == 7654
    assert len(anet.label_map) == 200
    assert anet.label_map.names == sorted(anet.label_map.names)
    assert anet.label_map.ids == list(range(200))
    assert anet.subsets == ["validation"]
    assert sum(v.duration is None for v in anet) == 198
    video = anet["wONwHYy59Tc"]
    assert video.duration == 191.124
    assert video.segments.data.dtype == np.float64 and video.labels.dtype == np.int64
    assert video.segments.data.tolist() == [[94.52138901727746, 130.48707650118757]]
    assert anet.label_map.name(int(video.labels[0])) == "Blow-drying hair"


def test_activitynet_4728_protocol_file(data):
    gt = read_activitynet(ANET / "validation_ground_truth_4728.json")
    assert (len(gt), gt.num_instances, len(gt.label_map)) == (4728, 7293, 200)
    assert all(v.duration is not None for v in gt)


def test_activitynet_zero_length_instances_are_kept(anet):
    zero = sorted(v.video_id for v in anet for length in v.segments.lengths() if length == 0)
    assert zero == sorted(["QhiKgeJV3k0", "e6J_ygZ779A", "6kgJx6ahgq0"])
    assert anet["6kgJx6ahgq0"].segments.data.tolist() == [[0.0, 0.0]]


def test_activitynet_label_map_does_not_depend_on_file_order(anet, tmp_path):
    raw = json.loads((ANET / "validation_ground_truth.json").read_text())
    raw["database"] = dict(reversed(list(raw["database"].items())))
    shuffled = read_activitynet(write(tmp_path / "reversed.json", json.dumps(raw)))
    assert shuffled.label_map == anet.label_map
    assert list(shuffled.videos) == list(reversed(list(anet.videos)))
    for video in anet:
        assert np.array_equal(shuffled[video.video_id].labels, video.labels)


def test_activitynet_given_label_map(anet, tmp_path):
    path = write(tmp_path / "gt.json", json.dumps({"database": {"a": {"annotations": [{"segment": [1, 2], "label": "Skiing"}]}}}))
    gt = read_activitynet(path, label_map=anet.label_map)
    assert gt.label_map is anet.label_map
    assert gt["a"].labels.tolist() == [anet.label_map.id("Skiing")]
    with pytest.raises(AnnotationFormatError, match="'Skiing' is not in the label map") as e:
        read_activitynet(path, label_map=LabelMap.from_names(["Canoeing"]))
    assert (e.value.video_id, e.value.field) == ("a", "annotations[0].label")


def test_activitynet_ground_truth_round_trip(anet, tmp_path):
    write_activitynet(tmp_path / "gt.json", anet)
    again = read_activitynet(tmp_path / "gt.json")
    assert again.label_map == anet.label_map and list(again.videos) == list(anet.videos)
    for video in anet:
        other = again[video.video_id]
        assert np.array_equal(other.segments.data, video.segments.data)
        assert np.array_equal(other.labels, video.labels)
        assert (other.duration, other.subset) == (video.duration, video.subset)


def test_mmaction2_ground_truth_without_database_wrapper(data):
    path = DATA / "eval_cases" / "mmaction2_two_videos" / "ground_truth.json"
    gt = read_activitynet(path)
    assert sorted(gt.videos) == ["v_bYUmtLBL7W4", "v_hDPLy21Yyuk"]
    assert gt.num_instances == 4
    assert gt.resolve("bYUmtLBL7W4") == "v_bYUmtLBL7W4"  # prediction keys have no prefix
    assert gt["bYUmtLBL7W4"].duration == 224.49
    assert read_annotations(path).videos.keys() == gt.videos.keys()


# --- ActivityNet results ---------------------------------------------------------------------
def test_sample_detection_prediction(anet):
    path = ANET / "sample_detection_prediction.json"
    preds = read_activitynet_results(path, anet.label_map)
    assert isinstance(preds, PredictionSet)
    assert preds.num_predictions == 7654 and preds.unknown_labels == {}
    raw = json.loads(path.read_text())["results"]
    assert list(preds.detections) == list(raw)  # file order
    for vid, rows in raw.items():
        det = preds.detections[vid]
        assert det.segments.data.dtype == np.float64 and det.scores.dtype == np.float64 and det.labels.dtype == np.int64
        assert det.segments.unit == Unit.SECONDS
        assert det.segments.data.tolist() == [r["segment"] for r in rows]  # order within the video
        assert [anet.label_map.name(c) for c in det.labels.tolist()] == [r["label"] for r in rows]
        # the sample submission is the ground truth written as a perfect submission
        gt = anet[vid]
        assert sorted(zip(det.labels.tolist(), *det.segments.data.T.tolist())) == sorted_rows(gt)


def test_results_unknown_labels_are_dropped_and_counted(tmp_path):
    results = {"v1": [
        {"label": "A", "score": 0.9, "segment": [0, 1]},
        {"label": "Z", "score": 0.8, "segment": [1, 2]},
        {"label": "B", "score": 0.7, "segment": [2, 3]},
        {"label": "Z", "score": 0.6, "segment": [3, 4]},
        {"label": "Y", "score": 0.5, "segment": [4, 4]},
    ], "v0": [{"label": "Z", "score": 1.0, "segment": [0, 1]}]}
    path = write(tmp_path / "r.json", json.dumps({"results": results}))
    preds = read_activitynet_results(path, LabelMap({"A": 0, "B": 1}))
    assert preds.unknown_labels == {"Z": 3, "Y": 1}
    assert preds.num_predictions == 2
    assert list(preds.detections) == ["v1", "v0"] and len(preds.detections["v0"]) == 0
    det = preds.detections["v1"]
    assert det.scores.tolist() == [0.9, 0.7] and det.labels.tolist() == [0, 1]
    assert det.segments.data.tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_results_round_trip_gives_identical_arrays(tmp_path):
    rng = np.random.default_rng(0)
    label_map = LabelMap({"x": 3, "y": 7, "z": 11})
    dets = []
    for i in range(5):
        n = int(rng.integers(0, 40))
        segs = np.sort(rng.uniform(0, 300, (n, 2)), axis=1)
        # ties in score and exact duplicates must survive in order
        scores = np.round(rng.uniform(size=n), 1)
        dets.append(Detections(f"vid{i}", Segments(segs), scores, rng.choice([3, 7, 11], size=n)))
    torch_det = Detections("torch_vid", Segments(torch.tensor([[0.5, 1.25], [2.0, 2.0]])), torch.tensor([0.3, 0.3]), torch.tensor([7, 3]))
    path = tmp_path / "preds.json"
    write_activitynet_results(path, [*dets, torch_det], label_map, external_data={"used": True, "details": "k600"})
    raw = json.loads(path.read_text())
    assert raw["version"] == "VERSION 1.3" and raw["external_data"] == {"used": True, "details": "k600"}
    assert all(set(row) == {"label", "score", "segment"} for rows in raw["results"].values() for row in rows)
    preds = read_activitynet_results(path, label_map)
    assert list(preds.detections) == [d.video_id for d in dets] + ["torch_vid"]
    for det in [*dets, torch_det.to_numpy()]:
        got = preds.detections[det.video_id]
        for a, b in ((got.segments.data, det.segments.data), (got.scores, det.scores), (got.labels, det.labels)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["preds.json"]  # no temporary file left behind


def test_results_writer_refuses_bad_detections_and_keeps_old_file(tmp_path):
    label_map = LabelMap({"a": 0})
    path = tmp_path / "preds.json"
    write_activitynet_results(path, [Detections("v", Segments([[0, 1]]), [0.5], [0])], label_map)
    before = path.read_text()
    with pytest.raises(ValueError, match="given twice"):
        write_activitynet_results(path, [Detections.empty("v"), Detections.empty("v")], label_map)
    with pytest.raises(ValueError, match="steps"):
        write_activitynet_results(path, [Detections("v", Segments([[0, 1]], Unit.STEPS), [0.5], [0])], label_map)
    with pytest.raises(ValueError, match="non-finite"):
        write_activitynet_results(path, [Detections("v", Segments([[0, 1]]), [np.nan], [0])], label_map)
    with pytest.raises(UnknownLabelError, match="unknown label id 5"):
        write_activitynet_results(path, [Detections("v", Segments([[0, 1]]), [0.5], [5])], label_map)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["preds.json"]
    assert json.loads(before)["external_data"] == {"used": False, "details": ""}


def test_read_video_classification(data):
    scores = read_video_classification(ANET / "sample_classification_prediction.json")
    assert len(scores) == 4926
    assert scores["wONwHYy59Tc"] == {"Blow-drying hair": 1.0}
    assert sum(len(v) == 2 for v in scores.values()) == 7


# --- THUMOS14 --------------------------------------------------------------------------------
THUMOS_CLASSES = [
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving", "CricketBowling", "CricketShot",
    "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow", "HighJump", "JavelinThrow", "LongJump", "PoleVault",
    "Shotput", "SoccerPenalty", "TennisSwing", "ThrowDiscus", "VolleyballSpiking",
]


def test_thumos14_json_counts(thumos_json):
    assert len(thumos_json) == 412 and thumos_json.num_instances == 6365
    assert len(thumos_json.subset("Validation")) == 200 and len(thumos_json.subset("test")) == 212
    assert thumos_json.label_map.to_dict() == {name: i for i, name in enumerate(THUMOS_CLASSES)}
    video = thumos_json["video_test_0000004"]
    assert (video.duration, video.fps, video.subset) == (33.83, 30.0, "Test")
    assert video.segments.data[0].tolist() == [0.2, 1.1] and video.labels[0] == 5


def test_thumos14_txt_label_ids_equal_actionformer(thumos_txt, thumos_json):
    assert thumos_txt.label_map == thumos_json.label_map
    assert "Ambiguous" not in thumos_txt.label_map


@pytest.mark.parametrize("subset, name", [("val", "Validation"), ("test", "Test")])
def test_thumos14_txt_and_json_agree_segment_by_segment(thumos_txt, thumos_json, subset, name):
    txt = read_thumos14_txt(THUMOS / "original_annotations", subset=subset)
    assert txt.subsets == [name]
    js = thumos_json.subset(name)
    assert txt.num_instances == js.num_instances
    for video in js:
        assert sorted_rows(txt[video.video_id]) == sorted_rows(video), video.video_id
    # one test video has only Ambiguous segments: kept, with no ground truth
    extra = set(txt.videos) - set(js.videos)
    assert extra == ({"video_test_0001292"} if subset == "test" else set())
    for vid in extra:
        assert len(txt[vid]) == 0 and len(txt[vid].ambiguous) > 0


def test_thumos14_ambiguous_kept_apart(thumos_txt):
    counts = {s: sum(len(v.ambiguous) for v in thumos_txt.subset(s)) for s in ("Validation", "Test")}
    assert counts == {"Validation": 89, "Test": 99}
    assert thumos_txt.num_instances == 6365  # no ambiguous segment counted as ground truth
    video = thumos_txt["video_test_0001549"]  # last line of Ambiguous_test.txt
    assert [75.0, 100.2] in video.ambiguous.data.tolist()
    assert [75.0, 100.2] not in video.segments.data.tolist()


def test_thumos14_txt_subset_folder_and_durations(thumos_json):
    durations = {v.video_id: v.duration for v in thumos_json}
    txt = read_thumos14_txt(THUMOS / "original_annotations" / "annotations_test", durations=durations)
    assert txt.subsets == ["Test"] and len(txt) == 213
    assert txt["video_test_0000004"].duration == 33.83
    assert txt["video_test_0001292"].duration is None  # not in thumos14.json
    assert read_thumos14_txt(THUMOS / "original_annotations", subset="validation")["video_validation_0000266"].duration is None
    with pytest.raises(ValueError, match="unknown THUMOS14 subset 'train'"):
        read_thumos14_txt(THUMOS / "original_annotations", subset="train")


def test_thumos14_json_round_trip_keeps_ambiguous(thumos_txt, tmp_path):
    write_thumos14_json(tmp_path / "t.json", thumos_txt)
    again = read_thumos14_json(tmp_path / "t.json")
    assert again.label_map == thumos_txt.label_map and list(again.videos) == list(thumos_txt.videos)
    for video in thumos_txt:
        other = again[video.video_id]
        assert np.array_equal(other.segments.data, video.segments.data) and np.array_equal(other.labels, video.labels)
        assert np.array_equal(other.ambiguous.data, video.ambiguous.data)
        assert (other.subset, other.duration, other.fps) == (video.subset, None, None)


def test_thumos14_json_writer_writes_actionformer_fields(thumos_json, tmp_path):
    write_thumos14_json(tmp_path / "t.json", thumos_json)
    raw = json.loads((tmp_path / "t.json").read_text())["database"]["video_test_0000004"]
    assert (raw["subset"], raw["duration"], raw["fps"]) == ("Test", 33.83, 30.0)
    assert raw["annotations"][0] == {"label": "CricketBowling", "segment": [0.2, 1.1], "segment(frames)": [6.0, 33.0], "label_id": 5}
    assert "ambiguous" not in raw


# --- MultiTHUMOS -----------------------------------------------------------------------------
def test_multithumos(data):
    gt = read_multithumos(DATA / "multithumos" / "multithumos.json")
    assert (len(gt), len(gt.label_map), gt.num_instances) == (413, 65, 38690)
    assert gt.label_map.ids == list(range(1, 66))
    assert gt.label_map.name(1) == "class_01" and gt.label_map.name(65) == "class_65"
    assert sum(int((v.segments.lengths() == 0).sum()) for v in gt) == 7
    assert gt.subsets == ["testing", "training"]
    first = gt["video_test_0000896"]
    assert (first.labels[0], first.segments.data[0].tolist(), first.duration) == (12, [18.6, 24.8], 226.77)
    named = read_multithumos(DATA / "multithumos" / "multithumos.json", class_names=[f"action {i}" for i in range(65)])
    assert named.label_map.id("action 0") == 1 and np.array_equal(named["video_test_0000896"].labels, first.labels)
    with pytest.raises(ValueError, match="65 classes; class_names has 2"):
        read_multithumos(DATA / "multithumos" / "multithumos.json", class_names=["a", "b"])


# --- EPIC-Kitchens-100 -----------------------------------------------------------------------
def test_epic_kitchens_verbs_nouns_actions(data):
    csv_path = EPIC / "EPIC_100_validation.csv"
    verbs = read_epic_kitchens(csv_path)
    assert (verbs.num_instances, len(verbs)) == (9668, 138)
    assert len(verbs.label_map) == 78 and verbs.label_map.name(0) == "verb_0"
    assert verbs.subsets == ["validation"] and verbs["P01_11"].duration is None
    first = verbs["P01_11"]
    assert first.segments.data[:2].tolist() == [[0.0, 1.89], [1.56, 2.45]] and first.labels[:2].tolist() == [0, 1]

    kw = dict(verb_classes=EPIC / "EPIC_100_verb_classes.csv", noun_classes=EPIC / "EPIC_100_noun_classes.csv",
              video_info=EPIC / "EPIC_100_video_info.csv")
    named = read_epic_kitchens(csv_path, "verb", **kw)
    assert len(named.label_map) == 97 and named.label_map.name(1) == "put"
    assert np.array_equal(named["P01_11"].labels, first.labels)
    assert named["P01_11"].duration == 561.527633 and named["P01_11"].fps == pytest.approx(59.94, abs=1e-3)
    nouns = read_epic_kitchens(csv_path, "noun", **kw)
    assert len(nouns.label_map) == 300 and nouns["P01_11"].labels[0] == 2
    actions = read_epic_kitchens(csv_path, "action", **kw)
    assert len(actions.label_map) == 1352 and actions.num_instances == 9668
    assert actions.label_map.name(int(actions["P01_11"].labels[0])) == "take:plate"
    assert actions.label_map.names[:2] == ["take:tap", "take:spoon"]  # sorted (verb, noun) ids


@pytest.mark.parametrize("text, seconds", [
    ("00:01:02.50", 62.5), ("00:00:01.89", 1.89), ("00:00:00.560", 0.56), ("01:00:00", 3600.0), ("10:59:59.999", 39599.999),
])
def test_parse_timestamp(text, seconds):
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3", "00:61:00.00", "00:00:1.5", "00:00:01.", "aa:bb:cc", "-00:00:01.00", "00:00:01,50"])
def test_parse_timestamp_rejects(text):
    with pytest.raises(ValueError, match="bad timestamp.*HH:MM:SS"):
        parse_timestamp(text)


# --- auto-detection --------------------------------------------------------------------------
@pytest.mark.parametrize("relative, fmt, videos", [
    ("activitynet13/validation_ground_truth.json", "activitynet", 4926),
    ("eval_cases/mmaction2_two_videos/ground_truth.json", "activitynet", 2),
    ("thumos14/thumos14.json", "thumos14_json", 412),
    ("thumos14/original_annotations", "thumos14_txt", 413),
    ("multithumos/multithumos.json", "multithumos", 413),
    ("epic_kitchens_100/EPIC_100_validation.csv", "epic_kitchens", 138),
])
def test_read_annotations_detects_every_format(data, relative, fmt, videos):
    path = DATA / relative
    if path.suffix == ".json":
        assert detect_format(json.loads(path.read_text())) == fmt
    detected = read_annotations(path)
    assert (len(detected), detected.format) == (videos, fmt)
    assert len(read_annotations(path, format=fmt)) == videos


def test_read_annotations_refuses_results_and_unknown(tmp_path):
    with pytest.raises(AnnotationFormatError, match="results .*read_activitynet_results"):
        read_annotations(write(tmp_path / "r.json", '{"results": {}}'))
    with pytest.raises(AnnotationFormatError, match="unknown annotation format") as e:
        read_annotations(write(tmp_path / "x.json", '{"videos": [1, 2]}'))
    assert e.value.path == str(tmp_path / "x.json")
    with pytest.raises(AnnotationFormatError, match="unknown annotation format.*JSON list"):
        read_annotations(write(tmp_path / "l.json", "[1, 2]"))
    with pytest.raises(ValueError, match="unknown annotation format 'kinetics'"):
        read_annotations(tmp_path / "x.json", format="kinetics")


# --- malformed files -------------------------------------------------------------------------
def _thumos(annotations: list, vid: str = "video_test_0000004") -> str:
    return json.dumps({"version": "t", "database": {vid: {"subset": "Test", "duration": 10.0, "fps": 30.0, "annotations": annotations}}})


def _ann(segment, label="Diving", label_id=7) -> dict:
    return {"label": label, "segment": segment, "label_id": label_id}


def test_error_message_names_file_video_and_field(tmp_path):
    anns = [_ann([0, 1]), _ann([1, 2]), _ann([2, 3]), _ann([5, 2])]
    path = write(tmp_path / "thumos14.json", _thumos(anns))
    with pytest.raises(AnnotationFormatError) as e:
        read_thumos14_json(path)
    assert str(e.value) == (
        f"{path}: video 'video_test_0000004', field 'annotations[3].segment': "
        "expected [start, end] with start <= end, got [5.0, 2.0]"
    )
    assert (e.value.path, e.value.video_id, e.value.field) == (str(path), "video_test_0000004", "annotations[3].segment")
    assert isinstance(e.value, ValueError)
    copy = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries (Ray) intact
    assert str(copy) == str(e.value) and copy.field == e.value.field


# (format reader, file text, expected video, expected field, message fragment)
MALFORMED = {
    "not json": (read_activitynet, "hello", None, None, r"line 1: not valid JSON at column 1"),
    "truncated": (read_activitynet, '{\n "database": {\n  "a": {"annotations": [{"segment": [1,', None, None, r"line 3: not valid JSON.*truncated"),
    "empty": (read_activitynet, "", None, None, "empty"),
    "blank": (read_thumos14_json, " \n\n", None, None, "empty"),
    "missing annotations": (read_activitynet, '{"database": {"a": {"subset": "validation"}}}', "a", "annotations", "missing"),
    "missing segment": (read_activitynet, '{"database": {"a": {"annotations": [{"label": "x"}]}}}', "a", "annotations[0].segment", "missing"),
    "missing label": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": [1, 2]}]}}}', "a", "annotations[0].label", "missing"),
    "annotation not object": (read_activitynet, '{"database": {"a": {"annotations": [[1, 2]]}}}', "a", "annotations[0]", "expected an object"),
    "string segment": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": ["1", 2], "label": "x"}]}}}', "a", "annotations[0].segment", "numbers"),
    "null segment value": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": [1, null], "label": "x"}]}}}', "a", "annotations[0].segment", "numbers"),
    "nan segment": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": [NaN, 2], "label": "x"}]}}}', "a", "annotations[0].segment", "finite"),
    "inf segment": (read_thumos14_json, _thumos([_ann([0, 1]), _ann([0, float("inf")])]), "video_test_0000004", "annotations[1].segment", "finite"),
    "inverted": (read_activitynet, '{"a": {"annotations": [{"segment": [3, 2.5], "label": "x"}]}}', "a", "annotations[0].segment", r"start <= end, got \[3.0, 2.5\]"),
    "three values": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": [1, 2, 3], "label": "x"}]}}}', "a", "annotations[0].segment", r"\[start, end\], got \[1, 2, 3\]"),
    "one value": (read_thumos14_json, _thumos([_ann([0, 1]), _ann([4])]), "video_test_0000004", "annotations[1].segment", r"got \[4\]"),
    "scalar segment": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": 5, "label": "x"}]}}}', "a", "annotations[0].segment", "got 5"),
    "empty label": (read_activitynet, '{"database": {"a": {"annotations": [{"segment": [1, 2], "label": ""}]}}}', "a", "annotations[0].label", "non-empty label"),
    "negative duration": (read_activitynet, '{"database": {"a": {"duration": -1, "annotations": []}}}', "a", "duration", "non-negative"),
    "annotations not list": (read_activitynet, '{"database": {"a": {"annotations": {}}}}', "a", "annotations", "expected a list"),
    "database not object": (read_activitynet, '{"database": []}', None, "database", "expected an object"),
    "no database but metadata": (read_activitynet, '{"version": "1.3", "taxonomy": []}', None, "database", "missing 'database'"),
    "duplicate video": (read_activitynet, '{"database": {"a": {"annotations": []}, "a": {"annotations": []}}}', None, None, "'a' appears twice"),
    "label_id conflict": (read_thumos14_json, _thumos([_ann([0, 1]), _ann([1, 2], label_id=8)]), "video_test_0000004", "annotations[1].label_id",
                          "'Diving' has label_id 8 here but 7 in video 'video_test_0000004'"),
    "label_id shared": (read_thumos14_json, _thumos([_ann([0, 1]), _ann([1, 2], label="Shotput")]), "video_test_0000004", "annotations[1].label_id",
                        "label_id 7 is 'Shotput' here but 'Diving'"),
    "fractional label_id": (read_thumos14_json, _thumos([_ann([0, 1], label_id=1.5)]), "video_test_0000004", "annotations[0].label_id", "integer"),
    "missing label_id": (read_thumos14_json, _thumos([{"label": "Diving", "segment": [0, 1]}]), "video_test_0000004", "annotations[0].label_id", "missing"),
    "multithumos class 0": (read_multithumos, '{"v": {"actions": [[1, 0, 1], [0, 1, 2]]}}', "v", "actions[1][0]", r"1\.\.65, got 0"),
    "multithumos class 66": (read_multithumos, '{"v": {"actions": [[66, 0, 1]]}}', "v", "actions[0][0]", "got 66"),
    "multithumos short row": (read_multithumos, '{"v": {"actions": [[1, 0, 1], [2, 3]]}}', "v", "actions[1]", r"\[class_id, start, end\]"),
    "multithumos inverted": (read_multithumos, '{"v": {"actions": [[1, 4, 1]]}}', "v", "actions[0][1:]", "start <= end"),
    "multithumos missing actions": (read_multithumos, '{"v": {"duration": 3}}', "v", "actions", "missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_json(tmp_path, case):
    reader, text, video_id, field, fragment = MALFORMED[case]
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(AnnotationFormatError, match=fragment) as e:
        reader(path)
    assert (e.value.video_id, e.value.field) == (video_id, field)
    assert str(e.value).startswith(str(path))
    for part in (video_id, field):
        if part is not None:
            assert repr(part) in str(e.value)


def test_json_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "bad.json", '{\n  "database": {\n    "a": {"annotations": []},,\n  }\n}\n')
    with pytest.raises(AnnotationFormatError, match=r"bad.json, line 3: not valid JSON") as e:
        read_annotations(path)
    assert e.value.line == 3


@pytest.mark.parametrize("reader", [read_activitynet, read_thumos14_json, read_multithumos, read_annotations, read_video_classification])
def test_missing_file_names_path(tmp_path, reader):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        reader(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        read_thumos14_txt(tmp_path / "no_such_dir")


RESULTS_MALFORMED = {
    "missing results": ('{"version": "x"}', None, "results", "missing 'results'"),
    "ground truth given": ('{"database": {}}', None, "results", "looks like ground truth"),
    "string score": ('{"results": {"v": [{"label": "a", "score": "high", "segment": [0, 1]}]}}', "v", "predictions[0].score", 'got "high"'),
    "nan score": ('{"results": {"v": [{"label": "a", "score": 1, "segment": [0, 1]}, {"label": "a", "score": NaN, "segment": [0, 1]}]}}',
                  "v", "predictions[1].score", "finite"),
    "missing score": ('{"results": {"v": [{"label": "a", "segment": [0, 1]}]}}', "v", "predictions[0].score", "missing"),
    "inverted": ('{"results": {"v": [{"label": "a", "score": 1, "segment": [2, 1]}]}}', "v", "predictions[0].segment", "start <= end"),
    "numeric label": ('{"results": {"v": [{"label": 3, "score": 1, "segment": [0, 1]}]}}', "v", "predictions[0].label", "label name, got 3"),
    "not a list": ('{"results": {"v": {"label": "a"}}}', "v", "results", "expected a list"),
}


@pytest.mark.parametrize("case", list(RESULTS_MALFORMED))
def test_malformed_results(tmp_path, case):
    text, video_id, field, fragment = RESULTS_MALFORMED[case]
    path = write(tmp_path / "results.json", text)
    with pytest.raises(AnnotationFormatError, match=fragment) as e:
        read_activitynet_results(path, LabelMap({"a": 0}))
    assert (e.value.video_id, e.value.field) == (video_id, field)


def test_classification_label_twice(tmp_path):
    path = write(tmp_path / "c.json", '{"results": {"v": [{"label": "a", "score": 1}, {"label": "a", "score": 0.5}]}}')
    with pytest.raises(AnnotationFormatError, match="'a' is scored twice") as e:
        read_video_classification(path)
    assert e.value.field == "predictions[1].label"


EPIC_HEADER = "narration_id,video_id,start_timestamp,stop_timestamp,verb_class,noun_class\n"


@pytest.mark.parametrize("rows, line, field, fragment", [
    ("a,P01,00:00:01.00,00:00:02.00,0,1\nb,P01,00:00:03.00,00:0x:04.00,0,1\n", 3, "stop_timestamp", r"row 2: bad timestamp '00:0x:04.00'"),
    ("a,P01,00:00:05.00,00:00:02.00,0,1\n", 2, "stop_timestamp", "row 1: stop 00:00:02.00 is before start"),
    ("a,P01,00:00:01.00,00:00:02.00,zero,1\n", 2, "verb_class", "row 1: expected an integer class id"),
    ("a,P01,00:00:01.00,00:00:02.00\n", 2, None, "row 1 has 4 fields, the header 6"),
])
def test_malformed_epic_csv(tmp_path, rows, line, field, fragment):
    path = write(tmp_path / "epic.csv", EPIC_HEADER + rows)
    with pytest.raises(AnnotationFormatError, match=fragment) as e:
        read_epic_kitchens(path, "action")
    assert (e.value.line, e.value.field) == (line, field)
    assert f"line {line}" in str(e.value)


def test_epic_csv_missing_column_and_empty(tmp_path):
    with pytest.raises(AnnotationFormatError, match=r"missing column\(s\) \['noun_class'\]"):
        read_epic_kitchens(write(tmp_path / "e.csv", "video_id,start_timestamp,stop_timestamp,verb_class\n"), "noun")
    with pytest.raises(AnnotationFormatError, match="empty"):
        read_epic_kitchens(write(tmp_path / "empty.csv", ""))
    with pytest.raises(AnnotationFormatError, match="verb_class 5 is not in the verb class list"):
        read_epic_kitchens(write(tmp_path / "e2.csv", EPIC_HEADER + "a,P01,00:00:01.00,00:00:02.00,5,1\n"),
                           verb_classes=write(tmp_path / "verbs.csv", "id,key\n0,take\n"))


@pytest.mark.parametrize("line, fragment", [
    ("video_test_1 1.0", "expected 'video start end'"),
    ("video_test_1 1.0 abc", "numeric"),
    ("video_test_1 5.0 2.0", r"start <= end, got \[5.0, 2.0\]"),
    ("video_test_1 nan 2.0", "finite"),
])
def test_malformed_thumos14_txt(tmp_path, line, fragment):
    folder = tmp_path / "annotations_test"
    folder.mkdir()
    write(folder / "Diving_test.txt", "video_test_0 1.0 2.0\n\n" + line + "\n")
    write(folder / "Ambiguous_test.txt", "")  # an empty class file is allowed
    with pytest.raises(AnnotationFormatError, match=fragment) as e:
        read_thumos14_txt(tmp_path)
    assert e.value.line == 3 and e.value.path.endswith("Diving_test.txt")
    with pytest.raises(AnnotationFormatError, match="no <Class>_"):
        read_thumos14_txt(tmp_path / "annotations_test", subset="val")
