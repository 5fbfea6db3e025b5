"""Published features in, published layout out: ActionFormer/OpenTAD ``<video_id>.npy`` ``[T, C]``.

``import_features`` turns a folder of per-video ``.npy`` files (e.g. THUMOS14 I3D features) into
a feature store, with the timing the user states (``fps``, ``stride``, ``window``) and durations
from the annotations, so training can start without extraction. ``export_features`` writes a
store back into that layout.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.atomic import write_atomic
from pipelines.store import FeatureSequence, FeatureStore, PartWriter, Provenance, filesystem_for
from tal_models.structures import AnnotationSet
from tal_models.timing import FeatureTiming


@dataclass
class ImportSummary:
    store: str
    imported: int = 0
    skipped: int = 0  # already in the store
    missing: list[str] = field(default_factory=list)  # annotated videos without a feature file
    rejected: dict[str, str] = field(default_factory=dict)  # video -> why
    unannotated: int = 0  # feature files of videos the annotations do not name (ignored)

    def format(self) -> str:
        lines = [
            f"feature store  {self.store}",
            f"videos         {self.imported} imported, {self.skipped} already there, {len(self.missing)} without features, "
            f"{len(self.rejected)} rejected, {self.unannotated} feature files not in the annotations (ignored)",
        ]
        lines += [f"rejected       {vid}: {why}" for vid, why in list(self.rejected.items())[:10]]
        if self.missing:
            lines.append(f"missing        e.g. {', '.join(self.missing[:5])}")
        return "\n".join(lines)


def import_features(
    features_dir: str,
    annotations: AnnotationSet,
    out: str,
    *,
    fps: float,
    stride: int,
    window: int,
    backbone: str = "imported",
    transpose: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ImportSummary:
    """Import ``<video_id>.npy`` files (``[T, C]``; ``transpose`` for ``[C, T]``) of the annotated videos.

    The provenance's weights hash is the sha256 of the sorted file names and sizes (the files'
    origin is the user's to state in ``backbone``); every file must share one feature dimension.
    """
    timing = FeatureTiming(fps, stride, window)
    fs, root = filesystem_for(features_dir, storage_options)
    files = {name.rsplit("/", 1)[-1][: -len(".npy")]: name for name in fs.glob(f"{root}/*.npy")}
    if not files:
        raise FileNotFoundError(f"no .npy feature files in {features_dir}")
    store = FeatureStore(out, options=storage_options)
    summary = ImportSummary(store=out)
    summary.unannotated = sum(1 for v in files if annotations.resolve(v) is None)
    done = store.status().done
    arrays: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    digest = hashlib.sha256()
    for video in annotations:
        name = next((files[c] for c in (video.video_id, video.video_id.removeprefix("v_"), "v_" + video.video_id) if c in files), None)
        if name is None:
            summary.missing.append(video.video_id)
            continue
        if video.video_id in done:
            summary.skipped += 1
            continue
        with fs.open(name, "rb") as f:
            data = f.read()
        digest.update(f"{name.rsplit('/', 1)[-1]}:{len(data)};".encode())
        try:
            x = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            summary.rejected[video.video_id] = f"not a plain .npy array ({e})"
            continue
        x = x.T if transpose else x
        if x.ndim != 2 or x.shape[0] == 0:
            summary.rejected[video.video_id] = f"expected [T, C], got shape {x.shape}" + ("" if transpose else " (use --transpose for [C, T])")
            continue
        if not np.isfinite(x).all():
            summary.rejected[video.video_id] = "contains NaN or inf"
            continue
        arrays[video.video_id] = x.astype(np.float32, copy=False)
        sources[video.video_id] = name
    dims = {a.shape[1] for a in arrays.values()}
    if len(dims) > 1:
        by_dim = {d: next(v for v, a in arrays.items() if a.shape[1] == d) for d in dims}
        raise ValueError(f"feature files disagree in dimension: {', '.join(f'{d} (e.g. {v})' for d, v in by_dim.items())}")
    if not arrays:
        return summary
    provenance = Provenance(
        backbone=backbone,
        backbone_weights=f"imported from {features_dir}",
        backbone_sha256=digest.hexdigest(),
        feature_dim=dims.pop(),
        fps=float(fps),
        stride=int(stride),
        window=int(window),
        extract_config=json.dumps({"imported_from": features_dir, "transpose": transpose}),
    )
    existing = store.status().provenance
    if existing is not None:  # a re-run adds to the same import: keep its hash, check the rest
        provenance = Provenance(**{**provenance.to_dict(), "backbone_sha256": existing.backbone_sha256, "backbone_weights": existing.backbone_weights})
    store.check_compatible(provenance)
    writer = PartWriter(store, provenance)
    for vid, x in arrays.items():
        video = annotations[vid]
        duration = video.duration if video.duration is not None else float(timing.step_to_seconds(x.shape[0] - 1) + timing.window / (2 * fps))
        writer.add(FeatureSequence(vid, x, timing, timing.centers(x.shape[0]), duration, source=sources[vid]))
        summary.imported += 1
    writer.flush()
    return summary


def export_features(store_uri: str, out_dir: str, *, storage_options: dict[str, Any] | None = None) -> int:
    """Write every video of a store as ``out_dir/<video_id>.npy`` (``[T, C]`` float32) plus
    ``out_dir/features.json`` with the timing and provenance. Returns the number of videos."""
    store = FeatureStore(store_uri, options=storage_options)
    fs, root = filesystem_for(out_dir, storage_options)
    fs.makedirs(root, exist_ok=True)
    timing: dict[str, dict[str, float]] = {}
    n = 0
    for seq in store:
        buf = io.BytesIO()
        np.save(buf, seq.features)
        write_atomic(f"{root}/{seq.video_id}.npy", buf.getvalue(), fs)
        timing[seq.video_id] = {"duration": seq.duration, "num_steps": int(seq.features.shape[0]), "offset": seq.timing.offset}
        n += 1
    meta = {"provenance": store.provenance.to_dict(), "videos": timing}
    write_atomic(f"{root}/features.json", (json.dumps(meta, indent=2) + "\n").encode(), fs)
    return n
