"""``ShardReader``: a store shard resident or streamed by row group within a byte budget, local and on (moto) S3."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipelines.store
from pipelines.shard_reader import ShardReader, default_cache_bytes, memory_bytes
from pipelines.store import FeatureSequence, FeatureStore, Provenance, StoreError, row_groups_by_bytes
from tal_models.timing import FeatureTiming

TIMING = FeatureTiming(fps=15, stride=4, window=4)
DIM = 8
ROW = DIM * 4  # bytes per feature step


def _provenance():
    return Provenance("synthetic", "w.pth", "ab" * 32, DIM, 15.0, 4, 4, "{}")


def _sequence(vid: str, steps: int, seed: int) -> FeatureSequence:
    x = np.random.default_rng(seed).normal(size=(steps, DIM)).astype(np.float32)
    return FeatureSequence(vid, x, TIMING, TIMING.centers(steps), duration=steps * 4 / 15)


def _store(root, monkeypatch, videos=12, group_bytes=3 * 20 * ROW, options=None) -> tuple[FeatureStore, dict[str, FeatureSequence]]:
    """Two parts of 20..39-step videos, in row groups of at most ``group_bytes`` of features."""
    monkeypatch.setattr(pipelines.store, "ROW_GROUP_TARGET_BYTES", group_bytes)
    store = FeatureStore(str(root), options=options)
    seqs = {f"v{i:02d}": _sequence(f"v{i:02d}", 20 + i, i) for i in range(videos)}
    values = list(seqs.values())
    store.write_part(values[: videos // 2], _provenance())
    store.write_part(values[videos // 2 :], _provenance())
    return store, seqs


def _assert_same(a: FeatureSequence, b: FeatureSequence) -> None:
    assert a.video_id == b.video_id and a.timing == b.timing and a.duration == b.duration
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)


def test_row_groups_are_cut_by_bytes_and_recorded_in_the_manifest(tmp_path, monkeypatch):
    assert row_groups_by_bytes([4, 4, 4, 9, 1, 1], 8) == [2, 1, 1, 2]  # a row larger than the target is a group of its own
    assert row_groups_by_bytes([], 8) == []
    store, seqs = _store(tmp_path, monkeypatch)
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "_manifest").glob("part-*.json"))]
    for m in manifests:
        f = pq.ParquetFile(tmp_path / m["part"])
        groups = [f.read_row_group(i, columns=["video_id"]).column("video_id").to_pylist() for i in range(f.num_row_groups)]
        assert f.num_row_groups > 1 and [g for g in m["row_groups"]] == [i for i, ids in enumerate(groups) for _ in ids]
        assert [vid for ids in groups for vid in ids] == m["videos"]
    locations = store.locate(["v00", "v11"])
    assert locations["v00"].row_group == 0 and locations["v11"].num_steps == 31
    assert store.part_row_groups(locations["v11"].part)[locations["v11"].row_group][-1] == "v11"
    back = store.read_all()  # whole-part reads are unchanged
    for vid, s in seqs.items():
        _assert_same(back[vid], s)
    with pytest.raises(StoreError, match="holds no features for 1"):
        store.locate(["v00", "nope"])


def test_a_shard_that_fits_is_read_once_and_kept(tmp_path, monkeypatch):
    store, seqs = _store(tmp_path, monkeypatch)
    ids = ["v01", "v04", "v09"]
    with ShardReader(store, ids, cache_bytes=10**6) as reader:
        assert reader.resident and reader.estimated_bytes == sum(seqs[v].features.nbytes for v in ids)
        assert list(reader) == ids and len(reader) == 3 and "v04" in reader and "v02" not in reader
        for vid in ids:
            _assert_same(reader[vid], seqs[vid])
        reader.schedule(ids)  # nothing to read ahead
        assert reader.stats.bytes_read == reader.estimated_bytes == reader.cached_bytes


@pytest.mark.parametrize("prefetch_workers", [0, 1])
def test_a_larger_shard_is_streamed_within_the_budget(tmp_path, monkeypatch, prefetch_workers):
    store, seqs = _store(tmp_path, monkeypatch)
    ids = [f"v{i:02d}" for i in range(0, 12, 2)]  # one of two ranks: its row groups also hold the other's videos
    budget = 2 * 31 * ROW  # two of the largest videos of the shard
    order = [ids[j] for j in np.random.default_rng(0).permutation(len(ids))] * 2
    with ShardReader(store, ids, cache_bytes=budget, prefetch_workers=prefetch_workers) as reader:
        assert not reader.resident and reader.estimated_bytes > budget
        reader.schedule(order)
        for vid in order:
            seq = reader[vid]
            _assert_same(seq, seqs[vid])
            assert seq.features.base is None or seq.features.base.nbytes <= budget  # another rank's rows are not kept
            assert reader.cached_bytes <= budget
        stats = reader.stats
        assert stats.evictions > 0 and stats.peak_cached_bytes <= budget
        assert stats.hits + stats.misses == len(order)
        assert stats.row_groups_read >= len({store.locate([v])[v].row_group for v in ids})
        with pytest.raises(KeyError):
            reader["v01"]  # the other rank's


def test_reading_ahead_follows_the_schedule(tmp_path, monkeypatch):
    store, seqs = _store(tmp_path, monkeypatch, group_bytes=1)  # one video per row group
    ids = sorted(seqs)
    with ShardReader(store, ids, cache_bytes=4 * 31 * ROW) as reader:
        reader.schedule(["v07", "v03"])
        deadline = time.monotonic() + 10
        while reader.stats.row_groups_read < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.stats.row_groups_read >= 1  # read before it was asked for
        _assert_same(reader["v07"], seqs["v07"])
        _assert_same(reader["v03"], seqs["v03"])
        assert reader.stats.hits >= 1 and reader.stats.row_groups_read == 2  # nothing read twice


def test_concurrent_requests_for_one_row_group_read_it_once(tmp_path, monkeypatch):
    store, seqs = _store(tmp_path, monkeypatch, group_bytes=10**6)  # one row group per part
    reader = ShardReader(store, sorted(seqs), cache_bytes=12 * ROW * 20, prefetch_workers=0)
    original = reader._read_group

    def slow(key):
        time.sleep(0.2)
        return original(key)

    monkeypatch.setattr(reader, "_read_group", slow)
    got = {}
    threads = [threading.Thread(target=lambda v=v: got.setdefault(v, reader[v])) for v in ("v00", "v01", "v02")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.stats.row_groups_read == 1 and sorted(got) == ["v00", "v01", "v02"]


def test_a_store_without_recorded_row_groups_is_indexed_from_its_parts(tmp_path, monkeypatch):
    """Parts written before manifests recorded row groups: whole-part row groups, or several found in the footer."""
    for name, group_bytes in (("one_group", 10**9), ("groups", 20 * ROW)):
        store, seqs = _store(tmp_path / name, monkeypatch, group_bytes=group_bytes)
        for path in (tmp_path / name / "_manifest").glob("part-*.json"):
            m = json.loads(path.read_text())
            del m["row_groups"]
            path.write_text(json.dumps(m))
        assert store.locate(["v03"])["v03"].row_group is None
        ids = sorted(seqs)[1::2]
        with ShardReader(store, ids, cache_bytes=31 * ROW) as reader:
            assert not reader.resident
            for vid in reversed(ids):
                _assert_same(reader[vid], seqs[vid])


def test_a_broken_part_fails_the_request_that_needs_it(tmp_path, monkeypatch):
    store, seqs = _store(tmp_path, monkeypatch)
    reader = ShardReader(store, sorted(seqs), cache_bytes=ROW * 40)
    broken = store.locate(["v11"])["v11"].part
    (tmp_path / broken).write_bytes(b"not parquet")
    _assert_same(reader["v00"], seqs["v00"])
    with pytest.raises(Exception, match="Parquet magic bytes not found"):
        reader["v11"]
    reader.close()


def test_default_budget_splits_a_quarter_of_memory_among_workers():
    assert default_cache_bytes(1) == int(0.25 * memory_bytes())
    assert default_cache_bytes(4) == int(0.25 * memory_bytes() / 4)
    with pytest.raises(ValueError, match="cache_bytes must be > 0"):
        ShardReader(None, [], cache_bytes=0)


def test_streaming_from_s3_through_a_bounded_disk_cache(tmp_path, monkeypatch, moto_s3, s3_bucket):
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}, "key": "testing", "secret": "testing"}
    store, seqs = _store(f"s3://{s3_bucket('shards')}/store", monkeypatch, options=options)
    ids = sorted(seqs)
    parts = sorted({loc.part for loc in store.locate(ids).values()})
    order = ids[::-1] + ids
    # straight from S3: row groups by ranged reads
    with ShardReader(store, ids, cache_bytes=2 * 31 * ROW) as reader:
        for vid in order:
            _assert_same(reader[vid], seqs[vid])
    # through a disk cache with room for everything: each part downloaded once, then read from disk
    cache_dir = tmp_path / "parts"
    with ShardReader(store, ids, cache_bytes=2 * 31 * ROW, cache_dir=cache_dir) as reader:
        for vid in order:
            _assert_same(reader[vid], seqs[vid])
        assert reader._disk.downloads == 2 and sorted(p.name for p in reader._disk._files()) == parts
    with ShardReader(store, ids, cache_bytes=2 * 31 * ROW, cache_dir=cache_dir) as again:  # a later run (or worker)
        _assert_same(again["v05"], seqs["v05"])
        assert again._disk.downloads == 0
    # a disk budget of one part: the least recently used one makes room
    largest = max(moto_s3.fs.size(f"{store.path}/{p}") for p in parts)
    with ShardReader(
        store, ids, cache_bytes=2 * 31 * ROW, cache_dir=tmp_path / "small", disk_cache_bytes=largest, prefetch_workers=0
    ) as reader:
        for vid in order:
            _assert_same(reader[vid], seqs[vid])
            assert reader._disk.cached_bytes() <= largest
        assert reader._disk.downloads > 2
