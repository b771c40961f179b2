"""The device's privacy floors: what a task's privacy plan must promise before this device trains.

The coordinator chooses each round's plan (`wire.PrivacySpec`: DP mode, noise multiplier z, clip
norm C, expected cohort n). A coordinator that is careless or hostile could send z = 0, a huge C, or
under distributed DP an inflated n: each device adds N(0, (z C / sqrt(n))^2) (the Gaussian mechanism
split into n shares, as in Kairouz, Liu, Steinke, ICML 2021, Sec. 2), so the m devices that really
take part put noise of std z C sqrt(m / n) on the sum, i.e. an effective multiplier
z_eff = z sqrt(m / n): claiming n = 10^6 for m = 10 devices divides the noise by ~316.

The device pins floors (`pocketfed device` options) and refuses a task below them before training;
the refusal goes into its own ledger and nothing is sent. A task that claims DP must have
    z >= min_noise_multiplier > 0,   C <= max_clip_norm,
and under distributed DP also n <= max_expected_devices and secure aggregation (without it the
server sees each update with only its own share z C / sqrt(n) of the noise). Then, whatever the
server does with the sum, z_eff >= min_noise_multiplier * sqrt(m / max_expected_devices).
`require_dp` also refuses tasks that claim no DP (a server could otherwise dodge every floor by
claiming none); it is off by default so that the plain and secure-aggregation-only flows still run.

Defaults (chosen so every documented flow runs): z >= 0.5, the multiplier at which a single round,
without amplification by sampling, already costs epsilon ~ 10 at delta = 1e-5 (dp-accounting's PLD
accountant, pinned in tests/unit/device/test_floors.py); C <= 10, far above the clip norms used
(0.05-1.0) but a bound on one device's influence; n <= 1000, the cohort size of large DP-FedAvg
runs (McMahan, Ramage, Talwar, Zhang, ICLR 2018: hundreds to thousands of users per round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pocketfed.errors import UserError

if TYPE_CHECKING:  # the CLI reads the defaults below without importing the wire models (and torch)
    from pocketfed.protocol import wire


@dataclass(frozen=True)
class PrivacyFloors:
    """The floors; each default is the `pocketfed device` option's (the one place they are set)."""

    min_noise_multiplier: float = 0.5
    max_clip_norm: float = 10.0
    max_expected_devices: int = 1000
    require_dp: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier > 0):
            raise UserError(f"--min-noise-multiplier must be a positive number, got {self.min_noise_multiplier}")
        if not (math.isfinite(self.max_clip_norm) and self.max_clip_norm > 0):
            raise UserError(f"--max-clip-norm must be a positive number, got {self.max_clip_norm}")
        if self.max_expected_devices < 1:
            raise UserError(f"--max-expected-devices must be at least 1, got {self.max_expected_devices}")

    def refusal(self, privacy: wire.PrivacySpec | None) -> str | None:
        """Why this device refuses a task with this privacy spec (one sentence), or None to accept it."""
        if privacy is None or privacy.dp == "none":
            return "the task claims no differential privacy and this device requires it" if self.require_dp else None
        z, c, n = privacy.noise_multiplier, privacy.clip_norm, privacy.expected_devices
        if z < self.min_noise_multiplier:
            return (f"the task's noise multiplier {z:g} is below this device's floor {self.min_noise_multiplier:g} "
                    "(--min-noise-multiplier)")
        if c > self.max_clip_norm:
            return f"the task's clip norm {c:g} is above this device's ceiling {self.max_clip_norm:g} (--max-clip-norm)"
        if privacy.dp == "distributed":
            if not privacy.secagg:
                return ("the task asks for distributed DP without secure aggregation: the server would see this "
                        f"device's update with only its share z C / sqrt(n) = {z * c / math.sqrt(n):g} of the noise")
            if n > self.max_expected_devices:
                return (f"the task's expected cohort {n} is above this device's ceiling {self.max_expected_devices} "
                        f"(--max-expected-devices): its noise share z C / sqrt(n) = {z * c / math.sqrt(n):g} "
                        "would be too small unless that many devices really add theirs")
        return None
