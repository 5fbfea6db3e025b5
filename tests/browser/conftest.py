"""A real headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright (which downloads no browser)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module. Missing, it fails the test (``bash scripts/test.sh`` installs it): no skip.

    Not one per session: Playwright's sync API keeps an asyncio loop running on the main thread until it stops, and
    every later ``asyncio.run`` of the session (the Serve and stream API tests) would fail with "cannot be called from
    a running event loop"."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (bash scripts/test.sh does)")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail(f"no chromium at {executable}: bash scripts/test.sh installs Debian's chromium (apt-get, as root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own context: no cache or storage shared between tests), 1280 x 800."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        context.close()
