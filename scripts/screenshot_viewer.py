"""A PNG of the web viewer of a running ``tal serve``, with a video's detections drawn (the README's screenshot).

    .venv/bin/python scripts/screenshot_viewer.py http://127.0.0.1:8000 --video NAME_OR_URI [--ground-truth GT.json]
        [--results RESULTS.json] [--threshold 0.3] [--out docs/images/viewer.png]
    .venv/bin/python scripts/screenshot_viewer.py http://127.0.0.1:8000 --upload clip.mp4 ...

``--video`` picks one of the server's videos (``GET /v1/videos``: its path under the root, its file name or its URI);
``--upload`` sends a local file instead. Headless Debian ``chromium`` through Playwright (``bash scripts/test.sh``
installs both); 1280 x 800 by default.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


class ScreenshotError(Exception):
    """Something the screenshot cannot be made without; reported as one line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video of the server's listing: its path under its root, its file name, or its URI")
    source.add_argument("--upload", type=Path, help="a local video file to upload instead")
    parser.add_argument("--ground-truth", type=Path, help="ActivityNet ground truth JSON (drawn beside the detections)")
    parser.add_argument("--results", type=Path, help="ActivityNet results JSON (drawn instead of the model's detections)")
    parser.add_argument("--pick", help="the entry of the JSON files to draw when none is named after the video")
    parser.add_argument("--threshold", type=float, default=0.0, help="the score threshold slider's value, 0-1 (default 0)")
    parser.add_argument("--seek", type=float, help="seconds: move the player (and the timeline's cursor) there")
    parser.add_argument("--out", type=Path, default=Path("viewer.png"), help="the PNG to write (default viewer.png)")
    parser.add_argument("--size", default="1280x800", help="viewport WIDTHxHEIGHT (default 1280x800)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the detections (default 600)")
    args = parser.parse_args(argv)
    try:
        shoot(args)
    except ScreenshotError as error:
        print(f"screenshot_viewer: {error}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


def shoot(args: argparse.Namespace) -> None:
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ScreenshotError(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 1280x800") from None
    if not 0.0 <= args.threshold <= 1.0:
        raise ScreenshotError(f"--threshold {args.threshold}: give a score between 0 and 1")
    for path in (args.upload, args.ground_truth, args.results):
        if path is not None and not path.is_file():
            raise ScreenshotError(f"{path}: no such file")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScreenshotError("playwright is not installed: pip install -e '.[test]'") from None
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        raise ScreenshotError("no chromium: apt-get install chromium (bash scripts/test.sh does, as root)")
    url = args.url.rstrip("/")
    timeout_ms = args.timeout * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            try:
                page.goto(url + "/")
            except PlaywrightError as error:
                raise ScreenshotError(f"{url}/ does not answer: {error.message.splitlines()[0]}") from None
            page.wait_for_function(
                "document.querySelector('#model-info').dataset.labels !== undefined || !document.querySelector('#error').hidden"
            )
            if args.upload is not None:
                page.set_input_files("#video-file", str(args.upload))
            else:
                page.wait_for_function("document.querySelector('#video-list-note').textContent !== ''")
                uris = page.eval_on_selector_all("#video-list button", "bs => bs.map(b => [b.dataset.uri, b.firstChild.textContent])")
                matches = [uri for uri, name in uris if args.video in (uri, name) or Path(name).name == args.video]
                if not matches:
                    names = ", ".join(name for _, name in uris[:20]) or "none"
                    raise ScreenshotError(f"--video {args.video!r} is not among the server's videos ({names})")
                page.locator("#video-list button").nth([u for u, _ in uris].index(matches[0])).click()
            page.wait_for_function("['done', 'error'].includes(document.querySelector('#stage').dataset.state)")
            if page.get_attribute("#stage", "data-state") == "error":
                raise ScreenshotError(f"the server did not detect: {page.inner_text('#error')}")
            page.wait_for_function("document.querySelector('#video').readyState >= 2")
            for path, kind in ((args.results, "results"), (args.ground_truth, "gt")):
                if path is None:
                    continue
                handled = int(page.get_attribute("#stage", "data-files") or 0)
                page.set_input_files(f"#{kind}-file", str(path))
                page.wait_for_function(f"Number(document.querySelector('#stage').dataset.files || 0) > {handled}")
                if page.is_visible(f"#{kind}-pick-field"):
                    if not args.pick:
                        raise ScreenshotError(f"{path} has no entry for this video: name one with --pick ({page.inner_text('#error')})")
                    page.select_option(f"#{kind}-pick", args.pick)
            page.eval_on_selector(
                "#threshold", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", str(args.threshold)
            )
            if args.seek is not None:
                page.eval_on_selector("#video", "(v, t) => { v.currentTime = t; }", args.seek)
                page.wait_for_function("!document.querySelector('#video').seeking")
            page.evaluate("document.activeElement && document.activeElement.blur()")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
