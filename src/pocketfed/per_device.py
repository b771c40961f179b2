"""Per-device results of a simulation: base / federated / personalized on each trained device's own
test split, and the share of devices that personalization made worse (the goal is none).

The simulator personalizes a device as a real device does (`pocketfed.device.personal.personalize`):
from the global adapter, on the device's train split less a local validation split (its last 20% of
tokens), with early stopping, and the personal adapter is kept only if its validation loss is below
the global adapter's; otherwise the device keeps the global model. The test split is never used to
choose, so a kept adapter can still be worse on it: those devices are counted, not hidden.
"""

from __future__ import annotations

from typing import Any

from pocketfed.config import TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.model import lora


def personalize_or_keep(model: Any, global_state: lora.AdapterState, rows: Blocks, cfg: TrainConfig, seed: int,
                        steps: int) -> tuple[lora.AdapterState, dict[str, Any]]:
    """The adapter this device ends with (its personal one, or the global one) and what was decided:
    {"kept": bool, "val_loss_global", "val_loss_personal", "steps"}. `model` is the simulator's model
    (a `DeviceModel`); `steps` is the most local steps (eval.personalize_steps), checked every 4."""
    from pocketfed.device.personal import personalize  # noqa: PLC0415

    if steps <= 0:
        return global_state, {"kept": False, "reason": "eval.personalize_steps is 0"}
    try:
        p = personalize(model, global_state, rows, cfg, seed, max_steps=steps, eval_every=min(4, steps))
    except ValueError as e:  # too little text to hold out a validation split
        return global_state, {"kept": False, "reason": str(e)}
    info = {"kept": p.kept, "val_loss_global": p.val_loss_global, "val_loss_personal": p.val_loss_personal,
            "steps": p.steps}
    return (p.state if p.state is not None else global_state), info


def personalization_summary(per_device: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Over the devices scored both federated and personalized: how many kept a personal adapter,
    and which ended worse on their own test split than the global model (perplexity higher)."""
    both = {d: r for d, r in per_device.items() if "federated" in r and "personalized" in r}
    if not both:
        return None
    worse = sorted(d for d, r in both.items() if r["personalized"]["perplexity"] > r["federated"]["perplexity"])
    return {
        "devices": len(both),
        "kept": sum(bool(r["personalized"].get("kept")) for r in both.values()),
        "worse": worse,
        "worse_share": len(worse) / len(both),
    }
