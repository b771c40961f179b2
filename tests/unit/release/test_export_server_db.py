"""`pocketfed export --server-db`: a coordinator's latest committed model, and --out that never
overwrites another export unless told to (--force), never half-written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from pocketfed.config import load_config
from pocketfed.errors import UserError
from pocketfed.model import lora
from pocketfed.model.zoo import load_base
from pocketfed.release.cli import register
from pocketfed.server import checkpoint, strategies
from pocketfed.server.service import open_coordinator
from pocketfed.server.store import Store, Version


@pytest.fixture(scope="module")
def invoke():
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        pass

    runner = CliRunner()

    def run(*args: object) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args])
        if isinstance(result.exception, UserError):  # what the main CLI prints: one sentence, exit 2
            return 2, str(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, " ".join(result.output.split())  # rich wraps long lines

    return run


def tiny_deployment(folder: Path, commit: bool = True) -> dict[str, torch.Tensor]:
    """A coordinator state on `tiny` as `pocketfed server` leaves it, and (commit=True) one committed
    round: version 1 whose adapter is version 0's plus a random B (what a round's aggregate adds)."""
    cfg = load_config(None, {"model": {"name": "tiny"}, "sim": {"rounds": 2}, "deploy": {"goal": 2, "quorum": 1}})

    def init_params() -> dict[str, torch.Tensor]:
        return lora.get_state(lora.attach(load_base("tiny").model, cfg.lora, seed=0))

    c = open_coordinator(folder, cfg, "tiny", init_params)
    v0 = c.store.latest_version()
    params = checkpoint.state_from_bytes(c.store.get_blob(v0.state_sha), 0).params
    if commit:
        g = torch.Generator().manual_seed(1)
        params = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in params.items()}
        state = strategies.init(params, cfg.server)
        with c.store.transaction():
            c.store.add_version(Version(1, 0, None, 1, c.store.put_blob(checkpoint.adapter_to_bytes(params)),
                                        c.store.put_blob(checkpoint.state_to_bytes(state)), time.time()))
    c.store.close()
    return params


def test_export_latest_committed_model_then_refuse_overwrite_then_force(invoke, tmp_path):
    params = tiny_deployment(tmp_path / "state")
    code, out = invoke("export", "--server-db", tmp_path / "state", "--format", "onnx-int4", "--out", tmp_path / "m")
    assert code == 0, out
    assert "version 1, 1 committed round" in out and "exported onnx-int4" in out
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    store = Store(tmp_path / "state")
    assert manifest["adapters"] == [{"role": "global", "sha256": store.latest_version().adapter_sha}]
    assert manifest["base_model"] == "tiny" and manifest["privacy"] is None
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "state"]  # no scratch or temp folder left

    # a second export into the same folder is refused, naming the folder and the flag; nothing changes
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m").iterdir()}
    code, out = invoke("export", "--server-db", tmp_path / "state", "--format", "gguf-q8_0", "--out", tmp_path / "m")
    assert code == 2 and repr(str(tmp_path / "m")) in out and "--force" in out, out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m").iterdir()} == before

    code, out = invoke("export", "--server-db", tmp_path / "state", "--format", "gguf-q8_0", "--out", tmp_path / "m",
                       "--force")
    assert code == 0, out
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["format"] == "gguf-q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "state"]
    assert params  # the committed adapter differs from version 0's (B is not zero)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in params.items())


def test_the_adapter_folder_is_the_committed_adapter(tmp_path):
    """The scratch PEFT folder holds exactly version 1's tensors, with the run's LoRA shape."""
    from pocketfed.release.deployment import read_deployment

    params = tiny_deployment(tmp_path / "state")
    run, version = read_deployment(tmp_path / "state", tmp_path / "adapter")
    assert version.version == 1 and version.rounds_applied == 1
    got = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 16.0, "tiny")
    assert run.config.model.name == "tiny"


def test_not_a_state_folder_and_no_committed_round(invoke, tmp_path):
    (tmp_path / "notes").mkdir()
    code, out = invoke("export", "--server-db", tmp_path / "notes", "--format", "onnx-int4", "--out", tmp_path / "m")
    assert code == 2 and "is not a coordinator state folder" in out and "pocketfed server" in out, out

    tiny_deployment(tmp_path / "state", commit=False)
    code, out = invoke("export", "--server-db", tmp_path / "state", "--format", "onnx-int4", "--out", tmp_path / "m")
    assert code == 2 and "has no committed round yet" in out, out

    code, out = invoke("export", "--server-db", tmp_path / "state", "--run", tmp_path, "--format", "onnx-int4",
                       "--out", tmp_path / "m")
    assert code == 2 and "not both" in out
    assert not (tmp_path / "m").exists()
