"""Devices that accept a task and then vanish: a backend wrapper that drops some of them.

`DroppingBackend(inner, rate, seed)` implements the backend seam (`run(tasks)`, `close()`) around
any backend: each task's device drops out with probability `rate`, decided by a generator seeded
by (seed, round, device), and comes back as a `Dropout`; the rest run on `inner`. A dropped
device's work is lost, so it is not run at all.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask


def drops_out(device_id: str, round_: int, seed: int, rate: float) -> bool:
    if rate <= 0:
        return False
    key = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "little")
    return bool(np.random.default_rng([seed, round_, key, 0xD0]).random() < rate)


class DroppingBackend:
    def __init__(self, inner, rate: float, seed: int):
        self.inner, self.rate, self.seed = inner, rate, seed

    def run(self, tasks: list[TrainTask]) -> list[TrainResult | Dropout]:
        dropped = {t.device_id for t in tasks if drops_out(t.device_id, t.round, self.seed, self.rate)}
        ran = iter(self.inner.run([t for t in tasks if t.device_id not in dropped]))
        return [Dropout(t.round, t.device_id, "dropped out during the round") if t.device_id in dropped
                else next(ran) for t in tasks]

    def close(self) -> None:
        self.inner.close()
