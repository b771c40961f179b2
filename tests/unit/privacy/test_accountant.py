"""Accountant: agrees with dp_accounting called directly, calibrate inverts epsilon, ledger state."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pocketfed.privacy import accountant as acc

# (noise multiplier, sample rate, rounds, delta, epsilon by RDP pinned from dp-accounting 0.6.0)
SETTINGS = [
    (1.0, 0.01, 200, 1e-6, 1.641607698197417),
    (2.0, 0.1, 1000, 1e-6, 9.823878896704326),
    (1.1, 256 / 60000, 14062, 1e-5, 2.5965558697943036),  # DP-SGD MNIST: 60 epochs, batch 256
]


def _direct(z: float, q: float, rounds: int, delta: float, accountant: dp_accounting.PrivacyAccountant) -> float:
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("z, q, rounds, delta, pinned", SETTINGS)
def test_rdp_epsilon_matches_dp_accounting(z: float, q: float, rounds: int, delta: float, pinned: float) -> None:
    eps = acc.epsilon(z, q, rounds, delta)
    assert eps == pytest.approx(_direct(z, q, rounds, delta, RdpAccountant()), rel=1e-9)
    assert eps == pytest.approx(pinned, rel=1e-6)


def test_pld_epsilon_matches_dp_accounting_and_is_tighter() -> None:
    z, q, rounds, delta, rdp_eps = SETTINGS[0]
    eps = acc.epsilon(z, q, rounds, delta, method="pld")
    assert eps == pytest.approx(_direct(z, q, rounds, delta, PLDAccountant()), rel=1e-6)
    assert eps == pytest.approx(1.1496262325424933, rel=1e-4)
    assert eps < rdp_eps


def test_epsilon_edge_cases() -> None:
    assert acc.epsilon(1.0, 0.01, 0, 1e-6) == 0.0
    assert acc.epsilon(0.0, 0.01, 10, 1e-6) == math.inf
    # more noise, fewer rounds or lower sampling spends less
    assert acc.epsilon(2.0, 0.01, 200, 1e-6) < acc.epsilon(1.0, 0.01, 200, 1e-6)
    assert acc.epsilon(1.0, 0.01, 100, 1e-6) < acc.epsilon(1.0, 0.01, 200, 1e-6)
    for bad in [dict(delta=1.0), dict(delta=0.0), dict(sample_rate=0.0), dict(sample_rate=1.5),
                dict(rounds=-1), dict(noise_multiplier=-1.0)]:
        args = dict(noise_multiplier=1.0, sample_rate=0.01, rounds=10, delta=1e-6) | bad
        with pytest.raises(ValueError):
            acc.epsilon(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("target, rounds, q", [(8.0, 200, 0.01), (1.0, 50, 0.05), (3.0, 1000, 0.02)])
def test_calibrate_inverts_epsilon(target: float, rounds: int, q: float) -> None:
    z = acc.calibrate(target, 1e-6, rounds, q)
    eps = acc.epsilon(z, q, rounds, 1e-6)
    assert eps <= target * (1 + 1e-9)  # never overspends
    assert eps == pytest.approx(target, rel=0.01)


def test_calibrate_pinned() -> None:
    # epsilon 8 at delta 1e-6 over 200 rounds at q = 0.01 needs z ~= 0.5592 (RDP)
    assert acc.calibrate(8.0, 1e-6, 200, 0.01) == pytest.approx(0.5592378, abs=2e-5)


def test_ledger_state_round_trips_and_trips_the_budget() -> None:
    state = acc.PrivacyLedgerState(noise_multiplier=1.0, sample_rate=0.01, delta=1e-6, epsilon_budget=0.5)
    restored = acc.PrivacyLedgerState.from_json_dict(json.loads(json.dumps(state.to_json_dict())))
    assert restored == state
    assert not acc.budget_exhausted(state)
    rounds = 0
    while not acc.budget_exhausted(state):
        state = acc.step(state)
        rounds += 1
        assert rounds < 200
    assert state.rounds_done == rounds
    assert state.epsilon_spent == pytest.approx(acc.epsilon(1.0, 0.01, rounds, 1e-6))
    assert state.epsilon_spent >= 0.5 > acc.epsilon(1.0, 0.01, rounds - 1, 1e-6)
    again = acc.PrivacyLedgerState.from_json_dict(json.loads(json.dumps(state.to_json_dict())))
    assert again == state and acc.budget_exhausted(again)
    with pytest.raises(ValueError, match="unknown privacy ledger fields"):
        acc.PrivacyLedgerState.from_json_dict(state.to_json_dict() | {"epsilon_left": 1})
