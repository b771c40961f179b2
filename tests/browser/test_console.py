"""The operator's console in headless Chromium, against a real coordinator (`pocketfed server`) with
3 device processes on `tiny`: the credential is needed (401 without), committed rounds, the epsilon
and the bytes are shown, the quality chart redraws when the next round commits, and pausing stops
new rounds. A screenshot goes to docs/console.png.

No fixed sleeps: every wait polls a condition and fails only when the flow stops moving (the
rounds, updates, check-ins and logs it watches stay the same for `STALL_S`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CAP_S, run_cli, sizes, wait_for
from tests.integration.test_http_rounds import db_rows, free_port, write_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

DOCS = Path(__file__).resolve().parents[2] / "docs"
CONFIG = {
    "model": {"name": "tiny"},
    "data": {"seq_len": 32, "min_train_tokens": 32, "test_fraction": 0.2},
    "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
    "sim": {"rounds": 30, "seed": 0},
    "privacy": {"dp": "central", "noise_multiplier": 1.0, "clip_norm": 1.0, "target_epsilon": 50.0},
    "deploy": {"goal": 3, "overselect": 1.0, "quorum": 2, "deadline_s": 120.0, "retry_s": 0.3,
               "eval_every": 1, "eval_devices": 3},
}
DEVICES = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A coordinator and 3 devices, running; yields (url, state folder, progress function)."""
    from pocketfed.model.zoo import tiny_dir

    tmp = tmp_path_factory.mktemp("console")
    tiny_dir()  # the model cache exists before 4 processes want it
    write_data(tmp / "data")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    db, port, logs = tmp / "state", free_port(), tmp / "logs"
    logs.mkdir()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    py = [sys.executable, "-m", "pocketfed"]
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        log = open(logs / f"{name}.log", "a")
        procs.append(subprocess.Popen(py + args, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT))

    def progress() -> tuple:
        files = sorted(logs.glob("*.log"))
        return (db_rows(db, "SELECT round_id, status FROM rounds"), db_rows(db, "SELECT COUNT(*) FROM updates"),
                db_rows(db, "SELECT device_id, at FROM device_checkins"), sizes(files))

    start("server", ["server", "--db", str(db), "--port", str(port), "--config", "cfg.yaml"])
    try:
        wait_for("the server's state", lambda: bool(db_rows(db, "SELECT 1 FROM versions")), progress)
        tokens = run_cli(py + ["enroll", "--db", str(db), "--count", str(DEVICES)], cwd=tmp, env=env)
        assert tokens.returncode == 0, tokens.stderr
        for i, token in enumerate(tokens.stdout.split()):
            start(f"dev{i}", ["device", "--no-on-device-model", "--server", url, "--data", f"data/dev{i}", "--name", f"dev{i}",
                              "--home", f"homes/dev{i}", "--threads", "1", "--patience", "900", "--enroll-token", token]
                  + (["--profile", "phone"] if i == 0 else []))  # one device plans within a phone's memory
        yield url, db, progress, py, env, tmp
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def committed(db: Path) -> int:
    rows = db_rows(db, "SELECT COUNT(*) FROM rounds WHERE status = 'committed'")
    return rows[0][0] if rows else 0


def test_console_live_over_a_real_deployment(deployment, page, screenshots):
    url, db, progress, py, env, tmp = deployment

    # the credential: `pocketfed admin-token` prints the state folder's token; the API refuses without it
    out = run_cli(py + ["admin-token", "--db", str(db)], cwd=tmp, env=env)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token == (db / "operator.token").read_text().strip() and token not in out.stderr
    assert page.request.get(f"{url}/console/api/overview").status == 401
    assert page.request.get(f"{url}/console/api/overview", headers={"Authorization": "Bearer " + "x" * 43}).status == 401
    assert page.request.post(f"{url}/console/api/pause").status == 401

    page.goto(f"{url}/console")
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#login-error:has-text('wrong')")  # refused: back at the form, saying why
    page.screenshot(path=str(screenshots / "console-login.png"))
    assert page.is_hidden("#app")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#app:not(.hidden)")
    assert token not in page.url

    # committed rounds, the epsilon and the bytes
    wait_for("two committed rounds on the page",
             lambda: page.locator("#rounds-table tr[data-status=committed]").count() >= 2, progress)
    eps = page.inner_text("#fact-eps-recipients b")
    assert float(eps) > 0, eps
    assert page.inner_text("#fact-noise b") == "1" and page.inner_text("#fact-secagg b") == "off"
    row = page.locator("#rounds-table tr[data-status=committed]").first
    assert int(row.locator("[data-bytes-up]").get_attribute("data-bytes-up")) > 0
    assert "B" in page.inner_text("#fact-up b") and page.inner_text("#fact-up b") != "0 B"
    assert page.inner_text("#fact-registered b") == str(DEVICES)
    assert page.inner_text("#fact-eps-budget b") == "50"
    assert page.inner_text("#devices-table tr[data-device=dev0] td:nth-child(2)") == "phone"

    # the chart redraws when the next round commits
    points = int(page.get_attribute("#chart-loss", "data-points") or 0)
    assert points >= 2 and page.locator("#chart-loss canvas").count() == 1
    wait_for("the loss chart to redraw after the next commit",
             lambda: int(page.get_attribute("#chart-loss", "data-points") or 0) > points, progress)
    wait_for("a federated evaluation on the chart",
             lambda: page.locator("#quality-note:has-text('evaluations')").count() == 1, progress)
    page.screenshot(path=str(screenshots / "console.png"), full_page=True)
    shutil.copy(screenshots / "console.png", DOCS / "console.png")

    # pausing stops new rounds: the round in flight ends, then every device checks in twice more
    # and no round opens
    page.click("#btn-pause")
    page.wait_for_selector("#state-paused")
    assert db_rows(db, "SELECT action FROM operator_actions") == [("pause",)]
    wait_for("the round in flight to close", lambda: not db_rows(db, "SELECT 1 FROM rounds WHERE status = 'open'"), progress)
    closed_at = max(t for (t,) in db_rows(db, "SELECT closed_at FROM rounds"))
    done = committed(db)
    for _ in range(2):
        seen = dict(db_rows(db, "SELECT device_id, at FROM device_checkins"))
        wait_for("every device to check in again",
                 lambda: all(at > max(seen[d], closed_at) for d, at in db_rows(db, "SELECT device_id, at FROM device_checkins")),
                 progress)
    assert not db_rows(db, "SELECT 1 FROM rounds WHERE status = 'open' OR closed_at > ?", (closed_at,))
    assert committed(db) == done
    wait_for("the page to show the last round closed",
             lambda: page.locator("#rounds-table tr[data-status=committed]").count() == done
             and page.locator("#rounds-table tr[data-status=open]").count() == 0, progress)
    assert "paused by the operator" in page.inner_text("#rounds-note")
    page.screenshot(path=str(screenshots / "console-paused.png"), full_page=True)
    # and resuming opens the next one
    page.click("#btn-pause")
    wait_for("a round to open after resuming", lambda: bool(db_rows(db, "SELECT 1 FROM rounds WHERE status = 'open'")),
             progress)
