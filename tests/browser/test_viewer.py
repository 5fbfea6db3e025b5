"""The web viewer (``GET /``) in a real headless Chromium against a real Serve app, and the endpoints it uses.

One app for the module, on real Ray, loaded from a real MLflow registry (SQLite): a small untrained TemporalMaxer
whose provenance is a real MobileNetV2 extraction, as in ``tests/jobs/test_serve.py``. Its video roots are a temp
folder holding a real synthetic H.264 MP4 (``pipelines.synth``) and an S3 prefix (moto) holding a copy.
Every expected number is read from the API's own answer.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from helpers import SERVED_LABELS, free_port, register_untrained_detector, synthetic_video

from jobs.serve_api import MAX_LIST_DEPTH, RequestError, list_videos, parse_range
from jobs.serve_config import ServeArgs
from pipelines.extract import SamplingConfig

LABELS = SERVED_LABELS
TIMEOUT = 120
FRAME_S = 0.1  # the synthetic video runs at 10 fps


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session, moto_s3):
    from ray import serve

    from jobs.serve import run_app

    begin = time.perf_counter()
    root = tmp_path_factory.mktemp("viewer")
    uri, _, _ = register_untrained_detector(root, "viewer-tests", SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16))
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    synthetic = videos / "synthetic.mp4"
    shutil.copy(synthetic_video(root, seed=5), synthetic)
    shutil.copy(synthetic, videos / "sub" / "copy.mp4")
    (videos / "notes.txt").write_text("not a video")
    (root / "outside.mp4").write_bytes(synthetic.read_bytes())  # beside the root, not under it
    moto_s3.fs.mkdir("viewer-videos")
    moto_s3.fs.put(str(synthetic), "viewer-videos/in/synthetic.mp4")
    prepared = time.perf_counter()

    args = ServeArgs(
        model="models:/tal-detector@champion",
        mlflow_uri=uri,
        s3_endpoint=moto_s3.endpoint_url,
        video_roots=[str(videos), "s3://viewer-videos/in/"],
        max_steps=300,
    )
    url = run_app(args, "127.0.0.1", free_port(), quiet=True)
    print(
        f"\nviewer tests: checkpoint, registry and videos in {prepared - begin:.1f} s, the Serve app started in {time.perf_counter() - prepared:.1f} s"
    )
    try:
        yield {"url": url, "root": root, "videos": videos, "synthetic": synthetic}
    finally:
        serve.shutdown()


def _get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, timeout=TIMEOUT, **kwargs)


# --- the listing and Range helpers, without a server -------------------------------------------------------


def test_listing_stays_in_its_roots_and_depth(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside).mkdir()
    (outside / "secret.mp4").write_bytes(b"x")
    deep = root.joinpath(*[f"d{i}" for i in range(MAX_LIST_DEPTH + 1)])
    deep.mkdir(parents=True)
    (deep / "too_deep.mp4").write_bytes(b"x")
    (deep.parent / "deepest_listed.webm").write_bytes(b"xy")
    (root / "link.mp4").symlink_to(outside / "secret.mp4")  # a video name, a target outside the root
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "a.MOV").write_bytes(b"abc")
    (root / "notes.txt").write_text("no")
    listing = list_videos([str(root)], limit=10)
    names = [v["name"] for v in listing["videos"]]
    assert names == ["a.MOV", "/".join(f"d{i}" for i in range(MAX_LIST_DEPTH)) + "/deepest_listed.webm"]
    assert listing["videos"][0] == {"uri": str((root / "a.MOV").resolve()), "name": "a.MOV", "size": 3, "root": str(root)}
    assert list_videos([str(root)], limit=10, prefix="d0/d1/")["videos"][0]["size"] == 2
    assert list_videos([str(root)], limit=1)["truncated"] is True


def test_range_header():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=50-500", 100) == (50, 99)
    for bad in ("bytes=100-", "bytes=5-2", "items=0-1", "bytes=0-1,4-5", "bytes=a-b"):
        with pytest.raises(RequestError) as refused:
            parse_range(bad, 100)
        assert refused.value.status == 416, bad


# --- the endpoints, over plain HTTP --------------------------------------------------------------------


def test_viewer_files_are_served(served):
    url = served["url"]
    page = _get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/viewer/viewer.js">' in page.text and "http://" not in page.text.replace('"http://www.w3.org', "")
    script = _get(url + "/viewer/viewer.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert _get(url + "/viewer/viewer.css").headers["content-type"].startswith("text/css")
    for name in ("nope.js", "..%2Fserve.py", "%2E%2E%2Fserve.py", ".hidden.js"):
        missing = _get(f"{url}/viewer/{name}")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found", name
    spec = _get(url + "/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/content"} <= set(spec["paths"]) and not {"/", "/viewer/{name}"} & set(spec["paths"])
    assert "served at /" in spec["info"]["description"]


def test_video_listing_is_bounded_and_under_the_roots(served):
    url, videos, synthetic = served["url"], served["videos"], served["synthetic"]
    listing = _get(url + "/v1/videos").json()
    assert listing["truncated"] is False and listing["roots"] == [str(videos), "s3://viewer-videos/in/"]
    entries = {(v["root"], v["name"]): v for v in listing["videos"]}
    assert set(entries) == {(str(videos), "synthetic.mp4"), (str(videos), "sub/copy.mp4"), ("s3://viewer-videos/in/", "synthetic.mp4")}
    local = entries[(str(videos), "synthetic.mp4")]
    assert local["uri"] == str(synthetic.resolve()) and local["size"] == synthetic.stat().st_size
    assert entries[("s3://viewer-videos/in/", "synthetic.mp4")] == {
        "uri": "s3://viewer-videos/in/synthetic.mp4", "name": "synthetic.mp4", "size": synthetic.stat().st_size,
        "root": "s3://viewer-videos/in/",
    }  # fmt: skip
    one = _get(url + "/v1/videos", params={"limit": 1}).json()
    assert len(one["videos"]) == 1 and one["truncated"] is True
    assert [v["name"] for v in _get(url + "/v1/videos", params={"prefix": "sub/"}).json()["videos"]] == ["sub/copy.mp4"]
    for limit in (0, 1001, "many"):
        refused = _get(url + "/v1/videos", params={"limit": limit})
        assert refused.status_code == 422 and refused.json()["error"] == "invalid_request", limit


def test_video_content_checks_roots_and_serves_ranges(served):
    url, videos, synthetic, root = served["url"], served["videos"], served["synthetic"], served["root"]
    data = synthetic.read_bytes()
    whole = _get(url + "/v1/videos/content", params={"uri": str(synthetic)})
    assert whole.status_code == 200 and whole.content == data and whole.headers["content-type"] == "video/mp4"
    for uri in (str(synthetic), "s3://viewer-videos/in/synthetic.mp4"):
        part = _get(url + "/v1/videos/content", params={"uri": uri}, headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206 and part.content == data[100:1100], uri
        assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}", uri
        tail = _get(url + "/v1/videos/content", params={"uri": uri}, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:], uri
    refusals = {
        f"{videos}/../outside.mp4": (403, "uri_not_allowed"),  # a `..` escape to a real video
        str(root / "outside.mp4"): (403, "uri_not_allowed"),
        "/etc/passwd": (403, "uri_not_allowed"),
        "s3://viewer-videos/in/../synthetic.mp4": (403, "uri_not_allowed"),
        "s3://viewer-videos/elsewhere.mp4": (403, "uri_not_allowed"),
        str(videos / "notes.txt"): (415, "not_a_video"),
        str(videos / "gone.mp4"): (404, "video_missing"),
    }
    for uri, (status, code) in refusals.items():
        answer = _get(url + "/v1/videos/content", params={"uri": uri})
        assert (answer.status_code, answer.json()["error"]) == (status, code), uri
    beyond = _get(url + "/v1/videos/content", params={"uri": str(synthetic)}, headers={"Range": f"bytes={len(data) + 5}-"})
    assert beyond.status_code == 416


# --- the page, in Chromium -------------------------------------------------------------------------------


def _open(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model-info').dataset.labels !== undefined")


def _detect(page, action) -> dict:
    """Do ``action`` (which makes the page POST a video) and return the API's answer, once the page has drawn it."""
    with page.expect_response(lambda r: r.url.endswith("/v1/detect/video"), timeout=TIMEOUT * 1000) as response:
        action()
    answer = response.value.json()
    assert response.value.status == 200, answer
    page.wait_for_function("['done', 'error'].includes(document.querySelector('#stage').dataset.state)")
    return answer


def _open_file(page, selector: str, path) -> None:
    """Open a JSON file in the page and wait until it is handled (read asynchronously: drawn, a pick offered, or refused)."""
    handled = int(page.get_attribute("#stage", "data-files") or 0)
    page.set_input_files(selector, str(path))
    page.wait_for_function(f"Number(document.querySelector('#stage').dataset.files || 0) > {handled}")


def _bars(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".det-bar",
        "bars => bars.map(b => ({score: Number(b.dataset.score), start: Number(b.dataset.start), label: b.dataset.label, "
        "shown: getComputedStyle(b).display !== 'none'}))",
    )


def test_upload_draws_the_detections_threshold_hides_and_click_seeks(served, page):
    _open(page, served["url"])
    card = page.inner_text("#model-info")
    assert "tal-detector" in card and "3 labels" in card and all(label in card for label in LABELS)
    answer = _detect(page, lambda: page.set_input_files("#video-file", str(served["synthetic"])))
    detections = answer["detections"]
    bars = _bars(page)
    assert len(bars) == len(detections) > 1 and all(b["shown"] for b in bars)
    assert sorted(b["score"] for b in bars) == pytest.approx(sorted(d["score"] for d in detections))

    # a threshold in the widest gap between two scores: some bars hidden, some shown
    scores = sorted({d["score"] for d in detections})
    low, high = max(zip(scores, scores[1:]), key=lambda pair: pair[1] - pair[0])
    assert high - low > 0.002, scores  # the slider's step is 0.001
    page.eval_on_selector(
        "#threshold", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", f"{(low + high) / 2:.3f}"
    )
    threshold = float(page.input_value("#threshold"))
    expected = sum(d["score"] >= threshold for d in detections)
    assert 0 < expected < len(detections)
    bars = _bars(page)
    assert all(b["shown"] == (b["score"] >= threshold) for b in bars)
    assert page.inner_text("#shown-count") == f"{expected} of {len(detections)} shown"

    # the best detection is drawn on top of its lane: hover shows its details, a click moves the player to its start
    best = max(range(len(bars)), key=lambda i: bars[i]["score"])
    page.wait_for_function("document.querySelector('#video').readyState >= 1")
    bar = page.locator(".det-bar").nth(best)
    bar.hover()
    tip = page.inner_text("#tooltip")
    assert bars[best]["label"] in tip and f"score {bars[best]['score']:.3f}" in tip
    before = page.eval_on_selector("#cursor", "c => Number(c.getAttribute('x1'))")
    bar.click()
    page.wait_for_function("document.querySelector('#video').seeking === false")
    assert page.eval_on_selector("#video", "v => v.currentTime") == pytest.approx(bars[best]["start"], abs=FRAME_S)
    if bars[best]["start"] > FRAME_S:
        assert page.eval_on_selector("#cursor", "c => Number(c.getAttribute('x1'))") > before


def test_server_video_plays_from_the_listing_and_files_draw_their_bars(served, page, tmp_path):
    _open(page, served["url"])
    uri = str(served["synthetic"].resolve())
    button = page.locator(f'#video-list button[data-uri="{uri}"]')
    answer = _detect(page, button.click)
    assert answer["video_id"] == "synthetic"
    assert page.locator(".det-bar").count() == len(answer["detections"])
    page.wait_for_function("document.querySelector('#video').readyState >= 1")
    player = page.eval_on_selector("#video", "v => ({src: v.currentSrc, duration: v.duration})")
    assert "/v1/videos/content?uri=" in player["src"]
    assert player["duration"] == pytest.approx(answer["duration"], abs=0.5)

    # a results file naming this video (by its file stem): its detections replace the model's
    mine = [{"segment": [0.5, 1.5], "label": "run", "score": 0.9}, {"segment": [2.0, 3.0], "label": "dance", "score": 0.3}]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"synthetic": mine, "other": [{"segment": [0, 1], "label": "jump", "score": 1}]}}))
    _open_file(page, "#results-file", results)
    page.wait_for_function(f"document.querySelectorAll('.det-bar').length === {len(mine)}")
    assert sorted((b["label"], b["score"]) for b in _bars(page)) == [("dance", 0.3), ("run", 0.9)]
    assert page.inner_text("#shown-count") == "2 of 2 shown"

    # ground truth under another id: the page says so and lets the user pick the entry
    truth = tmp_path / "gt.json"
    annotations = [{"segment": [0.5, 1.0], "label": "run"}, {"segment": [3.0, 4.0], "label": "jump"}]
    truth.write_text(json.dumps({"database": {"clip_007": {"duration": 4.5, "subset": "validation", "annotations": annotations}}}))
    _open_file(page, "#gt-file", truth)
    assert 'no entry for video "synthetic"' in page.inner_text("#error")
    page.select_option("#gt-pick", "clip_007")
    page.wait_for_function(f"document.querySelectorAll('.gt-bar').length === {len(annotations)}")
    lanes = page.eval_on_selector_all(".lane-label", "ls => ls.map(l => l.dataset.label)")
    assert lanes == ["jump", "run", "dance"]  # the model's classes in its order, then the others
    page.locator('.det-bar[data-label="run"]').hover()
    assert "tIoU 0.50" in page.inner_text("#tooltip")  # [0.5, 1.5] against [0.5, 1.0]


def test_api_errors_are_shown_in_words(served, page, tmp_path):
    _open(page, served["url"])
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"this is not a video at all" * 10)
    with page.expect_response(lambda r: r.url.endswith("/v1/detect/video"), timeout=TIMEOUT * 1000) as response:
        page.set_input_files("#video-file", str(fake))
    body = response.value.json()
    assert response.value.status >= 400
    page.wait_for_function("document.querySelector('#stage').dataset.state === 'error'")
    shown = page.inner_text("#error")
    assert f"{response.value.status} {body['error']}: {body['message']}" in shown
    assert page.locator(".det-bar").count() == 0
