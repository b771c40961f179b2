"""`make_device_home(tmp_path) -> Path`: a verified device home on `tiny`, for tests of the lock and the page.

It holds what `pocketfed device` leaves after a federated run (see `pocketfed.runtime.home`): a
release key pin, two signed releases (1 and 2, with DP epsilon 3.1), `current` = 2, a personal
adapter trained on release 2 (date, gain), the onnx-int4 runtime model built from them by the
device's own builder (`pocketfed.device.ondevice.build_model`), and a ledger written by the ledger
itself (a registration, check-ins, 2 model updates, 2 metric reports, one refusal). The first call
builds it (~10 s: the int4 export); later calls copy it. `KEY` signs its releases, so a test can
sign a newer one.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save as st_save

from pocketfed.config import LoraConfig
from pocketfed import signing
from pocketfed.runtime import home as device_home

KEY = Ed25519PrivateKey.generate()
LORA = LoraConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
TASK = {"model": "tiny", "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"seq_len": 32, "test_fraction": 0.2, "min_train_tokens": 0},
        "train": {"steps": 2, "epochs": 1.0, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "prox_mu": 0.0}}
EPSILON, DELTA = 3.1, 1e-5
_TEMPLATE: Path | None = None


def adapter_state(seed: int) -> dict[str, torch.Tensor]:
    """A `tiny` LoRA adapter state (rank 2, q/v) with small random B, keyed as PEFT keys it."""
    from pocketfed.model import lora
    from pocketfed.model.zoo import load_base

    model = lora.attach(load_base("tiny").model, LORA, seed=seed)
    state = lora.get_state(model)
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.05 if "lora_B" in k else v) for k, v in state.items()}


def signed_release(version: int, state: dict[str, torch.Tensor], key: Ed25519PrivateKey = KEY,
                   epsilon: float | None = EPSILON) -> tuple[dict, str, bytes]:
    """(manifest JSON, signature, adapter bytes) of a release as the coordinator signs it."""
    data = st_save({k: v.contiguous() for k, v in sorted(state.items())})
    now = time.time()
    m = signing.Manifest(version=version, parent_version=version - 1, sha256=signing.sha256_hex(data), round=version,
                         strategy="fedavg", base_model="tiny", issued_at=now, expires_at=now + 3600,
                         epsilon=epsilon, delta=DELTA if epsilon is not None else None)
    return m.to_json(), signing.sign(key, m), data


def write_ledger(home: Path, destination: str = "https://coordinator.test:8443") -> None:
    """A run's ledger, written by the device's ledger: 1 registration, 3 check-ins, 2 updates, 2 metrics, 1 refusal."""
    import pytest

    from pocketfed.device import ledger
    from pocketfed.protocol import wire

    reg = wire.RegisterRequest(name="device-test", public_key="ab" * 32, enrollment_token=None)
    ledger.check_and_record(home, destination, ledger.REGISTRATION, reg.model_dump(), {})
    for _ in range(3):
        check = wire.CheckinRequest(eligibility=wire.Eligibility(charging=True, idle=True, unmetered=True,
                                                                 free_memory_mb=4000))
        ledger.check_and_record(home, destination, ledger.CHECKIN, check.model_dump(), {})
    update = {"a.lora_A.weight": torch.zeros(2, 64)}
    for _ in range(2):
        ledger.check_and_record(home, destination, ledger.UPDATE, update, {"a.lora_A.weight": ((2, 64), "float32")})
        ledger.check_and_record(home, destination, ledger.METRICS, {"num_tokens": 64, "loss": 2.5}, {})
    with pytest.raises(ledger.EgressRefused):
        ledger.check_and_record(home, destination, "personal_adapter", {"w": torch.zeros(1)}, {})


def _build(home: Path) -> None:
    from pocketfed.device import personal
    from pocketfed.device.ondevice import build_model

    home.mkdir(parents=True)
    (home / device_home.RELEASE_PIN).write_text(signing.public_hex(KEY) + "\n")
    for version in (1, 2):
        manifest, signature, data = signed_release(version, adapter_state(version))
        device_home.install_release(home, manifest, signature, data, TASK)
    personal.write_personal(home, adapter_state(7), LORA,
                            {"date": "2026-11-28T10:00:00Z", "gain": 0.042, "release": 2,
                             "val_loss_global": 10.0, "val_loss_personal": 9.957, "steps": 4})
    build_model(home, processes=False)  # the same steps, in this process (fast)
    write_ledger(home)


def make_device_home(tmp_path: Path) -> Path:
    """A copy of the verified template home at tmp_path / "home" (module docstring)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="pf-device-home-"))
        atexit.register(shutil.rmtree, root, True)  # the template lives as long as the test session
        template = root / "home"
        _build(template)
        _TEMPLATE = template
    home = Path(tmp_path) / "home"
    shutil.copytree(_TEMPLATE, home)
    return home


def describe(home: Path) -> str:
    """For failure messages: the home's files."""
    return json.dumps(sorted(str(p.relative_to(home)) for p in home.rglob("*")))


def flip_weight_byte(home) -> None:
    """One flipped bit in the middle of the runtime model's weights, written in place (the file keeps
    its size and inode: rewriting it whole would truncate it under the running app's memory map)."""
    path = home / "model" / "model.onnx.data"
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))
