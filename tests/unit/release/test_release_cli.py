"""`pocketfed export | suggest | generate | bench-runtime` through typer's CliRunner."""

import json

import pytest
import typer
from typer.testing import CliRunner

from pocketfed.errors import UserError
from pocketfed.release.cli import register


@pytest.fixture(scope="module")
def invoke():
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # a group, so commands are addressed by name as in the real CLI
        pass

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        if isinstance(result.exception, UserError):  # what the main CLI does
            return 2, str(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.output

    return run


def test_export_then_suggest_and_generate(pf, invoke, tmp_path):
    code, out = invoke("export", "--run", pf.run, "--format", "onnx-int4", "--out", tmp_path / "m")
    assert code == 0, out
    assert "exported onnx-int4" in out
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["format"] == "onnx-int4"

    code, out = invoke("suggest", "--model", tmp_path / "m", "To be, or not to be, that is the ")
    assert code == 0, out
    words, lock = out.strip().splitlines()
    assert len(words.split("  |  ")) == 3
    assert lock.startswith("privacy lock: made on this device; trained with DP epsilon=2.5")

    code, out = invoke("generate", "--model", tmp_path / "m", "--max-tokens", "5", "My lord,")
    assert code == 0, out
    assert out.startswith("My lord,") and out.strip().splitlines()[-1].startswith("privacy lock:")


def test_bench_runtime_reports_every_metric(pf, invoke):
    code, out = invoke("bench-runtime", "--model", pf.export("onnx-int4"))
    assert code == 0, out
    for key in ("decode_tok_s@128", "decode_tok_s@1024", "ttft_ms", "suggest_p50_ms", "suggest_p95_ms",
                "peak_rss_mb", "size_mb"):
        assert key in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("export", "--run", "{tmp}/missing", "--format", "onnx-int4", "--out", "{tmp}/o"), "does not exist"),
        (("export", "--run", "{run}", "--format", "tflite", "--out", "{tmp}/o"), "unknown export format 'tflite'"),
        (("suggest", "--model", "{tmp}", "hello "), "no manifest.json"),
        (("generate", "--model", "{tmp}/missing", "hello"), "does not exist"),
        (("suggest", "--home", "{tmp}/missing", "hello "), "device home"),
        (("generate", "--home", "{tmp}", "hello"), "has no on-device model yet"),
    ],
)
def test_bad_input_is_one_sentence(pf, invoke, tmp_path, args, message):
    code, out = invoke(*(a.format(tmp=tmp_path, run=pf.run) for a in args))
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()
