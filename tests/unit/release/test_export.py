"""Export pipeline: ONNX fp32 equals PyTorch, int8/int4 agree with it, manifest, atomic writes, bad input."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel
from pf_release_fixtures import PRIVACY, hamlet_text

from pocketfed.errors import UserError
from pocketfed.model.zoo import load_base
from pocketfed.release.export import export
from pocketfed.runtime import Session, load

PROMPTS = ["To be, or not to be, that is", "My lord, I will", "O Hamlet, what", "Good night, sweet prince"]


def torch_logits(model, tokenizer, text: str) -> np.ndarray:
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_onnx_fp32_logits_equal_pytorch_merged(pf):
    merged = pf.merged_model()
    base = load_base(str(pf.base_dir))
    onnx = load(pf.export("onnx-fp32"))
    for text in PROMPTS:
        ids = onnx.encode(text)
        expected = torch_logits(merged, base.tokenizer, text)
        got = Session(onnx, 64).feed(ids)
        assert np.abs(got - expected).max() < 1e-4
        # the merge matters: the base model alone is far from the merged one
        assert np.abs(torch_logits(base.model, base.tokenizer, text) - expected).max() > 1e-2


def _top1_teacher_forced(model, ids):
    session = Session(model, len(ids) + 2)
    return np.array([int(np.argmax(session.feed(ids[: i + 1]))) for i in range(len(ids))])


def test_int8_int4_top1_agrees_with_fp32(pf):
    """Top-1 next token at 150 positions of Hamlet, quantized vs fp32 (teacher-forced).

    The fixture model echoes its input token at ~60% of positions (checked below), so an export
    that only preserves the embedding would fail the int4 bar; a broken one would score ~0.
    """
    fp32 = load(pf.export("onnx-fp32"))
    ids = fp32.encode(hamlet_text(2000))[:150]
    ref = _top1_teacher_forced(fp32, ids)
    echo = float(np.mean(ref == np.array(ids)))
    assert echo < 0.75
    assert len(set(ref.tolist())) > 30
    agree = {fmt: float(np.mean(_top1_teacher_forced(load(pf.export(fmt)), ids) == ref))
             for fmt in ("onnx-int8", "onnx-int4")}
    assert agree["onnx-int8"] >= 0.95, agree
    assert agree["onnx-int4"] >= max(0.75, echo + 0.1), agree
    # greedy continuations start the same way for most prompts
    from pocketfed.runtime import generate

    same = sum(
        list(generate(load(pf.export("onnx-int8")), p, 3)) == list(generate(fp32, p, 3)) for p in PROMPTS
    )
    assert same >= 3


def test_manifest_records_provenance(pf):
    out = pf.export("onnx-int4")
    m = json.loads((out / "manifest.json").read_text())
    adapter_sha = hashlib.sha256((pf.run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert m["format"] == "onnx-int4" and m["runtime"] == "onnxruntime-genai"
    assert m["base_model"] == load_base(str(pf.base_dir)).model_id
    assert m["adapters"] == [{"role": "global", "sha256": adapter_sha}]
    assert m["quantization"]["bits"] == 4 and m["quantization"]["block_size"] in (16, 32, 64, 128, 256)
    assert m["privacy"] == PRIVACY
    assert m["personalized"] is False
    for name, size in m["files"].items():
        assert (out / name).stat().st_size == size
    assert m["total_bytes"] == sum(m["files"].values())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_personal_adapter_replaces_the_global_one(pf, tmp_path):
    # a personal adapter is the global one trained further on the device, so it already holds it
    out = export(pf.run, "onnx-fp32", tmp_path / "personal", personal=pf.personal)
    m = json.loads((out / "manifest.json").read_text())
    assert [a["role"] for a in m["adapters"]] == ["global", "personal"] and m["personalized"]
    base = load_base(str(pf.base_dir))
    model = PeftModel.from_pretrained(base.model, str(pf.personal)).merge_and_unload()
    onnx = load(out)
    text = PROMPTS[0]
    expected = torch_logits(model, base.tokenizer, text)
    got = Session(onnx, 64).feed(onnx.encode(text))
    assert np.abs(got - expected).max() < 1e-4
    global_only = Session(load(pf.export("onnx-fp32")), 64).feed(onnx.encode(text))
    assert np.abs(global_only - expected).max() > 1e-3


def test_reexport_replaces_previous_export(pf, tmp_path):
    out = tmp_path / "again"
    export(pf.run, "gguf-q8_0", out)
    first = json.loads((out / "manifest.json").read_text())["created_at"]
    export(pf.run, "gguf-q4_0", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "gguf-q4_0" and first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


# ---- bad input: one clear sentence, nothing written ----


def test_missing_run_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "nope", "onnx-int4", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format(pf, tmp_path):
    with pytest.raises(UserError, match="unknown export format 'onnx-int3'.*onnx-int4"):
        export(pf.run, "onnx-int3", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_adapter_from_another_base_model(pf, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pf.run, run)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="trained on base model 'smollm2-135m'"):
        export(run, "gguf-q8_0", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_corrupt_adapter_file(pf, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pf.run, run)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not load the global adapter"):
        export(run, "onnx-fp32", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_midway_leaves_nothing(pf, tmp_path, monkeypatch):
    import pocketfed.release.gguf_writer as gw

    def boom(*args, **kwargs):
        (args[3]).write_bytes(b"half")  # a half-written file in the temp folder
        raise RuntimeError("disk full")

    monkeypatch.setattr(gw, "write_gguf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(pf.run, "gguf-q8_0", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_out_folder_with_other_content_is_refused(pf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a pocketfed export"):
        export(pf.run, "gguf-q8_0", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
