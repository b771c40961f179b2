"""Accountant: agrees with dp_accounting called directly (also for heterogeneous rounds), calibrate
inverts epsilon, the noise that reached the sum, the coordinator's epsilon, ledger state."""

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


def test_effective_and_coordinator_noise_multipliers_hand_checked() -> None:
    # 4 of 8 shares of std z C / sqrt(8) reached the sum: std z C sqrt(4 / 8), z_eff = sqrt(0.5)
    assert acc.effective_noise_multiplier(1.0, True, 4, 8) == pytest.approx(0.7071067811865476, rel=1e-15)
    assert acc.effective_noise_multiplier(2.0, True, 8, 8) == 2.0
    assert acc.effective_noise_multiplier(1.0, False, 4, 8) == 1.0  # central: the server adds z C itself
    assert acc.coordinator_noise_multiplier(1.0, False, False, 8, 8) == 0.0  # central: it sees each update
    assert acc.coordinator_noise_multiplier(1.0, False, True, 8, 8) == 0.0  # ... or the noiseless secure sum
    assert acc.coordinator_noise_multiplier(2.0, True, False, 16, 16) == 0.5  # one device's share: z / sqrt(n)
    assert acc.coordinator_noise_multiplier(1.0, True, True, 4, 8) == pytest.approx(0.7071067811865476)
    with pytest.raises(ValueError):
        acc.effective_noise_multiplier(1.0, True, 4, 0)


# heterogeneous (q, z, rounds) groups and delta, none of them the defaults
HETEROGENEOUS = [
    ([(0.05, 1.2, 30), (0.05, 0.8, 20)], 1e-5),
    ([(0.02, 1.5, 50), (0.04, 1.1, 50)], 1e-6),
    ([(0.1, 0.9, 100), (0.1, 0.6, 10)], 1e-7),
]


def _direct_groups(groups: list[tuple[float, float, int]], delta: float,
                   accountant: dp_accounting.PrivacyAccountant) -> float:
    for q, z, n in groups:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("groups, delta", HETEROGENEOUS)
@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_heterogeneous_rounds_match_dp_accounting(groups: list[tuple[float, float, int]], delta: float,
                                                  method: acc.Method) -> None:
    direct = _direct_groups(groups, delta, RdpAccountant() if method == "rdp" else PLDAccountant())
    assert acc.epsilon_of(groups, delta, method) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_ledger_stepped_round_by_round_matches_dp_accounting(method: acc.Method) -> None:
    groups = [(0.05, 1.2, 3), (0.1, 0.8, 2)]
    state = acc.PrivacyLedgerState(noise_multiplier=1.0, sample_rate=0.5, delta=1e-5, epsilon_budget=100.0,
                                   method=method)
    for q, z, n in groups:
        for _ in range(n):
            state = acc.step(state, z, q, z)
    assert state.rounds == tuple(groups) and state.rounds_done == 5  # grouped
    direct = _direct_groups(groups, 1e-5, RdpAccountant() if method == "rdp" else PLDAccountant())
    assert state.epsilon_spent == pytest.approx(direct, rel=1e-6)
    coordinator = _direct_groups([(1.0, 1.2, 3), (1.0, 0.8, 2)], 1e-5, RdpAccountant() if method == "rdp"
                                 else PLDAccountant())
    assert state.epsilon_coordinator == pytest.approx(coordinator, rel=1e-9 if method == "rdp" else 2e-3)


def test_coordinator_epsilon_takes_the_least_noisy_rounds_without_amplification() -> None:
    # at most 3 rounds per device: the 3 least noisy of 2 x z=0.8 and 5 x z=1.5, all at q = 1
    direct = _direct_groups([(1.0, 0.8, 2), (1.0, 1.5, 1)], 1e-6, RdpAccountant())
    assert acc.coordinator_epsilon([(1.5, 5), (0.8, 2)], 3, 1e-6) == pytest.approx(direct, rel=1e-9)
    every = _direct_groups([(1.0, 0.8, 2), (1.0, 1.5, 5)], 1e-6, RdpAccountant())
    assert acc.coordinator_epsilon([(1.5, 5), (0.8, 2)], None, 1e-6) == pytest.approx(every, rel=1e-9)
    assert acc.coordinator_epsilon([(0.0, 1), (2.0, 5)], 3, 1e-6) == math.inf  # it saw an update in the clear
    assert acc.coordinator_epsilon([], None, 1e-6) == 0.0


def test_ledger_groups_rounds_and_reads_version_1() -> None:
    state = acc.PrivacyLedgerState(noise_multiplier=1.0, sample_rate=0.01, delta=1e-6, epsilon_budget=8.0,
                                   max_participations=2)
    for z in (1.0, 0.5, 1.0):
        state = acc.step(state, z, None, z)
    assert state.rounds == ((0.01, 1.0, 2), (0.01, 0.5, 1)) and state.coordinator == ((1.0, 2), (0.5, 1))
    assert state.epsilon_coordinator == pytest.approx(acc.epsilon_of([(1.0, 0.5, 1), (1.0, 1.0, 1)], 1e-6))
    assert acc.preview(state) == pytest.approx(acc.epsilon_of([(0.01, 1.0, 3), (0.01, 0.5, 1)], 1e-6))
    assert acc.PrivacyLedgerState.from_json_dict(json.loads(json.dumps(state.to_json_dict()))) == state
    central = acc.step(state)  # the coordinator saw the update: inf, stored as null
    assert central.epsilon_coordinator == math.inf and central.to_json_dict()["epsilon_coordinator"] is None
    assert acc.PrivacyLedgerState.from_json_dict(json.loads(json.dumps(central.to_json_dict()))) == central
    old = {"version": 1, "noise_multiplier": 1.0, "sample_rate": 0.01, "delta": 1e-6, "epsilon_budget": 8.0,
           "rounds_done": 200, "epsilon_spent": 1.641607698197417, "method": "rdp"}
    v1 = acc.PrivacyLedgerState.from_json_dict(old)
    assert v1.rounds == ((0.01, 1.0, 200),) and v1.rounds_done == 200
    assert v1.epsilon_spent == pytest.approx(1.641607698197417)
    assert v1.epsilon_coordinator == math.inf  # version 1 kept no coordinator view: nothing is claimed
    assert acc.step(v1, 1.0, None, 1.0).epsilon_spent == pytest.approx(acc.epsilon(1.0, 0.01, 201, 1e-6))
    with pytest.raises(ValueError, match="unknown privacy ledger version"):
        acc.PrivacyLedgerState.from_json_dict({**old, "version": 3})
    with pytest.raises(ValueError, match="max_participations"):
        acc.PrivacyLedgerState(noise_multiplier=1.0, sample_rate=0.01, delta=1e-6, epsilon_budget=8.0,
                               max_participations=0)
