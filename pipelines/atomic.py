"""Atomic writes, local or S3: a reader sees the old file (or none) or the whole new one, never half.

Locally the bytes go to a temporary file in the target's folder (same filesystem), are flushed to
disk, then ``os.replace`` the target; the temporary file is removed if anything fails. On S3 (any
non-local fsspec filesystem) one PUT is already atomic: the object appears once the upload is done.
Every writer of the platform goes through here: feature-store parts and manifests, annotation and
results JSON, metrics, checkpoints.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (an encoder, ``savefig``):
    once the block succeeds the file is flushed to disk and replaces ``path``; if it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_atomic(path: str | os.PathLike, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write ``data`` to ``path`` (a local path, or a path of ``fs``, e.g. ``bucket/key`` of an S3 filesystem)."""
    path = os.fspath(path)
    if fs is not None and not is_local(fs):
        fs.pipe_file(path, data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """``obj`` as JSON text (newline-terminated) through ``write_atomic``. NaN and infinity are refused: they are not JSON."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    write_atomic(path, text.encode("utf-8"), fs)
