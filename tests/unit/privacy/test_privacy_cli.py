"""Privacy CLI: calibrate and epsilon round-trip through their output; bad values speak to the user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from pocketfed.device import ledger
from pocketfed.errors import UserError
from pocketfed.privacy.cli import register


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def other() -> None:  # the main app has commands of its own
        """Placeholder."""

    register(app)
    return app


def _number_after(word: str, text: str) -> float:
    match = re.search(rf"{word} ([0-9.]+)", " ".join(text.split()))  # rich may wrap lines
    assert match, text
    return float(match.group(1))


def test_calibrate_then_epsilon_round_trip() -> None:
    runner = CliRunner()
    out = runner.invoke(_app(), ["privacy", "calibrate", "--epsilon", "8", "--delta", "1e-6",
                                 "--rounds", "200", "--sample-rate", "0.01"])
    assert out.exit_code == 0, out.output
    z = _number_after("noise multiplier", out.output)
    assert z == pytest.approx(0.5592, abs=1e-3)
    back = runner.invoke(_app(), ["privacy", "epsilon", "--noise-multiplier", str(z), "--delta", "1e-6",
                                  "--rounds", "200", "--sample-rate", "0.01"])
    assert back.exit_code == 0, back.output
    assert _number_after("epsilon_recipients", back.output) == pytest.approx(8.0, rel=0.01)
    assert "epsilon_coordinator inf" in " ".join(back.output.split())  # central DP: it sees each update


def test_epsilon_prints_the_coordinators_epsilon_per_mode() -> None:
    from pocketfed.privacy.accountant import epsilon

    common = ["privacy", "epsilon", "--noise-multiplier", "2", "--delta", "1e-6", "--rounds", "200",
              "--sample-rate", "0.01", "--dp", "distributed"]
    # secure aggregation: it sees the sum with z = 2, unamplified, over the 10 rounds one device takes part in
    secure = CliRunner().invoke(_app(), common + ["--secagg", "--max-participations", "10"])
    assert secure.exit_code == 0, secure.output
    assert _number_after("epsilon_coordinator", secure.output) == pytest.approx(epsilon(2.0, 1.0, 10, 1e-6), rel=1e-5)
    assert _number_after("epsilon_recipients", secure.output) == pytest.approx(epsilon(2.0, 0.01, 200, 1e-6), rel=1e-5)
    # without it, each device's own update with its share z / sqrt(n) = 2 / sqrt(16) = 0.5
    alone = CliRunner().invoke(_app(), common + ["--devices", "16", "--max-participations", "10"])
    assert alone.exit_code == 0, alone.output
    assert _number_after("epsilon_coordinator", alone.output) == pytest.approx(epsilon(0.5, 1.0, 10, 1e-6), rel=1e-5)


@pytest.mark.parametrize("args, option", [
    (["privacy", "calibrate", "--epsilon", "-1", "--delta", "1e-6", "--rounds", "10", "--sample-rate", "0.1"], "--epsilon"),
    (["privacy", "calibrate", "--epsilon", "1", "--delta", "1", "--rounds", "10", "--sample-rate", "0.1"], "--delta"),
    (["privacy", "epsilon", "--noise-multiplier", "1", "--delta", "1e-6", "--rounds", "0", "--sample-rate", "0.1"], "--rounds"),
    (["privacy", "epsilon", "--noise-multiplier", "1", "--delta", "1e-6", "--rounds", "5", "--sample-rate", "1.5"], "--sample-rate"),
    (["privacy", "epsilon", "--noise-multiplier", "-2", "--delta", "1e-6", "--rounds", "5", "--sample-rate", "0.1"], "--noise-multiplier"),
    (["ledger", "--home", "/nonexistent/device-home"], "--home"),
    (["privacy", "epsilon", "--noise-multiplier", "1", "--delta", "1e-6", "--rounds", "5", "--sample-rate", "0.1",
      "--max-participations", "-1"], "--max-participations"),
    (["privacy", "epsilon", "--noise-multiplier", "1", "--delta", "1e-6", "--rounds", "5", "--sample-rate", "0.1",
      "--dp", "distributed"], "--devices"),
])
def test_bad_values_raise_user_error_naming_the_option(args: list[str], option: str) -> None:
    result = CliRunner().invoke(_app(), args)
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert message.startswith(option) and message.endswith(".") and message.count(". ") == 0


def test_ledger_command_summarises(tmp_path: Path) -> None:
    schema = {"w": ((2,), "float32")}
    data = ledger.check_and_record(tmp_path, "server", "update", {"w": torch.zeros(2)}, schema)
    ledger.check_and_record(tmp_path, "server", "metrics", {"loss": 1.0}, schema)
    result = CliRunner().invoke(_app(), ["ledger", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich may wrap the sentence
    assert "2 messages" in text and "all model updates and metrics; no raw data left this device" in text
    assert "update" in text and str(len(data)) in text.replace(",", "")
