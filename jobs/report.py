"""``tal report``: one self-contained HTML file of what ``tal evaluate`` wrote.

The evaluation's ``metrics.json`` records its inputs (``"inputs"``: ground truth, predictions, tIoUs, subset...);
the report reads those files again and recomputes what it draws with ``tal_models.evaluation`` (the PR curves
are not in metrics.json), then checks that the recomputed mAP is the one metrics.json holds.

Sections, each an element with a stable id: ``#summary``, ``#metrics``, ``#pr-curves``, ``#per-class-ap``,
``#timelines`` and ``#error-analysis``. Figures are hand-made inline SVG; CSS is inline; nothing is fetched
and no script runs (``<details>`` folds the long parts). Every string from an input file (video ids, labels,
paths) goes through ``html.escape``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.errors import UsageError
from pipelines.annotations import AnnotationFormatError, read_activitynet_results, read_annotations
from pipelines.atomic import write_atomic
from tal_models.evaluation import DetectionMetrics, evaluate_detection
from tal_models.structures import AnnotationSet, Detections

SECTIONS = ("summary", "metrics", "pr-curves", "per-class-ap", "timelines", "error-analysis")
NO_ERROR_ANALYSIS = "no error analysis: run tal evaluate --diagnose"


class ReportError(UsageError):
    """An evaluation directory the report cannot use (no metrics.json, written before "inputs", a file gone)."""


@dataclass(frozen=True)
class EvaluationInputs:
    """What ``tal evaluate`` scored, as recorded in metrics.json's ``"inputs"``."""

    ground_truth: Path
    predictions: Path
    tiou: np.ndarray  # [T] the exact thresholds
    subset: str | None = None
    ignore_ambiguous: bool = False
    top_k: tuple[int, ...] = (1, 5)
    model: str | None = None  # with --model: the model reference
    class_agnostic: str | None = None  # with --model of a class-agnostic detector: every annotated class became this one

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: Path) -> EvaluationInputs:
        try:
            return cls(
                ground_truth=Path(d["ground_truth"]),
                predictions=Path(d["predictions"]),
                tiou=np.asarray(d["tiou"], np.float64).reshape(-1),
                subset=d.get("subset"),
                ignore_ambiguous=bool(d.get("ignore_ambiguous", False)),
                top_k=tuple(int(k) for k in d.get("top_k", (1, 5))),
                model=d.get("model"),
                class_agnostic=d.get("class_agnostic"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ReportError(f'{where}: malformed "inputs" ({type(e).__name__}: {e}); re-run tal evaluate') from None


@dataclass(frozen=True)
class Evaluation:
    """An evaluation recomputed from its recorded inputs: the scoped ground truth, the detections under its video ids."""

    metrics_file: Path
    recorded: dict  # metrics.json as written
    inputs: EvaluationInputs
    ground_truth: AnnotationSet  # the videos evaluated (subset applied)
    detections: dict[str, Detections]  # ground-truth video id -> detections
    metrics: DetectionMetrics  # recomputed, with the PR curves
    scored_truth: AnnotationSet  # what evaluate_detection was given (with scored_subset), as tal evaluate gave it
    scored_subset: str | None
    predictions: dict[str, Detections]  # as read, under the ids of the predictions file


def metrics_file_of(source: str | Path) -> Path:
    """``source``'s metrics JSON: ``source/metrics.json`` for a directory, ``source`` itself for a file."""
    source = Path(source)
    if source.is_dir():
        path = source / "metrics.json"
        if not path.exists():
            raise ReportError(f"{source} has no metrics.json: give the --output of tal evaluate (a directory or a metrics JSON file)")
        return path
    if not source.exists():
        raise ReportError(f"no such evaluation directory or metrics file: {source}")
    return source


def load_evaluation(source: str | Path) -> Evaluation:
    """Read ``source`` (an evaluation directory or a metrics JSON file), its recorded ground truth and predictions, and
    evaluate again with the PR curves kept. ``ReportError`` for anything missing or malformed."""
    metrics_file = metrics_file_of(source)
    recorded = _json_object(metrics_file, "metrics")
    if "tiou" not in recorded or "mAP" not in recorded:
        raise ReportError(f"{metrics_file}: not the metrics of a detection evaluation (no tiou / mAP); the report is for detectors")
    if "inputs" not in recorded:
        raise ReportError(f"{metrics_file} was written before tal evaluate recorded its inputs: re-run tal evaluate, then tal report")
    inputs = EvaluationInputs.from_dict(recorded["inputs"], metrics_file)
    for what, path in (("ground truth", inputs.ground_truth), ("predictions", inputs.predictions)):
        if not path.exists():
            raise ReportError(f"the {what} file of this evaluation is gone: {path} (recorded in {metrics_file})")
    try:
        truth = read_annotations(inputs.ground_truth)
        if inputs.class_agnostic is not None:
            truth = truth.class_agnostic(inputs.class_agnostic)
        predictions = read_activitynet_results(inputs.predictions, truth.label_map).detections
        scoped = truth.subset(inputs.subset) if inputs.subset is not None else truth
    except AnnotationFormatError as e:
        raise ReportError(str(e).splitlines()[0]) from None
    except ValueError as e:  # a subset that is no longer in the ground truth
        raise ReportError(f"{inputs.ground_truth}: {e}") from None
    if inputs.model is not None:  # --model evaluated only the videos it found in the store: those of predictions.json
        scoped = replace(scoped, videos={vid: v for vid, v in scoped.videos.items() if vid in predictions})
    scored, scored_subset = (truth, inputs.subset) if inputs.model is None else (scoped, None)  # as tal evaluate scored them
    metrics = evaluate_detection(
        scored,
        predictions,
        inputs.tiou,
        subset=scored_subset,
        ignore_ambiguous=inputs.ignore_ambiguous,
        top_k=inputs.top_k,
        keep_curves=True,
    )
    detections: dict[str, Detections] = {}
    for vid, d in predictions.items():
        resolved = scoped.resolve(vid)
        if resolved is not None:
            detections[resolved] = Detections.cat([detections[resolved], d]) if resolved in detections else d
    return Evaluation(metrics_file, recorded, inputs, scoped, detections, metrics, scored, scored_subset, predictions)


def build_report(source: Path, *, output: Path | None = None, max_videos: int = 30, title: str | None = None) -> Path:
    """Write the HTML report of the evaluation at ``source`` and return its path.

    ``source``: an evaluation directory (holding metrics.json: ``tal evaluate --model --output DIR``) or a metrics
    JSON file (``tal evaluate --predictions ... --output FILE``). ``output``: the HTML file (default: report.html in
    the directory, or beside the metrics file). ``max_videos``: timelines drawn, the videos of lowest AP first.
    ``title``: the page's heading (default: the model or predictions file). The error analysis is read from
    ``diagnosis.json`` beside metrics.json when ``tal evaluate --diagnose`` wrote one, else diagnosed here.
    """
    if max_videos < 0:
        raise ReportError(f"--videos must be >= 0, got {max_videos}")
    evaluation = load_evaluation(source)
    output = Path(output) if output is not None else evaluation.metrics_file.parent / "report.html"
    diagnosis, svgs = _error_analysis_inputs(evaluation)
    page = render_report(evaluation, max_videos=max_videos, title=title, diagnosis=diagnosis, svgs=svgs)
    write_atomic(output, page.encode("utf-8"))
    return output


def _error_analysis_inputs(evaluation: Evaluation) -> tuple[dict | None, dict[str, str] | None]:
    """The error analysis and its figures: diagnosis.json beside metrics.json (``tal evaluate --diagnose``), else
    ``diagnose`` run here on the same inputs."""
    path = evaluation.metrics_file.parent / "diagnosis.json"
    if not path.exists():
        return _diagnose(evaluation)
    diagnosis = _json_object(path, "diagnosis")
    from jobs.diagnosis import diagnosis_svgs  # not at the top: it switches matplotlib to Agg
    from tal_models.evaluation.diagnosis import Diagnosis

    try:
        return diagnosis, diagnosis_svgs(Diagnosis.from_dict(diagnosis))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a diagnosis.json of another version: the tables still show
        return {**diagnosis, "figures_error": f"{type(e).__name__}: {e}"}, None


def _json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a {what} JSON object")
    return data


def _diagnose(evaluation: Evaluation) -> tuple[dict, dict[str, str]]:
    """``tal_models.evaluation.diagnosis.diagnose`` of the evaluation, as ``tal evaluate --diagnose`` runs it."""
    from jobs.diagnosis import diagnosis_svgs
    from jobs.evaluate import THUMOS_LIKE
    from tal_models.evaluation.diagnosis import diagnose

    bins = "thumos14" if evaluation.recorded.get("ground_truth_format") in THUMOS_LIKE else "activitynet"
    inputs = evaluation.inputs
    diagnosis = diagnose(
        evaluation.scored_truth, evaluation.predictions, inputs.tiou, subset=evaluation.scored_subset,
        ignore_ambiguous=inputs.ignore_ambiguous, bins=bins,
    )  # fmt: skip
    return diagnosis.to_dict(), diagnosis_svgs(diagnosis)


# --- the page ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dl.summary dt{font-weight:600}
dl.summary dd{margin:0;overflow-wrap:anywhere} .warning{background:#fff3cd;border:1px solid #e0c36a;padding:.5em}
.note{color:#666;font-size:.9em} svg{max-width:100%;height:auto;display:block;margin:.4em 0}
details{margin:.4em 0} summary{cursor:pointer} figure{margin:.6em 0 1.2em} figcaption{font-size:.9em;color:#444}
"""


def render_report(
    evaluation: Evaluation,
    *,
    max_videos: int = 30,
    title: str | None = None,
    diagnosis: Mapping[str, Any] | None = None,
    svgs: Mapping[str, str] | None = None,
) -> str:
    """The HTML page (a string) of ``evaluation``."""
    inputs = evaluation.inputs
    heading = title or f"Evaluation of {inputs.model or inputs.predictions.name}"
    body = [
        f"<h1>{_e(heading)}</h1>",
        '<p class="note">Written by <code>tal report</code>. Self-contained: no network, no script.</p>',
        summary_section(evaluation),
        metrics_section(evaluation),
        pr_curves_section(evaluation.metrics),
        per_class_section(evaluation),
        timelines_section(evaluation, max_videos),
        error_analysis_section(diagnosis, svgs),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(heading)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def summary_section(evaluation: Evaluation) -> str:
    inputs, m, recorded = evaluation.inputs, evaluation.metrics, evaluation.recorded
    evaluated = dt.datetime.fromtimestamp(evaluation.metrics_file.stat().st_mtime, dt.UTC)
    rows = []
    if inputs.model is not None:
        checkpoint = recorded.get("model")
        rows.append(("model", inputs.model + (f" ({checkpoint})" if checkpoint and checkpoint != inputs.model else "")))
    rows += [
        ("predictions", str(inputs.predictions)),
        ("ground truth", f"{inputs.ground_truth} ({recorded.get('ground_truth_format', 'unknown format')})"),
        ("subset", inputs.subset or "all"),
        ("videos", f"{len(evaluation.ground_truth):,}"),
        ("ground-truth instances", f"{m.num_ground_truth:,} of {len(m.class_names)} classes"),
        (
            "predictions evaluated",
            f"{m.num_predictions:,}" + (f" ({m.num_ignored_predictions:,} ignored)" if m.num_ignored_predictions else ""),
        ),
        ("tIoU thresholds", " ".join(f"{t:g}" for t in m.tiou)),
        ("ambiguous segments", "false positives on them ignored" if inputs.ignore_ambiguous else "not ignored"),
        ("evaluated", f"{evaluated:%Y-%m-%d %H:%M} UTC ({evaluation.metrics_file})"),
        ("report written", f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    items += f'<dt>average mAP</dt><dd><strong id="average-map" data-value="{m.average_mAP!r}">{_pct(m.average_mAP)}</strong></dd>'
    notes = []
    if m.unknown_videos:
        notes.append(
            f"{len(m.unknown_videos)} predicted videos are not in the ground truth (false positives), e.g. {m.unknown_videos[0]!r}"
        )
    unknown_labels = recorded.get("unknown_labels") or {}
    if unknown_labels:
        notes.append(f"{sum(unknown_labels.values()):,} predictions have labels not in the ground truth (dropped)")
    notes += [str(n) for n in recorded.get("notes", [])]
    notes_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    return f'<section id="summary">\n<h2>Summary</h2>\n<dl class="summary">{items}</dl>{notes_html}{_consistency_warning(evaluation)}\n</section>'


def _consistency_warning(evaluation: Evaluation) -> str:
    """A visible warning when the recomputed mAP is not the one metrics.json holds (a file changed since)."""
    recorded = np.asarray(evaluation.recorded.get("mAP", []), np.float64)
    mine = evaluation.metrics.mAP
    if recorded.shape == mine.shape and np.allclose(recorded, mine, rtol=0, atol=1e-9):
        return ""
    return (
        '<p class="warning">The mAP recomputed from the recorded files differs from metrics.json: the ground truth or the '
        "predictions changed since tal evaluate ran. This report shows the recomputed figures.</p>"
    )


def metrics_section(evaluation: Evaluation) -> str:
    m = evaluation.metrics
    header = "<tr><th>tIoU</th><th>mAP (%)</th>" + "".join(f"<th>R@{k}x (%)</th>" for k in m.recall_at_k) + "</tr>"
    rows = []
    for i, t in enumerate(m.tiou):
        recalls = "".join(_num(r[i], cls="recall") for r in m.recall_at_k.values())
        rows.append(f'<tr data-tiou="{t!r}"><td class="num">{t:g}</td>{_num(m.mAP[i], cls="map")}{recalls}</tr>')
    rows.append(
        f'<tr class="average"><th>average</th>{_num(m.average_mAP, cls="average-map")}' + "<td></td>" * len(m.recall_at_k) + "</tr>"
    )
    table = f'<table id="metric-table">{header}{"".join(rows)}</table>'
    proposals = evaluation.recorded.get("proposals")
    extra = ""
    if isinstance(proposals, dict) and proposals:
        cells = "".join(f"<th>{_e(k)}</th>" for k in proposals)
        values = "".join(_num(v) if isinstance(v, (int, float)) else f"<td>{_e(v)}</td>" for v in proposals.values())
        extra = f'<h3>Proposals (class-agnostic)</h3><table id="proposal-table"><tr>{cells}</tr><tr>{values}</tr></table>'
    return (
        '<section id="metrics">\n<h2>Metrics</h2>\n'
        '<p class="note">mAP: mean over classes of the interpolated AP; Recall@k x: share of instances found among the top k x n '
        "predictions of their class in their video (n its instances there).</p>"
        f"{table}{extra}\n</section>"
    )


def pr_curves_section(m: DetectionMetrics) -> str:
    from jobs.plots import RECALL_GRID, interpolated_pr  # not at the top: it switches matplotlib to Agg

    mean_pr = np.zeros((len(m.tiou), len(RECALL_GRID)))
    for name in m.class_names:
        if name in m.curves:
            mean_pr += interpolated_pr(*m.curves[name])
    mean_pr /= max(len(m.class_names), 1)
    colours = [_viridis(x) for x in np.linspace(0, 0.9, len(m.tiou))]
    series = [(RECALL_GRID, mean_pr[t], colours[t], f"tIoU {thr:g}  mAP {_pct(m.mAP[t])}%") for t, thr in enumerate(m.tiou)]
    svg = _line_chart(series, x_label="recall", y_label="precision (interpolated, mean over classes)", svg_id="pr-chart")
    return (
        '<section id="pr-curves">\n<h2>Precision / recall</h2>\n<figure>'
        f"{svg}<figcaption>Interpolated precision at each recall, averaged over the {len(m.class_names)} classes, one curve per "
        f"tIoU threshold (average mAP {_pct(m.average_mAP)}%).</figcaption></figure>\n</section>"
    )


def per_class_section(evaluation: Evaluation) -> str:
    m = evaluation.metrics
    gt_count = _count_by_class(evaluation.ground_truth, (v.labels for v in evaluation.ground_truth))
    pred_count = _count_by_class(evaluation.ground_truth, (d.labels for d in evaluation.detections.values()))
    mean = m.ap.mean(axis=0) if m.ap.shape[1] else np.zeros(0)
    order = np.argsort(-mean, kind="stable")
    header = "<tr><th>#</th><th>class</th><th>instances</th><th>predictions</th>" + "".join(f"<th>AP@{t:g}</th>" for t in m.tiou)
    header += "<th>mean AP (%)</th></tr>"
    rows = []
    for rank, k in enumerate(order, 1):
        name = m.class_names[k]
        aps = "".join(_num(a) for a in m.ap[:, k])
        rows.append(
            f'<tr class="class-row" data-class="{_e(name)}"><td class="num">{rank}</td><td>{_e(name)}</td>'
            f'<td class="num">{gt_count.get(name, 0):,}</td><td class="num">{pred_count.get(name, 0):,}</td>{aps}{_num(mean[k])}</tr>'
        )
    table = f'<table id="per-class-table">{header}{"".join(rows)}</table>'
    bars = _bar_chart([(m.class_names[k], float(mean[k]), gt_count.get(m.class_names[k], 0)) for k in order])
    return (
        '<section id="per-class-ap">\n<h2>Per-class AP</h2>\n'
        f"<figure>{bars}<figcaption>AP (%) averaged over the tIoU thresholds, best first; the number after each bar is the "
        "class's ground-truth instances.</figcaption></figure>"
        f"<details><summary>Table: AP per class and tIoU ({len(order)} classes)</summary>{table}</details>\n</section>"
    )


def _count_by_class(truth: AnnotationSet, label_arrays) -> dict[str, int]:
    counts: dict[str, int] = {}
    for labels in label_arrays:
        for c, n in zip(*np.unique(np.asarray(labels, np.int64), return_counts=True)):
            name = truth.label_map.name(int(c))
            counts[name] = counts.get(name, 0) + int(n)
    return counts


def timelines_section(evaluation: Evaluation, max_videos: int) -> str:
    """The ``max_videos`` videos of lowest AP (at tIoU 0.5, else the middle threshold) first; videos without
    ground truth come after every video with some."""
    from jobs.plots import shown_detections, timeline_summary

    tiou = evaluation.metrics.tiou
    at = 0.5 if 0.5 in np.round(tiou, 6) else float(tiou[len(tiou) // 2])
    truth = evaluation.ground_truth
    ranked = []
    for i, video in enumerate(truth):
        dets = evaluation.detections.get(video.video_id, Detections.empty(video.video_id)).to_numpy()
        if len(video.labels) == 0:
            key = (1, -len(dets), 0, i)
        else:
            one = AnnotationSet({video.video_id: video}, truth.label_map)
            key = (0, float(evaluate_detection(one, {video.video_id: dets}, [at], top_k=()).mAP[0]), -len(video.labels), i)
        ranked.append((key, video, dets))
    ranked.sort(key=lambda r: r[0])
    figures = []
    for _, video, dets in ranked[:max_videos]:
        shown = shown_detections(dets)
        line = timeline_summary(video, dets, shown, truth.label_map, at)
        svg = _timeline_svg(video, shown, truth.label_map)
        figures.append(
            f'<figure class="timeline" data-video="{_e(video.video_id)}"><figcaption><strong>{_e(video.video_id)}</strong> '
            f"({len(video.labels)} ground-truth segments, {len(dets)} detections): {_e(line)}</figcaption>{svg}</figure>"
        )
    shown_note = (
        f"the {len(figures)} videos of lowest AP@{at:g} of {len(truth):,}"
        if len(figures) < len(truth)
        else f"all {len(truth):,} videos, lowest AP@{at:g} first"
    )
    return (
        '<section id="timelines">\n<h2>Timelines</h2>\n'
        f'<p class="note">Per video: time across, one lane per class; ground truth as solid bars (upper half), the top 20 '
        f"detections with score &ge; 0.1 as bars whose opacity is the score (lower half). Shown: {_e(shown_note)}.</p>"
        + "".join(figures)
        + "\n</section>"
    )


# --- the error analysis (DETAD) ----------------------------------------------------------------


def error_analysis_section(diagnosis: Mapping[str, Any] | None, svgs: Mapping[str, str] | None = None) -> str:
    """``#error-analysis`` from ``Diagnosis.to_dict()`` (``diagnosis.json``) and, when given, the figures of
    ``jobs.diagnosis.diagnosis_svgs`` (keys false_positives, false_negatives, sensitivity); without a diagnosis a
    line saying how to get one."""
    if diagnosis is None:
        return f'<section id="error-analysis">\n<h2>Error analysis</h2>\n<p class="note">{_e(NO_ERROR_ANALYSIS)}</p>\n</section>'
    svgs = svgs or {}
    parts = [
        '<section id="error-analysis">\n<h2>Error analysis</h2>',
        f'<p class="note">DETAD-style diagnosis at tIoU {_e(" ".join(f"{t:g}" for t in np.ravel(diagnosis.get("tiou", []))))}: '
        f"{_e(diagnosis.get('num_ground_truth', '?'))} ground-truth instances, {_e(diagnosis.get('num_predictions', '?'))} predictions, "
        f"the top {_e(diagnosis.get('limit_factor', '?'))} &times; G predictions analysed; average mAP "
        f"{_pct(diagnosis['average_mAP']) if isinstance(diagnosis.get('average_mAP'), (int, float)) else '?'}%.</p>",
    ]
    if diagnosis.get("figures_error"):
        parts.append(f'<p class="warning">The figures could not be drawn from diagnosis.json ({_e(diagnosis["figures_error"])}).</p>')
    fp = diagnosis.get("false_positives") or {}
    base = diagnosis.get("normalized_average_mAP")
    normalized = f" (from {_pct(base)}%)" if isinstance(base, (int, float)) and np.isfinite(base) else ""
    if fp:
        types = list(fp.get("types", []))
        top_k = list(fp.get("top_k", []))
        breakdown = fp.get("breakdown", {})
        header = (
            "<tr><th>type</th>"
            + "".join(f"<th>{_e(k)}G (%)</th>" for k in top_k)
            + "<th>mAP<sub>N</sub> gain if removed (points)</th></tr>"
        )
        rows = []
        for t in types:
            fractions = breakdown.get(t, [])
            gain = fp.get("removed_gain", {}).get(t)
            rows.append(
                f'<tr data-type="{_e(t)}"><td>{_e(t)}</td>' + "".join(_num(f) for f in fractions)
                + (_num(gain) if isinstance(gain, (int, float)) else "<td></td>") + "</tr>"
            )  # fmt: skip
        parts.append(
            '<h3>False positives</h3><p class="note">Share of each type among the predictions of each class ranked in the band '
            "kG (((k-1)G, kG], G the class's instances), averaged over the tIoUs, and the average-mAP<sub>N</sub> gain when the "
            f"predictions of that error type are removed{normalized}.</p>"
            f'<table id="fp-table">{header}{"".join(rows)}</table>' + _inline_svg(svgs.get("false_positives"), "fp")
        )
    fn = diagnosis.get("false_negatives") or {}
    if fn:
        tables = []
        for characteristic, d in fn.items():
            if not isinstance(d, Mapping):
                continue
            bins = list(d.get("bins", []))
            head = "".join(f"<th>{_e(b)}</th>" for b in bins)
            rate = "".join(_num(r) for r in d.get("rate", []))
            count = "".join(f'<td class="num">{_e(c)}</td>' for c in d.get("count", []))
            tables.append(
                f'<table class="fn-table" data-characteristic="{_e(characteristic)}"><tr><th>{_e(characteristic)}</th>{head}</tr>'
                f"<tr><th>missed (%)</th>{rate}</tr><tr><th>instances</th>{count}</tr></table>"
            )
        overall = fn.get("overall_rate")
        parts.append(
            '<h3>False negatives</h3><p class="note">Share of the ground truth missed, by characteristic of the instance'
            + (f" (overall {_pct(overall)}%)" if isinstance(overall, (int, float)) else "") + ".</p>"
            + "".join(tables) + _inline_svg(svgs.get("false_negatives"), "fn")
        )  # fmt: skip
    sensitivity = diagnosis.get("sensitivity") or {}
    if sensitivity:
        tables = []
        for characteristic, d in sensitivity.items():
            if not isinstance(d, Mapping):
                continue
            head = "".join(f"<th>{_e(b)}</th>" for b in d.get("bins", []))
            values = "".join(_num(v) for v in d.get("normalized_ap", []))
            tables.append(
                f'<table class="sensitivity-table" data-characteristic="{_e(characteristic)}"><tr><th>{_e(characteristic)}</th>{head}'
                f"<th>min</th><th>max</th></tr><tr><th>normalized AP (%)</th>{values}{_num(d.get('min'))}{_num(d.get('max'))}</tr></table>"
            )
        overall = sensitivity.get("overall_normalized_ap")
        parts.append(
            "<h3>Sensitivity</h3>"
            + (f'<p class="note">Overall normalized AP: {_pct(overall)}%.</p>' if isinstance(overall, (int, float)) else "")
            + "".join(tables)
            + _inline_svg(svgs.get("sensitivity"), "sens")
        )
    parts.append("</section>")
    return "\n".join(parts)


def _inline_svg(svg: str | None, prefix: str) -> str:
    """A figure's SVG document as an element of this page: the XML declaration, doctype and metadata go (the doctype
    names a URL), and its ids take ``prefix`` so that two figures' ids cannot collide."""
    if not svg:
        return ""
    start = svg.find("<svg")
    if start < 0:
        return ""
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg[start:], flags=re.S)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if ids:
        pattern = re.compile(
            r'(\bid="|href="#|url\(#)(' + "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True)) + r')(?=[")])'
        )
        svg = pattern.sub(lambda mm: f"{mm.group(1)}{prefix}-{mm.group(2)}", svg)
    return f"<figure>{svg}</figure>"


# --- hand-made SVG -------------------------------------------------------------------------------


def _line_chart(series: Sequence[tuple[np.ndarray, np.ndarray, str, str]], *, x_label: str, y_label: str, svg_id: str) -> str:
    """Curves on [0, 1] x [0, 1] with a legend: each of ``series`` is (x, y, colour, label)."""
    w, h, left, right, top, bottom = 760, 420, 60, 230, 15, 45
    pw, ph = w - left - right, h - top - bottom

    def sx(x):
        return left + pw * float(x)

    def sy(y):
        return top + ph * (1 - float(y))

    out = [f'<svg id="{svg_id}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" font-size="12">']
    for v in np.linspace(0, 1, 6):
        out.append(f'<line x1="{sx(v):.1f}" y1="{top}" x2="{sx(v):.1f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + pw}" y2="{sy(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{v:g}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    for i, (x, y, colour, label) in enumerate(series):
        points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y))
        out.append(
            f'<polyline class="curve" points="{points}" fill="none" stroke="{colour}" stroke-width="1.8"><title>{_e(label)}</title></polyline>'
        )
        ly = top + 10 + 18 * i
        out.append(f'<line x1="{left + pw + 15}" y1="{ly}" x2="{left + pw + 40}" y2="{ly}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{left + pw + 46}" y="{ly + 4}">{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _bar_chart(rows: Sequence[tuple[str, float, int]]) -> str:
    """Horizontal bars of AP (0..1) per class: (name, AP, instances)."""
    row_h, left, bar_w, top = 16, 220, 460, 22
    h = top + row_h * max(len(rows), 1) + 10
    out = [
        f'<svg id="per-class-chart" viewBox="0 0 {left + bar_w + 80} {h}" width="{left + bar_w + 80}" height="{h}" role="img" font-size="11">'
    ]
    for v in np.linspace(0, 1, 6):
        x = left + bar_w * v
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{h - 10}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle">{100 * v:g}</text>')
    for i, (name, ap, count) in enumerate(rows):
        y = top + row_h * i
        width = bar_w * min(max(ap, 0.0), 1.0)
        out.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{_e(_shorten(name, 34))}</text>')
        out.append(
            f'<rect class="bar" x="{left}" y="{y + 2}" width="{width:.1f}" height="{row_h - 4}" fill="#3b75af">'
            f"<title>{_e(name)}: AP {_pct(ap)}%, {count} instances</title></rect>"
        )
        out.append(f'<text x="{left + width + 4:.1f}" y="{y + 12}" fill="#555">{_pct(ap)} ({count})</text>')
    out.append("</svg>")
    return "".join(out)


def _timeline_svg(video, shown: Detections, label_map) -> str:
    """One video (as ``jobs.plots.plot_timeline`` draws it): a lane per class of its ground truth or shown detections,
    ground truth solid in the upper half, detections in the lower half with opacity 0.1 + 0.85 x score."""
    gt = np.asarray(video.segments.data, np.float64).reshape(-1, 2)
    det = np.asarray(shown.segments.data, np.float64).reshape(-1, 2)
    classes = sorted({int(c) for c in video.labels} | {int(c) for c in shown.labels})
    duration = video.duration if video.duration and video.duration > 0 else None
    if duration is None:
        duration = max(1.0, float(np.max(np.concatenate([gt[:, 1], det[:, 1], [0.0]]))))
    palette = _palette("tab10" if len(classes) <= 10 else "tab20")  # the colours of jobs.plots.plot_timeline
    lane, left, width, top = 30, 170, 720, 6
    h = top + lane * max(len(classes), 1) + 28

    def sx(t):
        return left + width * min(max(float(t), 0.0), duration) / duration

    out = [
        f'<svg class="timeline-svg" viewBox="0 0 {left + width + 10} {h}" width="{left + width + 10}" height="{h}" role="img" font-size="11">'
    ]
    for j, c in enumerate(classes):
        y = top + lane * j
        colour = palette[j % len(palette)]
        name = label_map.name(c)
        if j:
            out.append(f'<line x1="{left}" y1="{y}" x2="{left + width}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + lane / 2 + 4}" text-anchor="end">{_e(_shorten(name, 26))}</text>')
        for s, e in gt[video.labels == c]:
            out.append(
                f'<rect class="gt" x="{sx(s):.1f}" y="{y + 2}" width="{max(sx(e) - sx(s), 1):.1f}" height="{lane / 2 - 3}" '
                f'fill="{colour}" stroke="#000" stroke-width="0.6"><title>{_e(name)} ground truth {s:.2f}-{e:.2f} s</title></rect>'
            )
        mine = shown.labels == c
        for (s, e), score in zip(det[mine], shown.scores[mine]):
            alpha = 0.1 + 0.85 * min(max(float(score), 0.0), 1.0)
            out.append(
                f'<rect class="det" x="{sx(s):.1f}" y="{y + lane / 2 + 1}" width="{max(sx(e) - sx(s), 1):.1f}" height="{lane / 2 - 3}" '
                f'fill="{colour}" fill-opacity="{alpha:.2f}" stroke="{colour}"><title>{_e(name)} detection {s:.2f}-{e:.2f} s, '
                f"score {float(score):.3f}</title></rect>"
            )
    if not classes:
        out.append(f'<text x="{left + width / 2}" y="{top + lane / 2}" text-anchor="middle">no ground truth and no detection shown</text>')
    axis_y = top + lane * max(len(classes), 1)
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" stroke="#888"/>')
    for t in _ticks(duration):
        out.append(f'<text x="{sx(t):.1f}" y="{axis_y + 14}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{left + width}" y="{axis_y + 26}" text-anchor="end">time (s)</text>')
    out.append("</svg>")
    return "".join(out)


def _ticks(duration: float) -> list[float]:
    """About six round tick positions over [0, duration]."""
    raw = duration / 6
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    return [round(t, 6) for t in np.arange(0, duration + 1e-9, step)]


def _viridis(x: float) -> str:
    import matplotlib

    return matplotlib.colors.to_hex(matplotlib.colormaps["viridis"](float(x)))


def _palette(name: str) -> list[str]:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return [matplotlib.colors.to_hex(cmap(i)) for i in range(cmap.N)]


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{100 * float(x):.2f}"


def _num(x: Any, cls: str | None = None) -> str:
    """A table cell of a fraction shown in %, its exact value in ``data-value``."""
    if not isinstance(x, (int, float, np.floating, np.integer)) or not np.isfinite(x):
        return '<td class="num">-</td>'
    c = f"num {cls}" if cls else "num"
    return f'<td class="{c}" data-value="{float(x)!r}">{_pct(x)}</td>'
