"""``tal report`` and ``tal evaluate --report``: the HTML report of an evaluation, read back with the stdlib parser."""

from __future__ import annotations

import contextlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main
from jobs.report import NO_ERROR_ANALYSIS, SECTIONS, build_report, error_analysis_section
from pipelines.annotations import write_activitynet
from pipelines.store import FeatureSequence, FeatureStore, Provenance
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.evaluation.diagnosis import CHARACTERISTICS, FP_TYPES
from tal_models.presets import make_config
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation
from tal_models.timing import FeatureTiming

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CASE = DATA / "eval_cases" / "autoloc_thumos14_test"
needs_data = pytest.mark.skipif(not CASE.exists(), reason=f"shared data not found at {CASE}")
NASTY_VIDEO = '<script>alert("v")</script>&x'
NASTY_LABEL = "<b>Jump</b>"


class Page(HTMLParser):
    """What the tests look at: element ids, tables' cells (text and data-value) by table id, SVGs, URLs, tags."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.svg_classes: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.meta: list[dict] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list | None = None
        self.doctype = None
        self.feed(text)

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]
        if tag == "svg":
            self.svg_classes.append(a.get("class", ""))
        if tag == "meta":
            self.meta.append(a)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("td", "th") and self._table is not None:
            self._cell = ["", a.get("data-value")]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[0] += data


def tal(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def thumos(tmp_path_factory):
    """``tal evaluate --predictions ... --report --diagnose`` on the AutoLoc THUMOS14 case, in process: (exit code, stdout, folder)."""
    out = tmp_path_factory.mktemp("thumos_report")
    rc, stdout = tal(
        "evaluate", "--ground-truth", CASE / "ground_truth.json", "--predictions", CASE / "predictions.json",
        "--tiou", "0.1:0.9:0.1", "--output", out / "metrics.json", "--report", "--diagnose",
    )  # fmt: skip
    return rc, stdout, out


@needs_data
def test_evaluate_report_has_every_section_and_the_metrics_json_figures(thumos):
    rc, stdout, out = thumos
    assert rc == 0
    report = out / "report.html"
    assert f"report  -> {report}" in stdout
    text = report.read_text()
    page = Page(text)
    assert page.doctype is not None and page.doctype.lower() == "doctype html"
    assert {"charset": "utf-8"} in page.meta and any(m.get("name") == "viewport" for m in page.meta)
    assert set(SECTIONS) <= page.ids

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["predictions"] == str((CASE / "predictions.json").resolve())
    rows = [r for r in page.tables["metric-table"][1:]]
    assert len(rows) == len(metrics["tiou"]) + 1  # one per tIoU, then the average
    for row, t, m, r1, r5 in zip(rows, metrics["tiou"], metrics["mAP"], metrics["recall_at_k"]["R@1x"], metrics["recall_at_k"]["R@5x"]):
        assert float(row[0][0]) == pytest.approx(t)
        for (shown, exact), expected in zip(row[1:], (m, r1, r5)):
            assert shown == f"{100 * expected:.2f}"  # the page shows metrics.json's figure...
            assert float(exact) == pytest.approx(expected, rel=0, abs=1e-12)  # ...recomputed to the same float
    assert rows[-1][1][0] == f"{100 * metrics['average_mAP']:.2f}"
    assert "differs from metrics.json" not in text

    classes = page.tables["per-class-table"][1:]
    assert len(classes) == len(metrics["per_class_AP"]) == 20
    mean_ap = {name: np.mean(ap) for name, ap in metrics["per_class_AP"].items()}
    assert [row[1][0] for row in classes] == sorted(mean_ap, key=lambda n: -mean_ap[n])  # best first
    assert sum(int(row[2][0].replace(",", "")) for row in classes) == metrics["num_ground_truth"]

    assert page.svg_classes.count("timeline-svg") == min(210, 30)
    assert "pr-chart" in page.ids and "per-class-chart" in page.ids
    _check_error_analysis(page, json.loads((out / "diagnosis.json").read_text()))
    # Self-contained: nothing to fetch, nothing to run.
    assert not [u for u in page.urls if u.startswith(("http://", "https://", "//"))], page.urls
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert report.stat().st_size < 1_000_000


def _check_error_analysis(page: Page, diagnosis: dict) -> None:
    """The error-analysis section shows ``diagnosis``'s figures: FP shares and removal gains, FN rates, its three SVGs."""
    assert NO_ERROR_ANALYSIS not in "".join(page.text) and "could not be drawn" not in "".join(page.text)
    fp = diagnosis["false_positives"]
    rows = page.tables["fp-table"][1:]
    assert [r[0][0] for r in rows] == fp["types"]
    for row in rows:
        kind = row[0][0]
        assert [float(v) for _, v in row[1 : 1 + len(fp["top_k"])]] == pytest.approx(fp["breakdown"][kind], abs=1e-12)
        if kind in fp["removed_gain"]:
            assert float(row[-1][1]) == pytest.approx(fp["removed_gain"][kind], abs=1e-12)
    fn = {t[0][0][0]: t for name, t in page.tables.items() if name.startswith("table") and t[1][0][0] == "missed (%)"}
    for characteristic in ("coverage", "length", "num_instances"):
        shown = [c[1] for c in fn[characteristic][1][1:]]
        expected = diagnosis["false_negatives"][characteristic]["rate"]
        assert [None if r is None else pytest.approx(r, abs=1e-12) for r in expected] == [None if v is None else float(v) for v in shown]
    assert len([c for c in page.svg_classes if c not in ("timeline-svg",)]) == 2 + 3  # PR, per-class, then the 3 diagnosis figures


@needs_data
def test_tal_report_rewrites_with_another_number_of_videos(thumos, tmp_path):
    _, _, out = thumos
    rc, stdout = tal("report", out, "--videos", "4", "--output", tmp_path / "r.html", "--title", "Four <videos>")
    assert rc == 0 and stdout.strip() == str(tmp_path / "r.html")
    page = Page((tmp_path / "r.html").read_text())
    assert page.svg_classes.count("timeline-svg") == 4
    assert "Four <videos>" in page.text  # escaped in the file, text again once parsed


def _tiny_case(root: Path) -> tuple[Path, Path]:
    """Ground truth and predictions of two videos, one with a video id and a label that are HTML."""
    names = [NASTY_LABEL, "Run"]
    videos = {
        NASTY_VIDEO: VideoAnnotation(NASTY_VIDEO, Segments(np.array([[1.0, 4.0], [6.0, 9.0]])), np.array([0, 1]), duration=12.0),
        "plain": VideoAnnotation("plain", Segments(np.array([[2.0, 5.0]])), np.array([1]), duration=10.0),
    }
    gt = root / "gt.json"
    write_activitynet(gt, AnnotationSet(videos, LabelMap.from_names(names)))
    results = {
        NASTY_VIDEO: [{"label": NASTY_LABEL, "score": 0.9, "segment": [1.2, 4.1]}, {"label": "Run", "score": 0.4, "segment": [0.0, 2.0]}],
        "plain": [{"label": "Run", "score": 0.8, "segment": [2.0, 5.5]}],
    }
    pred = root / "pred.json"
    pred.write_text(json.dumps({"version": "x", "results": results}))
    return gt, pred


def test_video_ids_and_labels_are_escaped(tmp_path):
    gt, pred = _tiny_case(tmp_path)
    rc, _ = tal("evaluate", "--ground-truth", gt, "--predictions", pred, "--tiou", "0.5", "--output", tmp_path / "m.json", "--report")
    assert rc == 0
    text = (tmp_path / "report.html").read_text()
    assert "<script" not in text and "<b>" not in text
    assert "&lt;script&gt;" in text and "&lt;b&gt;Jump&lt;/b&gt;" in text
    page = Page(text)
    assert "script" not in page.tags and "b" not in page.tags
    assert NASTY_VIDEO in "".join(page.text) and NASTY_LABEL in "".join(page.text)
    assert page.svg_classes.count("timeline-svg") == 2  # both videos (fewer than --videos)
    # No diagnosis.json: the report ran the diagnosis itself, as tal evaluate --diagnose would have.
    assert not (tmp_path / "diagnosis.json").exists()
    rc, _ = tal(
        "evaluate", "--ground-truth", gt, "--predictions", pred, "--tiou", "0.5", "--output", tmp_path / "d" / "m.json", "--diagnose"
    )
    assert rc == 0
    _check_error_analysis(page, json.loads((tmp_path / "d" / "diagnosis.json").read_text()))


def _diagnosis() -> dict:
    """A diagnosis dict as ``Diagnosis.to_dict()`` lays it out, with made-up figures."""
    types = list(FP_TYPES)
    return {
        "tiou": [0.5],
        "limit_factor": 10,
        "num_ground_truth": 3,
        "num_predictions": 3,
        "average_mAP": 0.25,
        "false_positives": {
            "types": types,
            "top_k": [1, 2],
            "breakdown": {t: [0.1 * (i + 1), 0.05 * (i + 1)] for i, t in enumerate(types)},
            "removed_gain": {t: 0.01 * i for i, t in enumerate(types) if i},  # the error types
        },
        "false_negatives": {
            c: {"bins": ["XS", "S", "M"], "edges": [0, 1, 2, 3], "count": [1, 2, 0], "rate": [1.0, 0.5, 0.0]}
            for c in ("coverage", "length", "num_instances")
        },
        "sensitivity": {
            **{c: {"bins": ["XS", "S"], "normalized_ap": [0.2, 0.4], "min": 0.2, "max": 0.4} for c in CHARACTERISTICS},
            "overall_normalized_ap": 0.3,
        },
    }


def test_error_analysis_section_renders_the_contract_dict_and_inlines_figures():
    svg = (
        '<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
        '<svg xmlns="http://www.w3.org/2000/svg"><metadata><a href="https://example.org"/></metadata>'
        '<defs><clipPath id="c1"><rect/></clipPath></defs><g clip-path="url(#c1)" id="g"><use href="#c1"/></g></svg>'
    )
    section = error_analysis_section(_diagnosis(), {"false_positives": svg, "false_negatives": svg, "sensitivity": svg})
    page = Page(section)
    assert "error-analysis" in page.ids and {"fp-table"} <= page.ids
    fp = page.tables["fp-table"]
    assert len(fp) == 1 + 6  # header + one row per type
    assert [c[0] for c in fp[1]] == ["true_positive", "10.00", "5.00", ""]  # no gain: not an error
    assert [c[0] for c in fp[3]] == ["wrong_label", "30.00", "15.00", "2.00"]
    assert len([t for t in page.tables.values() if t[0][0][0] in CHARACTERISTICS]) == 3 + 3  # false negatives, sensitivity
    assert "Overall normalized AP: 30.00%" in "".join(page.text)
    assert page.svg_classes.count("") == 3 and "DOCTYPE" not in section and "example.org" not in section
    assert {"fp-c1", "fn-c1", "sens-c1"} <= page.ids and "url(#fp-c1)" in section and 'href="#fp-c1"' in section
    assert NO_ERROR_ANALYSIS in error_analysis_section(None, None)


def test_the_report_reads_diagnosis_json_beside_metrics(tmp_path):
    gt, pred = _tiny_case(tmp_path)
    assert tal("evaluate", "--ground-truth", gt, "--predictions", pred, "--tiou", "0.5", "--output", tmp_path / "m.json")[0] == 0
    (tmp_path / "diagnosis.json").write_text(json.dumps(_diagnosis()))
    page = Page(build_report(tmp_path / "m.json").read_text())
    _check_error_analysis(page, _diagnosis())  # its tables and jobs.diagnosis's figures of it
    broken = _diagnosis()
    del broken["false_positives"]["breakdown"]["background"]  # a diagnosis.json the figures cannot draw: the tables still show
    (tmp_path / "diagnosis.json").write_text(json.dumps(broken))
    page = Page(build_report(tmp_path / "m.json").read_text())
    text = "".join(page.text)
    assert "could not be drawn" in text and "KeyError" in text and "fp-table" in page.ids


def _error(capsys, *args) -> str:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"tal {args[0]}: error:"), (rc, err)
    return err[0]


def test_unusable_evaluations_exit_2_with_one_line(tmp_path, capsys):
    assert "has no metrics.json" in _error(capsys, "report", tmp_path)
    assert "no such evaluation" in _error(capsys, "report", tmp_path / "nowhere")
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"tiou": [0.5], "mAP": [0.1], "average_mAP": 0.1}))
    assert "re-run tal evaluate" in _error(capsys, "report", old)
    (old / "metrics.json").write_text("{not json")
    assert "not valid JSON" in _error(capsys, "report", old / "metrics.json")

    gt, pred = _tiny_case(tmp_path)
    assert tal("evaluate", "--ground-truth", gt, "--predictions", pred, "--output", tmp_path / "m.json")[0] == 0
    pred.unlink()
    assert "predictions file of this evaluation is gone" in _error(capsys, "report", tmp_path / "m.json")
    assert "--report needs --output" in _error(capsys, "evaluate", "--ground-truth", gt, "--predictions", tmp_path / "x.json", "--report")
    assert "--videos must be >= 0" in _error(capsys, "report", tmp_path / "m.json", "--videos", "-1")


C = 8
PROVENANCE = Provenance("synthetic_backbone", "synthetic.pth", "ab" * 32, C, 10.0, 4, 8, "{}")


def test_model_mode_writes_the_report_into_its_directory(tmp_path):
    """``tal evaluate --model --report``: an untrained tiny detector on a store of three videos (one annotated video
    is not in the store: the report, like the metrics, leaves it out)."""
    g = np.random.default_rng(0)
    timing = FeatureTiming(PROVENANCE.fps, PROVENANCE.stride, PROVENANCE.window)
    sequences, videos = [], {}
    for i in range(3):
        vid, length = f"clip{i}", 64
        duration = float(timing.step_to_seconds(length - 0.5))
        sequences.append(FeatureSequence(vid, g.standard_normal((length, C)).astype(np.float32), timing, timing.centers(length), duration))
        videos[vid] = VideoAnnotation(
            vid, Segments(np.array([[2.0, 8.0], [10.0, 15.0]])), np.array([0, 1]), duration=duration, subset="test"
        )
    videos["absent"] = VideoAnnotation("absent", Segments(np.array([[1.0, 3.0]])), np.array([0]), duration=20.0, subset="test")
    store = FeatureStore(str(tmp_path / "store"))
    store.write_part(sequences, PROVENANCE)
    write_activitynet(tmp_path / "gt.json", AnnotationSet(videos, LabelMap.from_names(["Jump", "Run"])))
    model = build_detector(make_config("temporalmaxer", num_classes=2, input_dim=C, max_seq_len=64, embed_dim=16, levels=3))
    save_checkpoint(Checkpoint.from_model(model.eval(), ["Jump", "Run"], store.provenance.to_dict()), tmp_path / "model.pt")

    out = tmp_path / "eval"
    rc, stdout = tal(
        "evaluate", "--model", tmp_path / "model.pt", "--features", tmp_path / "store", "--annotations", tmp_path / "gt.json",
        "--subset", "test", "--tiou", "0.3", "0.5", "--output", out, "--workers", "0", "--timeline-videos", "0", "--report",
    )  # fmt: skip
    assert rc == 0
    assert f"report      -> {out / 'report.html'}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["model"] == str(tmp_path / "model.pt")
    assert metrics["inputs"]["predictions"] == str((out / "predictions.json").resolve()) and metrics["inputs"]["class_agnostic"] is None
    page = Page((out / "report.html").read_text())
    assert set(SECTIONS) <= page.ids
    shown = [float(row[1][1]) for row in page.tables["metric-table"][1:-1]]
    np.testing.assert_allclose(shown, metrics["mAP"], rtol=0, atol=1e-12)
    assert page.svg_classes.count("timeline-svg") == 3  # the videos evaluated, not the one missing from the store
