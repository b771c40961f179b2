"""Typed messages and the one seam between the round loop and devices (in-process, Ray, HTTP)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pocketfed.config import Backend as BackendKind

if TYPE_CHECKING:
    from pocketfed.transport.inprocess import Backend
    from pocketfed.transport.shared import SimulatorModel


def make_backend(cfg, sim: "SimulatorModel", dataset, on_done: Callable[[str], None] | None = None) -> "Backend":
    """The backend named by cfg.sim.backend. All share the seam `run(tasks) -> results`, `close()`."""
    if cfg.sim.backend is BackendKind.inprocess:
        from pocketfed.transport.inprocess import InProcessBackend

        return InProcessBackend(sim.model, dataset, on_done)
    if cfg.sim.backend is BackendKind.ray:
        from pocketfed.transport.ray_backend import RayBackend

        return RayBackend(cfg, sim, dataset, on_done)
    raise ValueError(f"unknown backend {cfg.sim.backend}")
