"""The in-process backend: every virtual device runs in this process, one after another, on
one shared base model (one copy in memory whatever the number of devices), through the device
task every device runs (`pocketfed.device.task.run_task`). The model is the simulator's own
(`pocketfed.transport.shared.load_simulator`): the lean Llama where it fits, else transformers + PEFT.

The seam every backend implements (the server loop talks to nothing else):
    run(tasks) -> results      (a TrainResult or a Dropout per task, in task order)
    close()
"""

from __future__ import annotations

from typing import Callable, Protocol

from pocketfed.data.federated import FederatedDataset
from pocketfed.device.task import DeviceModel, run_task
from pocketfed.memory import release_free_memory
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask


class Backend(Protocol):
    def run(self, tasks: list[TrainTask]) -> list[TrainResult | Dropout]: ...

    def close(self) -> None: ...


class InProcessBackend:
    def __init__(self, model: DeviceModel, dataset: FederatedDataset, on_done: Callable[[str], None] | None = None):
        self.model = model  # shared by every virtual device
        self.dataset = dataset
        self.on_done = on_done

    def run(self, tasks: list[TrainTask]) -> list[TrainResult | Dropout]:
        results: list[TrainResult | Dropout] = []
        for task in tasks:
            results.append(run_task(self.model, self.dataset.device(task.device_id).train, task))
            release_free_memory()  # the next device starts from live memory, not from this one's heap holes
            if self.on_done:
                self.on_done(task.device_id)
        return results

    def close(self) -> None:
        pass
