"""Headless Chromium for the page tests (the device app, the console).

Debian's `chromium` (installed by `make browser`, which `make test` runs) driven by Playwright's
Python API through `executable_path`: Playwright's own browser download is never used. Screenshots
go to `screenshots` (a folder per test run), and a test may also copy one into docs/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """A launched headless Chromium (`playwright.sync_api.Browser`). Module scope: Playwright's sync
    API keeps an event loop running in this thread while it lives, where `asyncio.run` in later
    tests would fail."""
    if CHROMIUM is None:  # `make test` installs it; a bare `pytest` on a machine without it says why
        pytest.skip("Debian's chromium is not installed: run `make browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: object) -> Iterator[object]:
    """A fresh page (1280x800) that fails the test on any JavaScript error."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests save the screenshots they take."""
    return tmp_path_factory.mktemp("screenshots")
