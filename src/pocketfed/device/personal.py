"""The private personal adapter: trained only on this device's data, on top of the global one,
kept in the device home, never uploaded.

    personal = global adapter + `steps` local steps on the device's own train split

It is saved as a PEFT adapter folder `<home>/personal_adapter/` (atomically: temp folder, rename),
so the device's runtime can load it like any adapter. Nothing in the upload path reads that
folder; and if anything ever asks to send it, the egress ledger's one door out
(pocketfed.device.ledger.check_and_record) refuses kind "personal_adapter" and records the refusal.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file

from pocketfed.config import TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.device import ledger
from pocketfed.device.task import train, wrap_peft
from pocketfed.model import lora

PERSONAL_DIR = "personal_adapter"
PERSONAL = "personal_adapter"  # the ledger kind that never leaves


def train_personal(model: PeftModel, global_state: lora.AdapterState, data: Blocks, cfg: TrainConfig,
                   seed: int, steps: int) -> lora.AdapterState:
    """`steps` local steps from the global adapter on this device's data -> the personal adapter."""
    device_model = wrap_peft(model)
    device_model.set_state(global_state)
    if steps:
        train(device_model, data, cfg, seed, steps=steps)
    return device_model.get_state()


def save_personal(model: PeftModel, state: lora.AdapterState, home: str | Path) -> Path:
    """Write `state` as `<home>/personal_adapter/` (a PEFT adapter folder), atomically."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    folder = home / PERSONAL_DIR
    lora.set_state(model, state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PERSONAL_DIR}-", dir=home))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_personal(home: str | Path) -> lora.AdapterState | None:
    """The saved personal adapter, keyed like `lora.get_state`, or None if there is none."""
    path = Path(home) / PERSONAL_DIR / "adapter_model.safetensors"
    return load_file(path) if path.is_file() else None


def send_personal(home: str | Path, destination: str, state: lora.AdapterState) -> bytes:
    """What happens if anything tries to upload the personal adapter: the ledger refuses it
    (raises ledger.EgressRefused) and records the refusal. There is no other way out."""
    return ledger.check_and_record(home, destination, PERSONAL, state, schema={})
