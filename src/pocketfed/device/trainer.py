"""Local steps on the simulator's PEFT model, for its final evaluation (personalized, local-only and
centralized variants): a thin call into the one training loop, `pocketfed.device.task.train`.
Device rounds run `pocketfed.device.task.run_task`."""

from __future__ import annotations

from torch import nn

from pocketfed.config import TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.device import task
from pocketfed.model import lora


def train_steps(model: nn.Module, global_state: lora.AdapterState, data: Blocks, cfg: TrainConfig, seed: int,
                steps: int | None = None) -> tuple[int, dict[str, float]]:
    """Local steps in place on a PEFT `model`, from `global_state`. -> (tokens, metrics)."""
    device_model = task.wrap_peft(model)
    device_model.set_state(global_state)
    return task.train(device_model, data, cfg, seed, steps)
