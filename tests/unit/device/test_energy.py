"""Energy and time estimates against hand-computed numbers; caps stop a round early."""

import pytest

from pocketfed.device.energy import affordable_steps, round_cost
from pocketfed.device.profiles import BUILTIN, DeviceProfile, Network

P = DeviceProfile("t", train_memory_mb=100, cores=1, battery_mah=1000, battery_volts=4.0, joules_per_flop=1e-9,
                  joules_per_byte=1e-6, flops_per_second=1e9, bytes_per_second=1e6, network=Network.wifi, max_rank=4)


def test_round_cost_by_hand():
    c = round_cost(P, flops=2e9, network_bytes=1e6)
    assert c.joules == pytest.approx(2.0 + 1.0)  # 2e9 x 1e-9 + 1e6 x 1e-6
    assert c.mah == pytest.approx(3.0 / (3.6 * 4.0))  # 1 mAh at 4 V = 14.4 J
    assert c.battery_pct == pytest.approx(100 * 3.0 / (1000 * 3.6 * 4.0))
    assert c.device_seconds == pytest.approx(2.0 + 1.0)
    assert BUILTIN["watch"].battery_joules == pytest.approx(308 * 3.6 * 3.85)


def test_caps_cut_whole_steps():
    # each step: 1e9 FLOPs = 1 J and 1 s; the network: 1e6 bytes = 1 J and 1 s
    assert affordable_steps(P, 10, 1e9, 1e6, max_seconds=0, max_battery_pct=0) == 10
    assert affordable_steps(P, 10, 1e9, 1e6, max_seconds=4.5, max_battery_pct=0) == 3  # 1 + 3 x 1 <= 4.5
    pct_per_joule = 100 / (1000 * 3.6 * 4.0)
    assert affordable_steps(P, 10, 1e9, 1e6, 0, max_battery_pct=6.5 * pct_per_joule) == 5
    assert affordable_steps(P, 10, 1e9, 1e6, max_seconds=0.5, max_battery_pct=0) == 0
