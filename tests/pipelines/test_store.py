import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.feature_import import export_features, import_features
from pipelines.store import (
    SCHEMA_VERSION,
    FeatureSequence,
    FeatureStore,
    PartWriter,
    Provenance,
    StoreError,
    check_table,
    to_table,
)
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation
from tal_models.timing import FeatureTiming

TIMING = FeatureTiming(fps=15, stride=4, window=4)


def provenance(dim=8, backbone="mobilenet_v2", fps=15.0):
    return Provenance(backbone, "w.pth", "ab" * 32, dim, fps, 4, 4, "{}")


def sequence(vid, steps=5, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(steps, dim)).astype(np.float32)
    return FeatureSequence(vid, x, TIMING, TIMING.centers(steps), duration=steps * 4 / 15, num_frames=steps * 4, native_fps=15.0, source=f"/v/{vid}.mp4")


def test_round_trip_keeps_features_timing_and_provenance(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    seqs = [sequence("a", 5), sequence("b", 1, seed=1), sequence("c", 12, seed=2)]
    store.write_part(seqs[:2], provenance())
    store.write_part(seqs[2:], provenance())
    back = store.read_all()
    assert sorted(back) == ["a", "b", "c"]
    for s in seqs:
        r = back[s.video_id]
        np.testing.assert_array_equal(r.features, s.features)
        np.testing.assert_array_equal(r.timestamps, TIMING.centers(len(s.features)))
        assert r.timing == TIMING and r.duration == s.duration and r.source == s.source
    assert store.provenance == provenance()
    assert store.status().done == {vid: p for vid, p in store.status().done.items()} and len(store.part_paths()) == 2


def test_parts_without_manifest_and_temp_files_are_never_read(tmp_path):
    store = FeatureStore(str(tmp_path))
    store.write_part([sequence("a")], provenance())
    # An orphan part (its writer died before the manifest) and a half-written temp file.
    pq.write_table(to_table([sequence("ghost")], provenance()), tmp_path / "part-orphan.parquet")
    (tmp_path / ".tmp-123-part-x.parquet").write_bytes(b"PAR1 half")
    (tmp_path / "_manifest" / ".tmp-9-part-y.json").write_text("{")
    assert list(store.read_all()) == ["a"]


def test_other_backbone_or_schema_is_refused(tmp_path):
    store = FeatureStore(str(tmp_path))
    store.write_part([sequence("a")], provenance())
    with pytest.raises(StoreError, match="backbone: 'mobilenet_v2' vs 'resnet50'"):
        store.check_compatible(provenance(backbone="resnet50"))
    with pytest.raises(StoreError, match="fps"):
        store.check_compatible(provenance(fps=30.0))
    store.check_compatible(provenance())  # same settings: fine
    table = to_table([sequence("a")], provenance())
    old = table.set_column(table.schema.get_field_index("schema_version"), "schema_version", pa.array([SCHEMA_VERSION + 1], pa.int32()))
    with pytest.raises(StoreError, match="schema version"):
        check_table(old, "x.parquet")
    with pytest.raises(StoreError, match="not a feature-store part"):
        check_table(pa.table({"video_id": ["a"]}), "y.parquet")
    with pytest.raises(StoreError, match="dimension 8, the store 16"):
        to_table([sequence("a")], provenance(dim=16))


def test_feature_sequence_rejects_nan_and_bad_shapes():
    x = np.zeros((3, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="not finite .*step 1"):
        FeatureSequence("v", x, TIMING, TIMING.centers(3), 1.0)
    with pytest.raises(ValueError, match=r"\[T, C\]"):
        FeatureSequence("v", np.zeros(3, np.float32), TIMING, TIMING.centers(3), 1.0)
    with pytest.raises(ValueError, match="3 feature steps but 2 timestamps"):
        FeatureSequence("v", np.zeros((3, 4), np.float32), TIMING, TIMING.centers(2), 1.0)


def test_failures_are_recorded_until_a_rerun_succeeds(tmp_path):
    store = FeatureStore(str(tmp_path))
    store.record_failures([{"video_id": "a", "source": "/v/a.mp4", "reason": "truncated", "message": "cut"}])
    assert store.status().failed["a"]["reason"] == "truncated" and not store.status().done
    store.write_part([sequence("a")], provenance())
    status = store.status()
    assert "a" in status.done and "a" not in status.failed


def test_part_writer_coalesces_by_size(tmp_path):
    store = FeatureStore(str(tmp_path))
    writer = PartWriter(store, provenance(), target_bytes=3 * 5 * 8 * 4)  # three 5x8 float32 sequences per part
    for i in range(7):
        writer.add(sequence(f"v{i}", 5, seed=i))
    writer.flush()
    assert len(writer.parts) == 3 and len(store.read_all()) == 7


def test_store_on_s3_round_trip(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3.endpoint_url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
        Bucket="store-bucket"
    )
    uri = "s3://store-bucket/features/run1"
    store = FeatureStore(uri, options={"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}, "key": "testing", "secret": "testing"})
    store.write_part([sequence("a"), sequence("b", 3, seed=4)], provenance())
    again = FeatureStore(uri, options=store.options)
    back = again.read_all()
    np.testing.assert_array_equal(back["b"].features, sequence("b", 3, seed=4).features)
    assert again.provenance == provenance()


def _annotations(durations):
    videos = {v: VideoAnnotation(v, Segments([[0.0, 1.0]]), [0], duration=d, subset="train") for v, d in durations.items()}
    return AnnotationSet(videos, LabelMap({"x": 0}))


def test_import_and_export_actionformer_layout(tmp_path):
    src = tmp_path / "npy"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {v: rng.normal(size=(n, 6)).astype(np.float32) for v, n in (("video_a", 10), ("video_b", 4))}
    for v, a in arrays.items():
        np.save(src / f"{v}.npy", a)
    np.save(src / "video_c.npy", np.zeros((5, 6), np.float32) * np.nan)
    np.save(src / "video_d.npy", np.zeros(5, np.float32))
    np.save(src / "not_annotated.npy", np.zeros((5, 6), np.float32))
    anns = _annotations({"video_a": 5.0, "video_b": 2.0, "video_c": 3.0, "video_d": 3.0, "video_e": 1.0})
    store_dir = str(tmp_path / "store")
    summary = import_features(str(src), anns, store_dir, fps=30, stride=4, window=16, backbone="i3d_rgb_flow")
    assert summary.imported == 2 and summary.missing == ["video_e"] and summary.unannotated == 1
    assert "NaN" in summary.rejected["video_c"] and "[T, C]" in summary.rejected["video_d"]
    store = FeatureStore(store_dir)
    back = store.read_all()
    np.testing.assert_array_equal(back["video_a"].features, arrays["video_a"])
    assert back["video_a"].timing == FeatureTiming(30, 4, 16) and back["video_a"].duration == 5.0
    assert store.provenance.backbone == "i3d_rgb_flow" and store.provenance.feature_dim == 6
    # Re-running imports nothing twice.
    again = import_features(str(src), anns, store_dir, fps=30, stride=4, window=16, backbone="i3d_rgb_flow")
    assert again.imported == 0 and again.skipped == 2
    # Export writes the same arrays back.
    out = tmp_path / "exported"
    assert export_features(store_dir, str(out)) == 2
    np.testing.assert_array_equal(np.load(out / "video_b.npy"), arrays["video_b"])
    meta = json.loads((out / "features.json").read_text())
    assert meta["provenance"]["fps"] == 30 and meta["videos"]["video_a"]["num_steps"] == 10


def test_import_refuses_mixed_dimensions(tmp_path):
    src = tmp_path / "npy"
    src.mkdir()
    np.save(src / "a.npy", np.zeros((3, 4), np.float32))
    np.save(src / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="disagree in dimension"):
        import_features(str(src), _annotations({"a": 1.0, "b": 1.0}), str(tmp_path / "s"), fps=30, stride=4, window=16)
