"""``tal detect``: run a trained checkpoint on videos, in this process (no cluster, no server).

    --model -> checkpoint (read and checked before any video) -> the featurizer its provenance
            names, built once (the backbone, weights sha256 and sampling of ``tal extract``)
            -> per video: decode + featurize -> Detector.detect -> keep score >= threshold, top k
            -> timelines/<video>.png, failed.json, then results.json (each written atomically)

Exit codes: 0 every video detected; 3 some videos failed (each in failed.json with its reason)
and the others' detections were written; 2 nothing usable: no videos, a model that cannot run
on videos (e.g. trained on imported features), or not one video processed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jobs.errors import UsageError
from jobs.evaluate import open_model, safe_file_name
from jobs.export import RUNTIMES, ExportError, build_for_runtime
from jobs.inference import load_runtime_model
from pipelines.annotations import write_activitynet_results
from pipelines.atomic import write_json_atomic
from pipelines.backbones import Backbone
from pipelines.extract import (
    VIDEO_EXTENSIONS,
    FeaturizerUnavailable,
    SamplingConfig,
    VideoRef,
    build_featurizer,
    features_for_video,
    list_videos,
)
from pipelines.store import FeatureSequence, filesystem_for
from pipelines.video import VideoDecodeError
from pipelines.weights import WeightsNotFoundError
from tal_models.structures import Detections, LabelMap
from tal_models.text import is_open_vocabulary

EXIT_SOME_FAILED = 3
EXIT_NOTHING_USABLE = 2  # as jobs.cli.EXIT_BAD_INPUT
# Scores are per-class sigmoids after Soft-NMS, which keeps up to 200 detections per video down to
# 0.001: most of those are decayed duplicates. 0.1 keeps what a person would look at (and is what
# a timeline draws); for evaluation keep everything (--score-threshold 0, or tal evaluate --model).
DEFAULT_SCORE_THRESHOLD = 0.1
DEFAULT_TIMELINE_VIDEOS = 20
SHOWN_PER_VIDEO = 3  # detections per video in the printed summary
PRINTED_VIDEOS = 50  # videos in the printed summary (results.json has them all)


@dataclass(frozen=True)
class DetectRequest:
    videos: str  # a file, a directory (recursively), a glob, an s3:// prefix or a CSV manifest
    model: str  # models:/name@alias, models:/name/version, runs:/<id>/path, a path or an s3:// URI
    output: Path = Path("out/detect")
    score_threshold: float = DEFAULT_SCORE_THRESHOLD  # filters what is written, not what is computed
    top_k: int | None = None  # per video; None: all above the threshold
    device: str | None = None  # None: cuda when available
    backbone_weights: str | None = None  # None: where the extraction read them
    timeline_videos: int = DEFAULT_TIMELINE_VIDEOS
    storage_options: dict[str, Any] | None = None  # fsspec options for s3://
    progress: bool = True
    runtime: str = "torch"  # or onnx: the detector's dense part in ONNX Runtime (jobs.export), as many threads as torch's
    classes: tuple[str, ...] | None = None  # an open-vocabulary model: the class names to detect (None: its own)


@dataclass(frozen=True)
class VideoFailure:
    video_id: str
    source: str
    reason: str  # a VideoDecodeError reason (missing, empty, not_a_video, truncated, ...), too_short or error
    message: str  # the detail, without the source and reason


@dataclass(frozen=True)
class VideoResult:
    video_id: str
    source: str
    duration: float  # seconds
    detections: Detections  # kept (score >= threshold, top k), best first; seconds, labels index the checkpoint's
    num_computed: int  # what the model returned before the threshold and top k


@dataclass
class DetectReport:
    checkpoint: str  # the local file (or URI) the model was read from
    labels: list[str]
    featurizer: str  # one line: backbone, weights, sampling, device
    videos: list[VideoResult] = field(default_factory=list)
    failed: list[VideoFailure] = field(default_factory=list)
    seconds: float = 0.0
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def videos_per_second(self) -> float:
        return len(self.videos) / max(self.seconds, 1e-9)

    @property
    def exit_code(self) -> int:
        if not self.videos:
            return EXIT_NOTHING_USABLE
        return EXIT_SOME_FAILED if self.failed else 0


def run(request: DetectRequest) -> DetectReport:
    """Detect actions in ``request.videos`` with ``request.model`` and write the outputs (module doc).

    Refused before any video is decoded (``UsageError``): bad flag values, a checkpoint that
    cannot be read, one whose features cannot be recomputed (imported features, other weights),
    no videos. A video that fails is recorded with its reason and the others go on.
    """
    _check_flags(request)
    device = _device(request.device)
    checkpoint, checkpoint_uri = _open_model(request)
    videos = _list_videos(request)
    backbone, sampling = _featurizer(checkpoint, device, request)
    try:
        model = build_for_runtime(checkpoint, request.runtime, device, num_threads=torch.get_num_threads())
    except ExportError as e:
        raise UsageError(f"--model {request.model}: {e}") from None
    labels = list(checkpoint.labels)
    if request.classes is not None:
        model, labels = NamedClasses.open(model, checkpoint.config, request.classes, request.storage_options), list(request.classes)
    prov = checkpoint.provenance
    report = DetectReport(
        checkpoint=checkpoint_uri,
        labels=labels,
        featurizer=f"{prov.get('backbone')} ({backbone.weights_name}, sha256 {backbone.weights_sha256[:12]}...), "
        f"{sampling.fps or 'native'} fps, window {sampling.window}, stride {sampling.stride}, on {device}"
        + (f"; detector on ONNX Runtime ({torch.get_num_threads()} threads)" if request.runtime == "onnx" else ""),
    )

    started = time.perf_counter()
    with tqdm(videos, unit="video", desc="detect", disable=not request.progress) as bar:
        for ref in bar:
            outcome, _ = detect_video(backbone, sampling, model, ref, request.score_threshold, request.top_k, request.storage_options)
            (report.failed if isinstance(outcome, VideoFailure) else report.videos).append(outcome)
            bar.set_postfix(failed=len(report.failed))
    report.seconds = time.perf_counter() - started
    _write_outputs(report, request, LabelMap.from_names(labels))
    return report


@dataclass(frozen=True)
class NamedClasses:
    """An open-vocabulary model detecting the classes a user names (``--classes``): their text embeddings, made once
    by the model's own text encoder (``pipelines.vlm``), go with every ``detect``; labels index ``classes``."""

    model: Any
    embeddings: torch.Tensor  # [K', E]

    @classmethod
    def open(cls, model, config, classes: tuple[str, ...], storage_options: dict[str, Any] | None) -> NamedClasses:
        from pipelines.vlm import load_text_encoder, parse_class_names

        if not is_open_vocabulary(config):
            raise UsageError(f"--classes: this model ({config.arch}) detects its own classes only; an open-vocabulary one names them")
        try:
            names = parse_class_names(list(classes))
            text = load_text_encoder(config.text, storage_options)
        except (OSError, ValueError) as e:
            raise UsageError(f"--classes: {e}") from None
        device = next(model.parameters()).device
        return cls(model, torch.as_tensor(text.encode(names), device=device))

    def detect(self, features, timing=None, duration=None, video_id: str = "video") -> Detections:
        return self.model.detect(features, timing, duration, video_id, class_embeddings=self.embeddings)


def detect_video(
    backbone: Backbone,
    sampling: SamplingConfig,
    model,
    ref: VideoRef,
    score_threshold: float,
    top_k: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[VideoResult | VideoFailure, FeatureSequence | None]:
    """One video: decode + featurize -> detect -> keep. The result, or the failure with its reason;
    and the video's features when it had any (``tal detect --workers --features-out`` stores them).

    Never raises for a video: one broken video must not stop the others (``run``, the Ray actors of
    ``jobs.batch_detect``).
    """
    fs = filesystem_for(ref.uri, storage_options)[0] if ref.uri.startswith("s3://") else None
    try:
        seq = features_for_video(backbone, ref.uri, sampling, video_id=ref.video_id, filesystem=fs)
        if seq.features.shape[0] == 0:
            return VideoFailure(ref.video_id, ref.uri, "too_short", f"{seq.duration:.3f} s give no feature step"), None
        found = model.detect(seq.features, seq.timing, seq.duration, ref.video_id).to_numpy()
    except VideoDecodeError as e:
        return VideoFailure(ref.video_id, ref.uri, e.reason, e.detail), None
    except Exception as e:  # noqa: BLE001 - one broken video must not stop the others
        return VideoFailure(ref.video_id, ref.uri, "error", f"{type(e).__name__}: {e}"), None
    kept = keep_detections(found, score_threshold, top_k)
    return VideoResult(ref.video_id, ref.uri, float(seq.duration), kept, len(found)), seq


def keep_detections(detections: Detections, score_threshold: float, top_k: int | None = None) -> Detections:
    """The ``top_k`` best of ``detections`` scoring ``>= score_threshold``, best first."""
    d = detections.to_numpy().sorted_by_score()
    d = d[np.flatnonzero(d.scores >= score_threshold)]
    return d if top_k is None else d[np.arange(min(top_k, len(d)))]


def check_result_flags(score_threshold: float, top_k: int | None, timeline_videos: int) -> None:
    """The flags that shape what is written, in process and on Ray alike."""
    if not 0.0 <= score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must be in [0, 1] (scores are probabilities), got {score_threshold}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if timeline_videos < 0:
        raise UsageError(f"--timeline-videos must be >= 0, got {timeline_videos}")


def _check_flags(request: DetectRequest) -> None:
    check_result_flags(request.score_threshold, request.top_k, request.timeline_videos)
    if request.output.exists() and not request.output.is_dir():
        raise UsageError(f"--output {request.output} is a file; it names a directory (results.json, failed.json, timelines/)")


def _open_model(request: DetectRequest):
    """The checkpoint (or, with ``--runtime onnx``, an exported ``.onnx`` file too) and where it was read from."""
    if request.runtime not in RUNTIMES:
        raise UsageError(f"--runtime {request.runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if request.runtime == "torch":
        return open_model(request.model, request.storage_options)
    try:
        return load_runtime_model(request.model, request.storage_options)
    except FileNotFoundError as e:
        raise UsageError(f"--model {request.model}: no such file {e.filename or request.model}") from None
    except ValueError as e:  # CheckpointError, ExportError, registry errors
        raise UsageError(f"--model {request.model}: {e}") from None


def _device(requested: str | None) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {requested!r}: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {requested!r}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device is available here; use --device cpu")
    return str(device)


def _list_videos(request: DetectRequest):
    try:
        videos = list_videos(request.videos, request.storage_options)
    except ValueError as e:  # duplicate ids, a manifest without a uri column
        raise UsageError(str(e)) from None
    if not videos:
        raise UsageError(f"no videos in {request.videos} (looked for {', '.join(VIDEO_EXTENSIONS)})")
    return videos


def _featurizer(checkpoint, device: str, request: DetectRequest):
    """The backbone and sampling of the checkpoint's training features, or a ``UsageError`` saying why not."""
    try:
        return build_featurizer(checkpoint.provenance, device, weights=request.backbone_weights, storage_options=request.storage_options)
    except FeaturizerUnavailable as e:
        raise UsageError(f"--model {request.model} cannot run on videos: {e}") from None
    except WeightsNotFoundError as e:
        raise UsageError(f"{e}; or give --backbone-weights PATH") from None
    except ValueError as e:  # a recorded backbone config this version refuses, a corrupt weights file
        raise UsageError(f"--model {request.model}: cannot rebuild its backbone: {e}") from None


def _write_outputs(report: DetectReport, request: DetectRequest, label_map) -> None:
    """Timelines, failed.json, then results.json last: each atomic, so a reader never sees half a file."""
    out = request.output
    out.mkdir(parents=True, exist_ok=True)
    drawn = report.videos[: request.timeline_videos]
    if drawn:
        # Here, not at the top: importing jobs.plots switches matplotlib to Agg, which a notebook importing this module must not get.
        from jobs.plots import plot_timeline

        for v in drawn:
            path = out / "timelines" / f"{safe_file_name(v.video_id)}.png"
            plot_timeline(path, v.video_id, None, v.detections, label_map, v.duration, min_score=request.score_threshold)
        report.outputs["timelines"] = out / "timelines"
    report.outputs["failed"] = out / "failed.json"
    write_json_atomic(report.outputs["failed"], {"failed": [asdict(f) for f in report.failed]}, indent=2)
    report.outputs["results"] = out / "results.json"
    kept = f"score >= {request.score_threshold:g}" + (f", top {request.top_k} per video" if request.top_k else "")
    write_activitynet_results(
        report.outputs["results"],
        [v.detections for v in report.videos],
        label_map,
        external_data={"used": False, "details": f"tal detect, model {request.model}, {kept}"},
    )


def format_report(report: DetectReport, request: DetectRequest) -> str:
    rate = report.videos_per_second
    kept = f"score >= {request.score_threshold:g}" + (f", top {request.top_k} per video" if request.top_k else "")
    lines = [
        f"model       {request.model}"
        + (f" ({report.checkpoint})" if report.checkpoint != request.model else "")
        + f": {len(report.labels)} classes",
        f"featurizer  {report.featurizer}",
        f"videos      {len(report.videos) + len(report.failed)} in {request.videos}: {len(report.videos)} detected, "
        f"{len(report.failed)} failed, in {report.seconds:.1f} s ({rate:.2f} videos/s)",
        f"kept        {kept}: {sum(len(v.detections) for v in report.videos):,} of {sum(v.num_computed for v in report.videos):,} detections",
        "",
    ]
    width = min(max((len(v.video_id) for v in report.videos[:PRINTED_VIDEOS]), default=0), 40)
    for v in report.videos[:PRINTED_VIDEOS]:
        d = v.detections
        best = "  ".join(
            f"{report.labels[int(c)]} {s:.2f} [{a:.1f}, {b:.1f}] s"
            for c, s, (a, b) in zip(d.labels[:SHOWN_PER_VIDEO], d.scores[:SHOWN_PER_VIDEO], d.segments.data[:SHOWN_PER_VIDEO].tolist())
        )
        lines.append(f"  {v.video_id:<{width}}  {len(d):>4} detections" + (f"   {best}" if best else ""))
    if len(report.videos) > PRINTED_VIDEOS:
        lines.append(f"  ... and {len(report.videos) - PRINTED_VIDEOS} more videos (see results.json)")
    for f in report.failed[:10]:
        lines.append(f"failed      {f.video_id}: {f.reason}: {f.message}")
    if len(report.failed) > 10:
        lines.append(f"failed      ... and {len(report.failed) - 10} more (see failed.json)")
    lines.append("")
    for name, path in report.outputs.items():
        lines.append(f"  {name:<9} -> {path}")
    return "\n".join(lines)
