"""The device app's page in headless Chromium: `pocketfed app` started as the user starts it, on a
verified `tiny` device home (tests/unit/runtime/device_home.py), then typed into and hovered.

Screenshots go to the `screenshots` folder: app-ok.png (the lock's hover text showing),
app-recheck.png (a byte flipped after start-up, then "Check again"), app-flipped.png (a home whose
model has one flipped weight byte from the start).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pocketfed.app.server import LOCK_TEXT
from pocketfed.egress import LEDGER_FILE, REFUSAL
from tests.conftest import cpu_seconds, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "runtime"))
from device_home import flip_weight_byte, make_device_home  # noqa: E402

pw = pytest.importorskip("playwright.sync_api")
expect = pw.expect
TIMEOUT_MS = 120_000  # a loaded CI box: an upper bound for one step, never a wait in itself
TYPED = "To be or not to "


@pytest.fixture(autouse=True)
def patient_expect() -> Iterator[None]:
    expect.set_options(timeout=TIMEOUT_MS)
    yield
    expect.set_options(timeout=5_000)  # Playwright's default, for the other page tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(home: Path, log: Path) -> Iterator[str]:
    """`pocketfed app --home home` on a free port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pocketfed", "app", "--home", str(home), "--port", str(port),
                                 "--threads", "1", "--no-spin"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"`pocketfed app` exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/api/lock", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the app to answer", ready, lambda: (cpu_seconds(proc.pid), log.stat().st_size))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_app_page_suggests_shows_the_lock_and_the_ledger(page, screenshots, tmp_path):
    home = make_device_home(tmp_path)
    entries = [json.loads(x) for x in (home / LEDGER_FILE).read_text().splitlines()]
    sent = [e for e in entries if e["kind"] != REFUSAL]
    refused = [e for e in entries if e["kind"] == REFUSAL]
    with running_app(home, tmp_path / "app.log") as url:
        expected = httpx.get(f"{url}/api/suggest", params={"text": TYPED}).json()["words"]
        assert expected, "the model suggested nothing for the typed text"
        lock_api = httpx.get(f"{url}/api/lock").json()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.locator("#lock")).to_have_attribute("data-state", "ok")
        expect(page.locator("#warning")).to_be_hidden()

        # typing shows the model's suggestions for the text typed, as chips
        page.locator("#text").click()
        page.keyboard.type(TYPED, delay=25)
        expect(page.locator(".chip")).to_have_text(expected)

        # the ledger view lists every message, newest first, and the refusal
        rows = page.locator("#ledger tbody tr")
        expect(rows).to_have_count(len(sent))
        expect(rows.first).to_contain_text(f"{sent[-1]['bytes']} B" if sent[-1]["bytes"] < 1000 else "kB")
        kinds = {"update": "model updates", "metrics": "metrics", "checkin": "check-ins", "registration": "registration"}
        expect(rows.locator("td:nth-child(2)")).to_have_text([kinds[e["kind"]] for e in reversed(sent)])
        expect(page.locator("#refusals tbody tr")).to_have_count(len(refused))
        expect(page.locator("#refusals")).to_contain_text(refused[0]["requested_kind"])
        expect(page.locator("#ledger-total")).to_contain_text(f"{len(sent)} messages")

        # the provenance: release, verified signature with the key's fingerprint, personal adapter and gain
        provenance = page.locator("#provenance")
        expect(provenance).to_contain_text(str(lock_api["release"]["version"]))
        expect(provenance).to_contain_text("verified")
        expect(provenance).to_contain_text(lock_api["release"]["signed_by"])
        expect(provenance).to_contain_text(f"{lock_api['personal']['gain'] * 100:.1f}% lower perplexity")
        expect(provenance).to_contain_text("ε = 3.1,")

        # hovering the lock shows exactly the sentence
        tip = page.locator("#lock-tip")
        expect(tip).to_be_hidden()
        page.hover("#lock")
        expect(tip).to_be_visible()
        expect(tip).to_have_text(LOCK_TEXT)
        page.screenshot(path=str(screenshots / "app-ok.png"), full_page=True)

        # a chip inserts its word
        first = page.locator(".chip").first
        word = first.inner_text()
        first.click()
        expect(page.locator("#text")).to_have_value(f"{TYPED}{word} ")

        # one weight byte flipped while the page is open: "Check again" re-verifies and warns
        flip_weight_byte(home)
        page.click("#recheck")
        expect(page.locator("#warning")).to_be_visible()
        expect(page.locator("#warning")).to_contain_text("do not match the signed release")
        expect(page.locator("#lock")).to_have_attribute("data-state", "failed")
        page.mouse.move(0, 0)
        page.screenshot(path=str(screenshots / "app-recheck.png"), full_page=True)


def test_attack_app_page_warns_about_a_flipped_weight_byte(page, screenshots, tmp_path):
    home = make_device_home(tmp_path)
    flip_weight_byte(home)
    with running_app(home, tmp_path / "app.log") as url:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        warning = page.locator("#warning")
        expect(warning).to_be_visible()
        expect(warning).to_contain_text("the weights loaded do not match the signed release (model/model.onnx.data)")
        expect(page.locator("#lock")).to_have_attribute("data-state", "failed")
        page.hover("#lock")
        tip = page.locator("#lock-tip")
        expect(tip).to_be_visible()
        expect(tip).to_contain_text("Privacy lock failed")
        expect(tip).not_to_have_text(LOCK_TEXT)
        expect(page.locator("#checks li.bad")).to_have_count(1)
        expect(page.locator("#checks li.bad")).to_contain_text("weights")
        page.screenshot(path=str(screenshots / "app-flipped.png"), full_page=True)
