"""The one atomic writer: a reader sees the old file or the whole new one; a failure leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from pipelines.atomic import atomic_path, write_atomic, write_json_atomic


def test_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    write_atomic(target, b"old")
    write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="encoder died"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("encoder died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_json_refuses_nan_before_touching_the_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"mAP": 0.5}, indent=1)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomic(target, {"mAP": float("nan")})
    assert json.loads(target.read_text()) == {"mAP": 0.5} and target.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
