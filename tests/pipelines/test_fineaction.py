"""FineAction ground truth: a small hand-written file, each malformation's located error, auto-detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.annotations import AnnotationFormatError, detect_format, read_annotations, read_fineaction


def _video(annotations: list, subset: str = "training", **extra) -> dict:
    return {"subset": subset, "duration": 20.0, "fps": 30.0, **extra, "annotations": annotations}


def _ann(segment, label="hammer throw: spin", label_id=3) -> dict:
    return {"label": label, "label_id": label_id, "segment": segment, "segment(frames)": [t * 30 for t in segment]}


VALID = {
    "version": "FineAction-v1.3",
    "database": {
        "v_00000001": _video([_ann([1.0, 2.5]), _ann([2.0, 4.0], "hammer throw: release", 7), _ann([2.0, 2.0])]),
        "v_00000002": {
            "subset": "validation",
            "duration": 12.5,
            "frame": 250,
            "annotations": [_ann([0.0, 12.5], "hammer throw: release", 7)],
        },
        "v_00000003": _video([], subset="testing"),
    },
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_valid_file(tmp_path):
    gt = read_fineaction(write(tmp_path / "annotations_gt.json", VALID))
    assert (len(gt), gt.num_instances, gt.format) == (3, 4, "fineaction")
    assert gt.label_map.to_dict() == {"hammer throw: spin": 3, "hammer throw: release": 7}  # the file's label_id
    a = gt["v_00000001"]
    np.testing.assert_array_equal(a.labels, [3, 7, 3])
    np.testing.assert_array_equal(a.segments.data, [[1.0, 2.5], [2.0, 4.0], [2.0, 2.0]])  # overlapping, zero-length kept
    assert (a.subset, a.duration, a.fps) == ("training", 20.0, 30.0)
    b = gt["00000002"]  # v_ prefix optional
    assert b.fps == pytest.approx(20.0)  # frame / duration where fps is absent
    assert gt.subsets == ["testing", "training", "validation"] and len(gt["v_00000003"]) == 0


def test_class_names_and_names_without_ids(tmp_path):
    path = write(tmp_path / "a.json", VALID)
    named = read_fineaction(path, class_names=["hammer throw: release", "hammer throw: spin", "unused"])
    np.testing.assert_array_equal(named["v_00000001"].labels, [1, 0, 1])  # category_idx.txt order, ids from 0
    with pytest.raises(AnnotationFormatError, match="'hammer throw: spin' is not one of the 1 class names") as e:
        read_fineaction(path, class_names=["hammer throw: release"])
    assert (e.value.video_id, e.value.field) == ("v_00000001", "annotations[0].label")
    plain = {"database": {"v": _video([{"label": "b", "segment": [0, 1]}, {"label": "a", "segment": [1, 2]}])}}
    gt = read_fineaction(write(tmp_path / "b.json", plain))
    assert gt.label_map.to_dict() == {"a": 0, "b": 1}  # sorted names, as ActivityNet


def test_auto_detection(tmp_path):
    path = write(tmp_path / "annotations_gt.json", VALID)
    assert detect_format(VALID) == "fineaction"
    assert read_annotations(path).format == "fineaction"
    unversioned = {"database": VALID["database"]}  # the ActionFormer-THUMOS layout: read as that, same content
    other = read_annotations(write(tmp_path / "u.json", unversioned))
    assert other.format == "thumos14_json" and other.num_instances == 4
    assert read_annotations(tmp_path / "u.json", format="fineaction").format == "fineaction"


# (file content, expected video, expected field, message fragment)
MALFORMED = {
    "label_id changes": (
        {"database": {"a": _video([_ann([0, 1])]), "b": _video([_ann([0, 1], label_id=4)])}},
        "b",
        "annotations[0].label_id",
        "'hammer throw: spin' has label_id 4 here but 3 in video 'a'",
    ),
    "label_id shared": (
        {"database": {"a": _video([_ann([0, 1]), _ann([1, 2], label="other")])}},
        "a",
        "annotations[1].label_id",
        "label_id 3 is 'other' here but 'hammer throw: spin'",
    ),
    "fractional label_id": (
        {"database": {"a": _video([_ann([0, 1], label_id=2.5)])}},
        "a",
        "annotations[0].label_id",
        "integer class id, got 2.5",
    ),
    "string label_id": ({"database": {"a": _video([_ann([0, 1], label_id="3")])}}, "a", "annotations[0].label_id", "expected a number"),
    "label_id in part of a video": (
        {"database": {"a": _video([_ann([0, 1]), {"label": "x", "segment": [1, 2]}])}},
        "a",
        "annotations[1].label_id",
        "missing",
    ),
    "label_id in other videos only": (
        {"database": {"a": _video([_ann([0, 1])]), "b": _video([{"label": "x", "segment": [1, 2]}])}},
        "b",
        "annotations[0].label_id",
        "no 'label_id' here but do in other videos",
    ),
    "inverted segment": ({"database": {"a": _video([_ann([0, 1]), _ann([5, 2])])}}, "a", "annotations[1].segment", "start <= end"),
    "missing segment": ({"database": {"a": _video([{"label": "x", "label_id": 1}])}}, "a", "annotations[0].segment", "missing"),
    "missing label": ({"database": {"a": _video([{"segment": [0, 1], "label_id": 1}])}}, "a", "annotations[0].label", "missing"),
    "missing annotations": ({"database": {"a": {"subset": "training", "duration": 3.0}}}, "a", "annotations", "missing"),
    "negative duration": ({"database": {"a": {**_video([]), "duration": -2}}}, "a", "duration", "non-negative"),
    "zero fps": ({"database": {"a": {**_video([]), "fps": 0}}}, "a", "fps", "positive"),
    "string frame": ({"database": {"a": _video([], frame="300")}}, "a", "frame", "non-negative number"),
    "subset not a string": ({"database": {"a": {**_video([]), "subset": 1}}}, "a", "subset", "expected a string"),
    "video not an object": ({"database": {"a": []}}, "a", None, "expected an object"),
    "no database": ({"version": "FineAction", "taxonomy": []}, None, "database", "missing 'database'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed(tmp_path, case):
    content, video_id, field, fragment = MALFORMED[case]
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(AnnotationFormatError, match=fragment) as e:
        read_fineaction(path)
    assert (e.value.video_id, e.value.field) == (video_id, field)
    assert str(e.value).startswith(str(path))
    for part in (video_id, field):
        if part is not None:
            assert repr(part) in str(e.value)
