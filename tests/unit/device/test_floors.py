"""The device's privacy floors: which task privacy plans a device refuses, with hand-checked figures."""

from __future__ import annotations

import math

import pytest

from pocketfed.device.agent import device_name
from pocketfed.device.floors import PrivacyFloors
from pocketfed.errors import UserError
from pocketfed.protocol.wire import PrivacySpec


def spec(dp: str = "central", z: float = 1.0, c: float = 1.0, n: int = 10, secagg: bool = False) -> PrivacySpec:
    return PrivacySpec(dp=dp, clip_norm=c, noise_multiplier=z, expected_devices=n, secagg=secagg, frac_bits=16,
                       secagg_degree=0)


def test_defaults_let_every_documented_flow_run() -> None:
    floors = PrivacyFloors()
    assert (floors.min_noise_multiplier, floors.max_clip_norm, floors.max_expected_devices, floors.require_dp) == (
        0.5, 10.0, 1000, False)
    for ok in (None, spec("none", 0.0), spec("none", 0.0, secagg=True), spec("central", 0.5, 1.0),
               spec("central", 1.0, 10.0), spec("distributed", 0.5, 0.05, 1000, secagg=True)):
        assert floors.refusal(ok) is None, ok


@pytest.mark.parametrize("task, floors, says", [
    (spec("central", 0.0), PrivacyFloors(), "noise multiplier 0 is below this device's floor 0.5"),
    (spec("central", 0.49), PrivacyFloors(), "noise multiplier 0.49 is below"),
    (spec("distributed", 0.3, secagg=True), PrivacyFloors(), "noise multiplier 0.3 is below"),
    (spec("central", 2.0), PrivacyFloors(min_noise_multiplier=2.5), "below this device's floor 2.5"),
    (spec("central", 1.0, 10.5), PrivacyFloors(), "clip norm 10.5 is above this device's ceiling 10"),
    # z C / sqrt(n) = 1 * 1 / sqrt(10^6) = 0.001: a thousandth of the noise the device would add alone
    (spec("distributed", 1.0, 1.0, 10**6, secagg=True), PrivacyFloors(),
     "expected cohort 1000000 is above this device's ceiling 1000 (--max-expected-devices): its noise share "
     "z C / sqrt(n) = 0.001"),
    (spec("distributed", 1.0, 1.0, 1001, secagg=True), PrivacyFloors(), "expected cohort 1001 is above"),
    # without secure aggregation the server would see this update with std 2 * 0.5 / sqrt(100) = 0.1 of noise
    (spec("distributed", 2.0, 0.5, 100, secagg=False), PrivacyFloors(), "only its share z C / sqrt(n) = 0.1 "),
    (None, PrivacyFloors(require_dp=True), "claims no differential privacy"),
    (spec("none", 0.0, secagg=True), PrivacyFloors(require_dp=True), "claims no differential privacy"),
], ids=["z0", "z-below", "distributed-z-below", "own-floor", "clip", "inflated-n", "n-just-above", "ddp-no-secagg",
        "require-dp-none", "require-dp-secagg-only"])
def test_a_task_below_the_floors_is_refused_with_the_reason(task, floors, says) -> None:
    reason = floors.refusal(task)
    assert reason is not None and says in reason, reason


def test_the_default_noise_floor_costs_epsilon_about_10_per_round() -> None:
    """z = 0.5, one round of the Gaussian mechanism, no sampling: dp-accounting's PLD gives
    epsilon = 9.997 at delta = 1e-5. Checked against the exact curve of the Gaussian mechanism with
    sensitivity 1 and std z (Balle & Wang, ICML 2018, Theorem 8):
        delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z)."""
    from dp_accounting import dp_event, pld

    z = PrivacyFloors().min_noise_multiplier
    acc = pld.PLDAccountant()
    acc.compose(dp_event.GaussianDpEvent(z))
    eps = acc.get_epsilon(1e-5)
    assert eps == pytest.approx(9.997, abs=0.01)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    delta = phi(1 / (2 * z) - eps * z) - math.exp(eps) * phi(-1 / (2 * z) - eps * z)
    assert delta == pytest.approx(1e-5, rel=0.02)  # PLD's epsilon is a (slightly) pessimistic upper bound
    assert delta <= 1e-5


@pytest.mark.parametrize("kwargs, option", [
    ({"min_noise_multiplier": 0.0}, "--min-noise-multiplier"), ({"min_noise_multiplier": math.nan}, "--min-noise-multiplier"),
    ({"max_clip_norm": -1.0}, "--max-clip-norm"), ({"max_expected_devices": 0}, "--max-expected-devices"),
])
def test_bad_floors_name_the_option(kwargs, option) -> None:
    with pytest.raises(UserError, match=option):
        PrivacyFloors(**kwargs)


def test_default_name_is_random_kept_in_home_and_not_the_data_folder(tmp_path) -> None:
    a, b = tmp_path / "alice-medical-notes", tmp_path / "other"
    a.mkdir()
    name = device_name(a, None)
    assert name.startswith("device-") and len(name[7:]) == 8 and set(name[7:]) <= set("0123456789abcdef")
    assert "alice" not in name
    assert device_name(a, None) == name  # a restart registers the same name
    assert (a / "device.name").read_text().strip() == name
    b.mkdir()
    assert device_name(b, None) != name  # 32 random bits: another home, another name (p = 2^-32 of a clash)
    assert device_name(a, "kitchen-tablet") == "kitchen-tablet"  # --name wins
    (a / "device.name").write_text("../../etc/passwd\n")
    with pytest.raises(UserError, match="not a device name"):
        device_name(a, None)
