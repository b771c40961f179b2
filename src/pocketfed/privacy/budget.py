"""The DP bookkeeping of a run, shared by the simulator and the coordinator: the accountant's
ledger (`pocketfed.privacy.accountant`) and the (adaptive) clip state (`pocketfed.privacy.dp`).

A plain JSON record: the simulator keeps it in its checkpoint, the coordinator in its store, so a
restarted run goes on counting from where it stopped.

Each round is accounted with the noise that reached its sum (`accountant.effective_noise_multiplier`)
and with the total multiplier z even under adaptive clipping: the update's z_Delta and the count's
sigma_b together are one Gaussian mechanism with multiplier z (Andrew et al., NeurIPS 2021, Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pocketfed.config import DPMode, RunConfig
from pocketfed.errors import UserError
from pocketfed.privacy import accountant, dp

if TYPE_CHECKING:
    from pocketfed.privacy.pipeline import PrivacyPlan


@dataclass(frozen=True)
class PrivacyRun:
    """The DP bookkeeping of a run: the accountant's ledger and the (adaptive) clip state."""

    ledger: accountant.PrivacyLedgerState
    clip: dp.AdaptiveClipState

    def after_round(self, plan: PrivacyPlan, noised: int, estimate: float | None,
                    sample_rate: float | None = None, dim: int | None = None) -> PrivacyRun:
        """The run after a round whose sum holds the noise of `noised` devices (under distributed
        DP; every contribution), sampled at `sample_rate` (None: the ledger's), with the noised
        unclipped estimate b~ (None without adaptive clipping). `dim`, the update's length, is
        needed under the distributed discrete Gaussian, whose rounding raises the sensitivity
        (`PrivacyPlan.noise_scale`)."""
        z = self.ledger.noise_multiplier  # the total z: update and count together (Theorem 1)
        if plan.discrete:
            if dim is None:
                raise ValueError("after_round under the distributed discrete Gaussian needs the update's length (dim=)")
            z *= plan.noise_scale(dim)
        distributed = plan.dp is DPMode.distributed
        n = plan.expected_devices
        ledger = accountant.step(
            self.ledger, accountant.effective_noise_multiplier(z, distributed, noised, n), sample_rate,
            accountant.coordinator_noise_multiplier(z, distributed, plan.secagg, noised, n))
        clip = dp.adapt_clip(self.clip, estimate) if estimate is not None else self.clip
        return PrivacyRun(ledger, clip)

    def to_json(self) -> dict[str, Any]:
        return {"ledger": self.ledger.to_json_dict(), "clip": asdict(self.clip)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> PrivacyRun:
        return PrivacyRun(accountant.PrivacyLedgerState.from_json_dict(data["ledger"]), dp.AdaptiveClipState(**data["clip"]))

    def epsilons(self) -> dict[str, float | None]:
        """Both epsilons spent so far and delta, JSON-safe (None for an unbounded epsilon: the
        coordinator's under central DP, where it sees each update)."""
        led = self.ledger
        return {"epsilon_recipients": finite_or_none(led.epsilon_spent),
                "epsilon_coordinator": finite_or_none(led.epsilon_coordinator), "delta": led.delta}

    def summary(self) -> dict[str, Any]:
        """The run's privacy for reports (JSON-safe): both epsilons (None for an unbounded one: the
        coordinator's under central DP, where it sees each update), the nominal z and q, the clip norm."""
        led = self.ledger
        return {
            **self.epsilons(), "noise_multiplier": led.noise_multiplier, "sample_rate": led.sample_rate,
            "rounds": led.rounds_done, "max_participations": led.max_participations,
            "clip_norm": self.clip.clip_norm, "accountant": led.method,
        }


def finite_or_none(epsilon: float) -> float | None:
    """An epsilon as JSON can carry it: None for inf (no bound: the observer sees the data)."""
    return None if math.isinf(epsilon) else epsilon


def coordinator_view(plan_dp: DPMode, secagg: bool) -> str:
    """What the coordinator sees of one device's update, in words (for status and reports)."""
    if plan_dp is DPMode.central:
        return "the noiseless sum (it adds the noise)" if secagg else "each update (it adds the noise)"
    return "only the noised sum" if secagg else "each device's own noised update"


def init_privacy(cfg: RunConfig, sample_rate: float, max_participations: int | None = None) -> PrivacyRun | None:
    """The accountant for DP runs, at the nominal sample rate q (the simulator: per_round / population;
    the deployment: goal / population) and total noise multiplier z (configured, or calibrated to
    privacy.target_epsilon over sim.rounds). `max_participations`: the most rounds one device may
    take part in (None: every round), for the coordinator's epsilon."""
    p = cfg.privacy
    if p.dp is DPMode.none:
        return None
    z = p.noise_multiplier or accountant.calibrate(p.target_epsilon, p.delta, cfg.sim.rounds, sample_rate)
    if p.adaptive_clip and not (p.count_noise_std > z / 2 and math.isfinite(p.count_noise_std)):
        raise UserError(f"privacy.count_noise_std must be above half the noise multiplier ({z / 2:.4g}) with "
                        f"privacy.adaptive_clip under DP (the count spends part of the noise), got {p.count_noise_std:g}")
    ledger = accountant.PrivacyLedgerState(
        noise_multiplier=z, sample_rate=sample_rate, delta=p.delta,
        epsilon_budget=p.target_epsilon or float("inf"), method=p.accountant.value,
        max_participations=max_participations,
    )
    clip = dp.AdaptiveClipState(p.clip_norm, p.target_quantile, p.clip_lr, p.count_noise_std)
    return PrivacyRun(ledger, clip)

