"""The light commands (`enroll`, `status`, `ledger`, `release`, every `--help`) start without torch,
transformers or onnxruntime: each runs in a fresh interpreter, and the modules it imported are
listed when it exits (a phone or the operator's laptop should not pay ~1 s and ~250 MB for torch
to print a token or a table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

HEAVY = ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "peft")

# Runs the real entry point, then reports which heavy modules were imported (also after an error exit).
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in {heavy!r} if m in sys.modules])))
sys.argv = ["pocketfed", *json.loads(sys.argv[1])]
from pocketfed.cli import main
main()
"""


def probe(args: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    p = run_cli([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)], cwd=cwd)
    lines = [line for line in p.stdout.splitlines() if line.startswith("HEAVY=")]
    assert lines, f"no report from `pocketfed {' '.join(args)}`: {p.stdout[-500:]} {p.stderr[-1500:]}"
    return p.returncode, p.stdout + p.stderr, json.loads(lines[-1].removeprefix("HEAVY="))


@pytest.mark.parametrize("command", ["", "enroll", "status", "ledger", "release", "certs"])
def test_help_imports_no_torch(tmp_path, command):
    args = [command, "--help"] if command else ["--help"]
    code, out, heavy = probe(args, tmp_path)
    if command == "release" and "No such command" in out:
        pytest.skip("`pocketfed release` is not registered in this tree")
    assert code == 0, out
    assert heavy == [], f"`pocketfed {' '.join(args)}` imported {heavy}"


def test_enroll_prints_tokens_without_torch(tmp_path):
    from pocketfed.server.store import Store

    Store(tmp_path / "state").close()  # an (empty) coordinator state folder, as `pocketfed server` leaves it
    code, out, heavy = probe(["enroll", "--db", str(tmp_path / "state"), "--count", "2"], tmp_path)
    assert code == 0, out
    tokens = [line for line in out.splitlines() if not line.startswith("HEAVY=")]
    assert len(tokens) == 2 and all(len(t) == 43 for t in tokens), out
    assert heavy == []


def test_status_against_nothing_ledger_and_release_of_an_empty_home_without_torch(tmp_path):
    (tmp_path / "operator.token").write_text("a" * 43 + "\n")
    code, out, heavy = probe(["status", "--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "operator.token")],
                             tmp_path)
    assert code == 2 and "cannot reach http://127.0.0.1:9" in out, out
    assert heavy == []

    (tmp_path / "home").mkdir()
    code, out, heavy = probe(["ledger", "--home", str(tmp_path / "home")], tmp_path)
    assert code == 0 and "nothing left this device" in out, out
    assert heavy == []

    code, out, heavy = probe(["release", "status", "--home", str(tmp_path / "home")], tmp_path)
    if "No such command" in out:
        pytest.skip("`pocketfed release` is not registered in this tree")
    assert code == 0, out
    assert heavy == []


def test_the_probe_sees_torch_when_a_command_imports_it(tmp_path):
    """The check can fail: a command that needs torch (a simulate that stops at a bad flag) shows it."""
    code, out, heavy = probe(["simulate", "--model", "tiny", "--devices", "zero", "--out", str(tmp_path / "r")], tmp_path)
    assert code == 2, out
    assert "torch" in heavy, out
