"""The private personal adapter: trained only on this device's data, on top of the global one,
kept in the device home, never uploaded.

    personal = global adapter + `steps` local steps on the device's own train split

On a device (`personalize`), after each installed release: the train split's tokens are cut into
fit tokens and the last VAL_FRACTION of them as a local validation split; training runs in chunks of
`eval_every` steps from the global adapter, the validation loss is measured after each chunk, and
the best adapter so far is kept; it stops after `patience` chunks without improvement or at
`max_steps` (early stopping, Prechelt, "Early stopping - but when?", Neural Networks: Tricks of
the Trade, Springer 1998). The result is kept only if its validation loss is below the global
adapter's; its gain is the relative drop of validation perplexity,

    gain = 1 - exp(L_personal - L_global)       (L: mean next-token cross-entropy, nats)

It is saved as a PEFT adapter folder `<home>/personal_adapter/` (atomically: temp folder, rename),
so the device's runtime can load it like any adapter. Nothing in the upload path reads that
folder; and if anything ever asks to send it, the egress ledger's one door out
(pocketfed.device.ledger.check_and_record) refuses kind "personal_adapter" and records the refusal.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import Blocks, to_blocks
from pocketfed.device import ledger
from pocketfed.device.task import DeviceModel, train, wrap_peft
from pocketfed.model import lora
from pocketfed.model.depth import layers_of

if TYPE_CHECKING:
    from peft import PeftModel

VAL_FRACTION = 0.2

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
    """Write `state` as `<home>/personal_adapter/` (a PEFT adapter folder, `model`'s config), atomically."""
    folder = Path(home) / PERSONAL_DIR
    lora.set_state(model, state)
    lora.write_folder(state, folder, model.peft_config["default"])
    return folder


def load_personal(home: str | Path) -> lora.AdapterState | None:
    """The saved personal adapter, keyed like `lora.get_state`, or None if there is none."""
    path = Path(home) / PERSONAL_DIR / "adapter_model.safetensors"
    return load_file(path) if path.is_file() else None


def send_personal(home: str | Path, destination: str, state: lora.AdapterState) -> bytes:
    """What happens if anything tries to upload the personal adapter: the ledger refuses it
    (raises ledger.EgressRefused) and records the refusal. There is no other way out."""
    return ledger.check_and_record(home, destination, PERSONAL, state, schema={})


@dataclass(frozen=True)
class Personalized:
    """What `personalize` found: the best adapter, both validation losses, and whether it is kept."""

    state: lora.AdapterState | None  # the best personal adapter; None when it did not beat the global one
    val_loss_global: float
    val_loss_personal: float
    steps: int  # steps trained to reach the best adapter

    @property
    def kept(self) -> bool:
        return self.state is not None

    @property
    def gain(self) -> float:
        """Relative drop of validation perplexity, 1 - exp(L_personal - L_global)."""
        return 1.0 - math.exp(self.val_loss_personal - self.val_loss_global)


def split_rows(rows: Blocks, val_fraction: float = VAL_FRACTION) -> tuple[Blocks, Blocks]:
    """(fit rows, validation rows): the token stream the rows hold, its last ceil(n * val_fraction)
    tokens cut off for validation (at least 2 tokens each side), both re-cut into rows of the
    same length. By tokens, not rows: the last row is often a short tail. ValueError with fewer
    than 4 tokens."""
    tokens = rows.input_ids[rows.mask].tolist()
    n = len(tokens)
    if n < 4:
        raise ValueError(f"personalization needs at least 4 tokens of text, this device has {n}")
    n_val = min(n - 2, max(2, math.ceil(n * val_fraction)))
    seq_len = rows.input_ids.shape[1]
    pad = int(rows.input_ids[~rows.mask][0]) if bool((~rows.mask).any()) else 0
    return to_blocks(tokens[:n - n_val], seq_len, pad), to_blocks(tokens[n - n_val:], seq_len, pad)


def eval_loss(model: DeviceModel, rows: Blocks) -> float:
    """Mean next-token cross-entropy over every target token of `rows` (a token-weighted mean of
    the per-row means, so a short last row counts for what it holds)."""
    total, count = 0.0, 0
    model.module.eval()
    with torch.no_grad():
        for i in range(len(rows)):
            ids, mask = rows.input_ids[i:i + 1], rows.mask[i:i + 1]
            n = int(mask[:, 1:].sum())
            if n:
                total += float(model.loss(ids, mask)) * n
                count += n
    if not count:
        raise ValueError("the validation rows hold no target token")
    return total / count


def personalize(model: DeviceModel, global_state: lora.AdapterState, rows: Blocks, cfg: TrainConfig, seed: int,
                max_steps: int = 32, eval_every: int = 4, patience: int = 2) -> Personalized:
    """Train from `global_state` on this device's rows with early stopping on a local validation
    split (module docstring). Leaves `model` holding the global adapter."""
    fit, val = split_rows(rows)
    model.set_state(global_state)
    base = eval_loss(model, val)
    best, best_state, best_steps, steps, bad = base, None, 0, 0, 0
    while steps < max_steps and bad < patience:
        chunk = min(eval_every, max_steps - steps)
        train(model, fit, cfg, seed + steps, steps=chunk)  # another seed per chunk: another batch order
        steps += chunk
        loss = eval_loss(model, val)
        if loss < best:
            best, best_state, best_steps, bad = loss, model.get_state(), steps, 0
        else:
            bad += 1
    model.set_state(global_state)
    return Personalized(best_state, base, best, best_steps)


def write_personal(home: str | Path, state: lora.AdapterState, lcfg: LoraConfig, record: dict[str, Any]) -> Path:
    """`state` as `<home>/personal_adapter/` (a PEFT adapter folder) with `pocketfed.json` holding
    `record` and the weights' sha256: temp folder, then one rename."""
    from pocketfed.runtime.home import PERSONAL_RECORD, sha256_file  # noqa: PLC0415

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    folder = home / PERSONAL_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{PERSONAL_DIR}-", dir=home))
    try:
        write_adapter_folder(tmp, state, lcfg)
        digest = sha256_file(tmp / "adapter_model.safetensors")
        (tmp / PERSONAL_RECORD).write_text(json.dumps({**record, "sha256": digest}, sort_keys=True))
        old = home / f".{PERSONAL_DIR}.old-{tmp.name}"
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_adapter_folder(folder: Path, state: lora.AdapterState, lcfg: LoraConfig) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for `state`, keyed as
    `lora.get_state` keys it (PEFT's own saved names), without loading a model."""
    folder.mkdir(parents=True, exist_ok=True)
    lora.peft_config(lcfg, layers_of(state)).save_pretrained(str(folder))  # the layers its names carry
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
