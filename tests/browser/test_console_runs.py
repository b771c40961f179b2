"""`pocketfed console runs/`: two real simulation runs (FedAvg; FedAdam under central DP) side by
side in headless Chromium, read only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli, sizes, tiny_config, wait_for
from tests.integration.test_http_rounds import free_port

pytestmark = pytest.mark.integration
ROUNDS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from pocketfed.simulate import simulate

    root = tmp_path_factory.mktemp("runs")
    small = dict(sim={"rounds": ROUNDS, "devices": 3, "heldout": 1}, eval={"variants": ["base", "federated"]})
    simulate(tiny_config(**small), root / "fedavg")
    simulate(tiny_config(**small, server={"strategy": "fedadam", "lr": 0.01},
                         privacy={"dp": "central", "noise_multiplier": 1.0}), root / "fedadam-dp")
    (root / "notes").mkdir()  # a folder that is not a run is left out
    return root


def test_console_shows_two_runs_side_by_side(runs, page, screenshots, tmp_path):
    py = [sys.executable, "-m", "pocketfed"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
    empty = run_cli(py + ["console", str(tmp_path)], env=env)  # a folder without runs: one sentence
    assert empty.returncode == 2 and "holds no simulation run" in empty.stderr and "Traceback" not in empty.stderr

    port = free_port()
    log = tmp_path / "console.log"
    server = subprocess.Popen(py + ["console", str(runs), "--port", str(port)], env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/console/api/runs", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the console to listen", up, lambda: (sizes([log]), server.poll()))
        data = httpx.get(f"{url}/console/api/runs", timeout=30).json()
        assert [r["name"] for r in data["runs"]] == ["fedadam-dp", "fedavg"]
        page.goto(f"{url}/console")
        page.wait_for_selector(f"#chart-train[data-points='{ROUNDS}'] canvas")
        heads = page.locator("#runs-table thead th").all_inner_texts()
        assert heads[1:] == ["fedadam-dp", "fedavg"]
        assert "fedadam" in page.inner_text("#runs-table") and "DP central" in page.inner_text("#runs-table")
        for chart in ("train", "heldout", "top3", "bytes", "epsilon"):  # every chart drew both runs' rounds
            assert page.get_attribute(f"#chart-{chart}", "data-points") == str(ROUNDS), chart
            assert page.locator(f"#chart-{chart} canvas").count() == 1, chart
        # the legend names both runs, in the runs' colours
        legend = page.locator("#chart-train .u-legend").inner_text()
        assert "fedavg" in legend and "fedadam-dp" in legend
        # the final evaluation, from each summary.json, side by side
        summary = {r.name: json.loads((r / "summary.json").read_text()) for r in runs.iterdir() if r.name != "notes"}
        cells = page.locator("#summary-table tbody tr").filter(has_text="federated").locator("td").all_inner_texts()
        assert cells[1].startswith(f"{summary['fedadam-dp']['federated']['perplexity']:.2f}")
        assert cells[2].startswith(f"{summary['fedavg']['federated']['perplexity']:.2f}")
        page.screenshot(path=str(screenshots / "console-runs.png"), full_page=True)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
