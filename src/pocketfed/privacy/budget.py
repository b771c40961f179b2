"""The DP bookkeeping of a run, shared by the simulator and the coordinator: the accountant's
ledger (`pocketfed.privacy.accountant`) and the (adaptive) clip state (`pocketfed.privacy.dp`).

A plain JSON record: the simulator keeps it in its checkpoint, the coordinator in its store, so a
restarted run goes on counting from where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pocketfed.config import DPMode, RunConfig
from pocketfed.privacy import accountant, dp


@dataclass(frozen=True)
class PrivacyRun:
    """The DP bookkeeping of a run: the accountant's ledger and the (adaptive) clip state."""

    ledger: accountant.PrivacyLedgerState
    clip: dp.AdaptiveClipState

    def after_round(self, unclipped: int, devices: int, adaptive: bool) -> "PrivacyRun":
        clip = dp.adapt_clip(self.clip, unclipped, devices) if adaptive else self.clip
        return PrivacyRun(accountant.step(self.ledger), clip)

    def to_json(self) -> dict[str, Any]:
        return {"ledger": self.ledger.to_json_dict(), "clip": asdict(self.clip)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "PrivacyRun":
        return PrivacyRun(accountant.PrivacyLedgerState.from_json_dict(data["ledger"]), dp.AdaptiveClipState(**data["clip"]))

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.ledger.epsilon_spent, "delta": self.ledger.delta,
            "noise_multiplier": self.ledger.noise_multiplier, "sample_rate": self.ledger.sample_rate,
            "rounds": self.ledger.rounds_done, "clip_norm": self.clip.clip_norm, "accountant": self.ledger.method,
        }


def init_privacy(cfg: RunConfig, sample_rate: float) -> PrivacyRun | None:
    """The accountant for DP runs. Sampling is a fixed-size uniform draw per round, accounted as
    Poisson sampling at rate per_round / population (the usual approximation, as in DP-FedAvg)."""
    p = cfg.privacy
    if p.dp is DPMode.none:
        return None
    z = p.noise_multiplier or accountant.calibrate(p.target_epsilon, p.delta, cfg.sim.rounds, sample_rate)
    if p.adaptive_clip and p.count_noise_std:
        z = dp.adjusted_noise_multiplier(z, p.count_noise_std)
    ledger = accountant.PrivacyLedgerState(
        noise_multiplier=z, sample_rate=sample_rate, delta=p.delta,
        epsilon_budget=p.target_epsilon or float("inf"), method=p.accountant.value,
    )
    clip = dp.AdaptiveClipState(p.clip_norm, p.target_quantile, p.clip_lr, p.count_noise_std)
    return PrivacyRun(ledger, clip)
