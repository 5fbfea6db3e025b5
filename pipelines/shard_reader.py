"""A training worker's shard of a feature store, read as it is needed under a memory budget.

A detector trains on random crops of whole sequences, so a worker needs every video of its shard
once per epoch, in an order drawn at the start of the epoch. ``ShardReader`` gives the shard as a
read-only mapping ``video_id -> FeatureSequence`` in one of two modes:

- **resident**: the shard's features (estimated from the part manifests' step counts) fit in
  ``cache_bytes``: the parts holding it are read once, up front, and kept (what training always
  did: ``FeatureStore.read_videos``);
- **streaming**: they do not: a video is read when it is asked for, as its part's row group
  (``FeatureStore.write_part`` writes row groups of ~4 MB; a store written before row groups were
  recorded in the manifests is indexed from each part's footer and ``video_id`` column, and may
  have one row group per part). Decoded row groups are kept in an LRU cache bounded by
  ``cache_bytes`` of features (a single row group larger than the budget is held while it is the
  newest). ``schedule(video_ids)`` announces the order of the coming reads (the epoch's shuffled
  order, which ``jobs.train`` draws before any crop): a background thread then reads ahead up to
  half the budget, so reading overlaps training, and what was read ahead is evicted last.

The data are the same in both modes, so training on a streamed shard is bit-identical to training
on a resident one: the reader never draws random numbers and never changes what is asked for.

For an S3 store, ``cache_dir`` adds a local disk cache of whole part files (downloaded once, then
read by row group from disk in later epochs). It holds at most the parts of this shard, within
``disk_cache_bytes`` when given, and never lets its file system's free space fall below 10 %: it
evicts its least recently used parts to make room and reads a part from S3 directly when even
that does not make room. Part files are never rewritten (their names are unique), so a cached
file can only be stale by being absent; workers on one machine may share a folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.atomic import is_local
from pipelines.store import FeatureSequence, FeatureStore, read_row_group

DEFAULT_MEMORY_FRACTION = 0.25  # of the machine's memory (or its cgroup limit), shared by the workers on it
MIN_FREE_DISK_FRACTION = 0.10  # the disk cache never leaves less free space than this on its file system

GroupKey = tuple[str, int]  # (part file name, row group index)


def memory_bytes() -> int:
    """The memory this process may use: physical memory, or the cgroup's limit when lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_cache_bytes(workers_on_machine: int = 1) -> int:
    """The default feature budget of one worker: ``DEFAULT_MEMORY_FRACTION`` of the machine's memory, split
    evenly among the ``workers_on_machine`` training workers that share it."""
    return int(DEFAULT_MEMORY_FRACTION * memory_bytes() / max(workers_on_machine, 1))


@dataclass
class ReaderStats:
    """What a ``ShardReader`` did so far. ``hits`` and ``misses`` count requests for a video (a miss waited for a
    read, its own or the read-ahead's); ``row_groups_read`` and ``bytes_read`` (decoded feature bytes) count reads."""

    hits: int = 0
    misses: int = 0
    row_groups_read: int = 0
    bytes_read: int = 0
    evictions: int = 0
    read_seconds: float = 0.0  # summed over the threads that read
    peak_cached_bytes: int = 0  # after evicting for each new row group


@dataclass
class _Entry:
    sequences: dict[str, FeatureSequence]
    nbytes: int


class ShardReader(Mapping[str, FeatureSequence]):
    """The sequences of ``video_ids`` in ``store``, read as needed within ``cache_bytes`` (see the module doc).

    ``prefetch_workers`` threads read ahead of a ``schedule``; 0 reads only when asked. Use as a context manager
    or call ``close`` to stop them (a process that just ends waits for the few reads under way)."""

    def __init__(
        self,
        store: FeatureStore,
        video_ids: Iterable[str],
        *,
        cache_bytes: int,
        cache_dir: str | os.PathLike | None = None,
        disk_cache_bytes: int | None = None,
        prefetch_workers: int = 1,
    ):
        if cache_bytes <= 0:
            raise ValueError(f"ShardReader: cache_bytes must be > 0, got {cache_bytes}")
        self.store = store
        self.video_ids = list(dict.fromkeys(video_ids))
        self.cache_bytes = int(cache_bytes)
        self.stats = ReaderStats()
        locations = store.locate(self.video_ids)
        row_bytes = store.provenance.feature_dim * 4
        steps = [locations[v].num_steps for v in self.video_ids]
        self.estimated_bytes = sum(n * row_bytes for n in steps) if None not in steps else None
        self.resident = self.estimated_bytes is not None and self.estimated_bytes <= self.cache_bytes
        self._resident: dict[str, FeatureSequence] = {}
        self._executor: ThreadPoolExecutor | None = None
        if self.resident:
            started = time.perf_counter()
            self._resident = store.read_videos(self.video_ids)
            self.stats.read_seconds = time.perf_counter() - started
            self.stats.bytes_read = self.stats.peak_cached_bytes = sum(s.features.nbytes for s in self._resident.values())
            return

        self._disk = PartFileCache(cache_dir, store, disk_cache_bytes) if cache_dir is not None and not is_local(store.fs) else None
        self._metadata: dict[str, pq.FileMetaData] = {}  # parts' footers, read once
        self._group: dict[str, GroupKey] = {}
        unrecorded: set[str] = set()
        for vid in self.video_ids:
            loc = locations[vid]
            if loc.row_group is None:
                unrecorded.add(loc.part)
            else:
                self._group[vid] = (loc.part, loc.row_group)
        for part in sorted(unrecorded):  # an older store: its row groups from each part's footer and id column
            with self._open(part) as f:
                for index in range(f.num_row_groups):
                    for vid in f.read_row_group(index, columns=["video_id"]).column("video_id").to_pylist():
                        if vid in locations and locations[vid].part == part:
                            self._group[vid] = (part, index)
        self._members: dict[GroupKey, set[str]] = {}
        for vid, key in self._group.items():
            self._members.setdefault(key, set()).add(vid)
        # a row group's wanted bytes (its videos' steps unknown: counted as the whole budget, read ahead one at a time)
        self._group_bytes = {
            key: self.cache_bytes
            if any(locations[v].num_steps is None for v in vids)
            else sum(locations[v].num_steps * row_bytes for v in vids)
            for key, vids in self._members.items()
        }
        self._cache: OrderedDict[GroupKey, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[GroupKey, Future] = {}
        self._lock = threading.Lock()
        self._plan: list[GroupKey] = []
        self._cursor = 0
        self._ahead: set[GroupKey] = set()  # the scheduled row groups within the read-ahead: evicted last
        self.lookahead_bytes = self.cache_bytes // 2
        if prefetch_workers > 0:
            self._executor = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="shard-prefetch")

    # --- the mapping ---------------------------------------------------------------------------
    def __getitem__(self, video_id: str) -> FeatureSequence:
        if self.resident:
            return self._resident[video_id]
        key = self._group[video_id]  # KeyError for a video outside the shard, as a dict
        with self._lock:
            if self._cursor < len(self._plan) and self._plan[self._cursor] == key:
                self._cursor += 1
        sequences = self._load(key, count=True)
        self._read_ahead()
        return sequences[video_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.video_ids)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __contains__(self, video_id: object) -> bool:
        return video_id in (self._resident if self.resident else self._group)

    def schedule(self, video_ids: Sequence[str]) -> None:
        """The order in which the videos will be asked for next (replacing any earlier schedule): reading ahead
        follows it. Asking in another order is allowed and only loses the read-ahead."""
        if self.resident:
            return
        with self._lock:
            self._plan = [self._group[v] for v in video_ids]
            self._cursor = 0
        self._read_ahead()

    @property
    def cached_bytes(self) -> int:
        return sum(s.features.nbytes for s in self._resident.values()) if self.resident else self._cached_bytes

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- reading -------------------------------------------------------------------------------
    def _read_ahead(self) -> None:
        """Start reading the scheduled row groups within ``lookahead_bytes`` of the next request (at least the next)."""
        if self._executor is None:
            return
        with self._lock:
            ahead, seen, todo = 0, set(), []
            for key in self._plan[self._cursor :]:
                if key in seen:
                    continue
                if seen and ahead + self._group_bytes[key] > self.lookahead_bytes:
                    break
                seen.add(key)
                ahead += self._group_bytes[key]
                if key not in self._cache and key not in self._inflight:
                    todo.append(key)
            self._ahead = seen
        for key in todo:
            self._executor.submit(self._load, key, count=False)

    def _load(self, key: GroupKey, *, count: bool) -> dict[str, FeatureSequence]:
        """The wanted sequences of row group ``key``: from the cache, from a read under way, or read now."""
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.stats.hits += count
                return entry.sequences
            self.stats.misses += count
            pending = self._inflight.get(key)
            owner = pending is None
            if owner:
                pending = self._inflight[key] = Future()
        if not owner:
            return pending.result()  # raises what the other read raised
        try:
            started = time.perf_counter()
            sequences = self._read_group(key)
            seconds = time.perf_counter() - started
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            pending.set_exception(exc)
            raise
        nbytes = sum(s.features.nbytes for s in sequences.values())
        with self._lock:
            self._insert(key, _Entry(sequences, nbytes))
            del self._inflight[key]
            self.stats.row_groups_read += 1
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += seconds
        pending.set_result(sequences)
        return sequences

    def _insert(self, key: GroupKey, entry: _Entry) -> None:
        """Add ``entry`` as the most recent and evict the least recent others beyond the budget, those that are
        about to be asked for (read ahead) last (lock held)."""
        self._cache[key] = entry
        self._cached_bytes += entry.nbytes
        for protect in (True, False):
            for old in [k for k in self._cache if k != key and not (protect and k in self._ahead)]:  # least recent first
                if self._cached_bytes <= self.cache_bytes:
                    break
                self._cached_bytes -= self._cache.pop(old).nbytes
                self.stats.evictions += 1
        self.stats.peak_cached_bytes = max(self.stats.peak_cached_bytes, self._cached_bytes)

    def _read_group(self, key: GroupKey) -> dict[str, FeatureSequence]:
        part, index = key
        wanted = self._members[key]
        with self._open(part) as f:
            sequences = read_row_group(f, index, f"{self.store.uri}/{part}")
        kept = {s.video_id: s for s in sequences if s.video_id in wanted}
        if len(kept) < len(sequences):  # other shards' rows: copy ours out so their buffer is freed
            kept = {vid: replace(s, features=s.features.copy()) for vid, s in kept.items()}
        return kept

    def _open(self, part: str) -> pq.ParquetFile:
        metadata = self._metadata.get(part)
        f = None
        local = self._disk.local_path(part) if self._disk is not None else None
        if local is not None:
            try:
                f = pq.ParquetFile(local, metadata=metadata)
            except FileNotFoundError:  # evicted just now by another worker sharing the folder
                f = None
        if f is None:
            f = self.store.open_part(part, metadata)
        self._metadata.setdefault(part, f.metadata)
        return f


class PartFileCache:
    """Whole part files of an S3 ``store`` in a local folder (``directory/<hash of the store URI>/``), bounded as
    the module doc says. ``local_path(part)`` is the cached file, downloaded first if needed, or ``None`` when
    there is no room for it."""

    def __init__(self, directory: str | os.PathLike, store: FeatureStore, max_bytes: int | None = None):
        self.root = Path(directory) / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.max_bytes = max_bytes
        self.downloads = 0
        self._lock = threading.Lock()  # one download at a time per process: the second asker then finds the file

    def local_path(self, part: str) -> str | None:
        path = self.root / part
        if self._touch(path):  # without the lock: a cached part need not wait for another part's download
            return str(path)
        with self._lock:
            if self._touch(path):
                return str(path)
            size = self.store.fs.size(f"{self.store.path}/{part}")
            if not self._make_room(size):
                return None
            tmp = self.root / f".tmp-{uuid.uuid4().hex}-{part}"
            try:
                self.store.fs.get_file(f"{self.store.path}/{part}", str(tmp))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self.downloads += 1
            return str(path)

    @staticmethod
    def _touch(path: Path) -> bool:
        """Mark a cached file as just used (the eviction order); False when it is not there."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        files = []
        for p in self.root.iterdir():
            if p.is_file() and not p.name.startswith(".tmp-"):
                files.append(p)
        return files

    def _make_room(self, size: int) -> bool:
        """Evict least recently used parts until ``size`` more bytes fit; False when they cannot."""

        def fits(files: list[Path]) -> bool:
            usage = shutil.disk_usage(self.root)
            within_budget = self.max_bytes is None or sum(p.stat().st_size for p in files) + size <= self.max_bytes
            return within_budget and usage.free - size >= MIN_FREE_DISK_FRACTION * usage.total

        files = sorted(self._files(), key=lambda p: p.stat().st_mtime)
        while not fits(files):
            if not files:
                return False
            files.pop(0).unlink(missing_ok=True)  # another worker sharing the folder may be reading it: Linux keeps it
        return True
