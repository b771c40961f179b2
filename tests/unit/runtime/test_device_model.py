"""The runtime model a device builds (`device.ondevice.build_model`) is the operator's export of the same inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pocketfed.device import ondevice
from pocketfed.release.export import export
from pocketfed.runtime import Session, load
from pocketfed.runtime.home import read_json


def test_the_device_model_equals_the_operators_export_of_the_release_and_personal_adapter(device_home: Path) -> None:
    record = read_json(device_home / "model" / "pocketfed.json")
    assert record is not None and record["format"] == "onnx-int4" and record["personal"]["gain"] == 0.042
    work = Path(tempfile.mkdtemp(dir=device_home.parent))
    _, version, personal = ondevice._stage_run(device_home, work)
    assert version == 2 and personal is not None  # the personal adapter trained on release 2 is built in
    ref = export(work / "run", "onnx-int4", work / "ref", personal=personal[0])
    mine, theirs = load(device_home / "model", 1, False), load(ref, 1, False)
    ids = mine.encode("But soft, what light through yonder window breaks")
    # three processes and a float16 load in the builder (its linears and embedding are rewritten from
    # the fp32 weights) give the same logits as the one-process export: measured 0.0 on smollm2 too
    assert np.array_equal(Session(mine, 32).feed(ids), Session(theirs, 32).feed(ids))


def test_the_model_is_current_until_a_new_personal_adapter_or_release(device_home: Path) -> None:
    assert ondevice.model_is_current(device_home)
    (device_home / "personal_adapter" / "pocketfed.json").write_text('{"release": 2, "sha256": "0"}')
    assert not ondevice.model_is_current(device_home)
