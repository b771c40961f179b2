"""Local steps on the simulator's model, for its final evaluation (personalized, local-only and
centralized variants): a thin call into the one training loop, `pocketfed.device.task.train`.
Device rounds run `pocketfed.device.task.run_task`."""

from __future__ import annotations

from pocketfed.config import TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.device import task
from pocketfed.model import lora


def train_steps(model: task.DeviceModel, global_state: lora.AdapterState, data: Blocks, cfg: TrainConfig, seed: int,
                steps: int | None = None) -> tuple[int, dict[str, float]]:
    """Local steps in place on `model`, from `global_state`. -> (tokens, metrics)."""
    model.set_state(global_state)
    return task.train(model, data, cfg, seed, steps)
