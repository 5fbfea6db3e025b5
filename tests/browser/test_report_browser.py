"""``tal report`` output opened in the real headless Chromium: every section renders, its figures have a size,
and the page asks the network for nothing (one self-contained file).

The evaluation is a real one: mmaction2's two-video case of ``shared/data/eval_cases`` scored by
``tal evaluate --report --diagnose`` through the CLI, so the page is what a user gets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.report import SECTIONS

CASE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval_cases" / "mmaction2_two_videos"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    if not CASE.exists():
        pytest.fail(f"the shared evaluation case is missing: {CASE}")
    out = tmp_path_factory.mktemp("report") / "metrics.json"
    argv = ["evaluate", "--ground-truth", str(CASE / "ground_truth.json"), "--predictions", str(CASE / "predictions.json")]
    assert main([*argv, "--output", str(out), "--report", "--diagnose"]) == 0
    return out.parent / "report.html"


def test_report_renders_every_section_offline(report, page):
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(report.as_uri())

    # The one request is the file itself: no stylesheet, font, script or image is fetched from anywhere.
    assert requested == [report.as_uri()]
    assert console_errors == []
    for section in SECTIONS:
        box = page.locator(f"#{section}").bounding_box()
        assert box is not None and box["height"] > 40, f"#{section} is not rendered ({box})"

    # The metric table shows the published figures of the case (expected.json, mmaction2's own evaluation).
    expected = json.loads((CASE / "expected.json").read_text())
    metrics_text = page.locator("#metrics").inner_text()
    assert f"{100 * expected['average_mAP']:.2f}" in metrics_text

    # Figures are drawn, not just present: the PR curves, the timelines of both videos, the three DETAD figures.
    def drawn_svgs(section: str) -> int:
        return page.evaluate(
            """(id) => [...document.querySelectorAll(`#${id} svg`)]
                   .filter(s => { const r = s.getBoundingClientRect(); return r.width > 50 && r.height > 30; }).length""",
            section,
        )

    assert drawn_svgs("pr-curves") >= 1
    assert drawn_svgs("timelines") == 2
    assert drawn_svgs("error-analysis") == 3
    # The timelines draw bars of both kinds (ground truth and detections) inside the page's width.
    bars = page.evaluate("""() => [...document.querySelectorAll('#timelines svg rect')]
                               .map(r => r.getBoundingClientRect()).filter(b => b.width > 0).length""")
    assert bars > 2
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 1280 + 1, f"the page is wider than the window ({width} px): a figure overflows"
