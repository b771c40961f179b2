"""Which config keys may change when a coordinator restarts on its state folder, and which may not.

A trial is tuned by restarting the server with other settings (a smaller goal, a lower
data.min_train_tokens, a longer deadline): that must not need a new database. Some keys are baked
into what the state already holds, and changing them would silently make it another run:

- the model and the LoRA shape: every stored adapter and server state has their shapes;
- server.strategy: FedAdam/FedYogi moments in the stored state mean nothing to FedAvg and back;
- every privacy.* key but the upload codec: the accountant composed the rounds run so far under
  them (noise multiplier, clip, sampling, delta, secure aggregation's parameters);
- under DP also sim.rounds and deploy.population / max_participations / participation_window: the
  noise multiplier was calibrated, and a device's rounds bounded, from them.

Everything else (goal, quorum, overselect, deadlines, cohort sizes, retry hints, training
hyper-parameters, data.* limits, eval/sim-only keys, defenses) may change; the new value applies
from the next round. Keys a newer pocketfed added are compared at their defaults (the caller fills
them in), so upgrading is not a change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pocketfed.errors import UserError

FIXED = ("model.name", "lora.rank", "lora.alpha", "lora.target_modules", "server.strategy")
FIXED_PREFIX = "privacy."
CHANGEABLE = ("privacy.codec",)  # a lossless or lossy upload encoding of the same privatized update
FIXED_UNDER_DP = ("sim.rounds", "deploy.population", "deploy.max_participations", "deploy.participation_window")
WHY = {
    "model": "the stored adapters were trained on it",
    "lora": "the stored adapters have its shape",
    "server": "the stored server state is this strategy's",
    "privacy": "the privacy accountant composed the rounds run so far under it",
    "sim": "the noise multiplier and the privacy accountant's bound were computed from it",
    "deploy": "the noise multiplier and the privacy accountant's bound were computed from it",
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"deploy": {"goal": 3}} -> {"deploy.goal": 3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for every leaf that differs, sorted by key."""
    a, b = flatten(stored), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_fixed(key: str, dp: bool) -> bool:
    if key in CHANGEABLE:
        return False
    return key in FIXED or key.startswith(FIXED_PREFIX) or (dp and key in FIXED_UNDER_DP)


def check_restart(stored: dict[str, Any], new: dict[str, Any], folder: Path) -> list[tuple[str, Any, Any]]:
    """The changes a restart may apply; UserError naming the first fixed key that changed, with the
    stored and the new value. `stored` and `new` are `config.to_dict` trees."""
    dp = stored.get("privacy", {}).get("dp", "none") != "none"
    found = changes(stored, new)
    fixed = [c for c in found if is_fixed(c[0], dp)]
    if fixed:
        key, old, value = fixed[0]
        more = f" (and {', '.join(k for k, _, _ in fixed[1:])})" if len(fixed) > 1 else ""
        raise UserError(
            f"{key} cannot change for the state in {folder}: it was started with {key}={old!r}, this config has "
            f"{key}={value!r}{more}; {WHY[key.split('.')[0]]}. Keep {key}={old!r}, or start a new run in another --db folder")
    return found


def describe(found: list[tuple[str, Any, Any]]) -> str:
    """"deploy.goal 8 -> 3, deploy.quorum 4 -> 2"."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in found)
