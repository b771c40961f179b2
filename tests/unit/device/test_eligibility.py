"""Eligibility policy, the diurnal availability model, and simulated dropouts."""

import dataclasses


from pocketfed.config import Availability, DeviceConfig, EligibilityConfig
from pocketfed.device import eligibility
from pocketfed.device.eligibility import ALWAYS, DeviceState, check
from pocketfed.server.availability import DroppingBackend
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask


def test_each_rule_of_the_policy():
    pol = EligibilityConfig()
    assert check(ALWAYS, pol) is None
    cases = {"not charging": {"charging": False}, "in use": {"idle": False}, "metered network": {"unmetered": False},
             "battery low": {"battery_pct": 10.0}, "too hot": {"temperature_c": 45.0}}
    for reason, change in cases.items():
        assert check(dataclasses.replace(ALWAYS, **change), pol) == reason
    assert check(DeviceState(False, False, False, 1.0, 90.0),
                 EligibilityConfig(False, False, False, min_battery_pct=0, max_temperature_c=100)) is None


def test_diurnal_swing_night_beats_afternoon_and_is_seeded():
    devices = [f"d{i}" for i in range(400)]
    cfg = DeviceConfig(availability=Availability.diurnal, start_hour=3.0, hours_per_round=12.0)
    night, _ = eligibility.filter_round(devices, 0, 0, cfg)  # 03:00 +- 3 h
    day, why = eligibility.filter_round(devices, 1, 0, cfg)  # 15:00 +- 3 h
    assert len(night) > 0.3 * len(devices) and len(day) < 0.05 * len(devices)
    assert set(why.values()) <= {"not charging", "in use", "metered network", "battery low", "too hot"}
    assert eligibility.filter_round(devices, 0, 0, cfg) == (night, eligibility.filter_round(devices, 0, 0, cfg)[1])
    assert eligibility.filter_round(devices, 0, 0, DeviceConfig())[0] == devices  # "always"


class Echo:
    def run(self, tasks):
        return [TrainResult(t.round, t.device_id, {}, 1) for t in tasks]

    def close(self):
        pass


def test_dropping_backend_keeps_task_order_and_rate():
    tasks = [TrainTask(3, f"d{i}", {}, None, 0) for i in range(1000)]
    out = DroppingBackend(Echo(), 0.1, seed=0).run(tasks)
    assert [x.device_id for x in out] == [t.device_id for t in tasks]
    dropped = sum(isinstance(x, Dropout) for x in out)
    assert 70 <= dropped <= 130  # Binomial(1000, 0.1): mean 100, sd 9.5
    assert [type(x) for x in DroppingBackend(Echo(), 0.1, seed=0).run(tasks)] == [type(x) for x in out]
