"""Secure aggregation and central DP through the coordinator's HTTP API, on a synthetic adapter.

The devices here run the same step functions `pocketfed.device.secure_upload.secure_upload` runs,
through signed requests; every refusal is a 4xx with a JSON reason and leaves the state as it was.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from pocketfed import codec
from pocketfed.config import Codec, load_config
from pocketfed.privacy import accountant, dp, secagg
from pocketfed.server import coordinator as co
from pocketfed.protocol import secagg_wire as sw
from tests.unit.deploy.http_fixtures import (OK, SHAPES, Clock, app_for, device, init_params, operator_token, refused,
                                             snapshot)

CLIP = 0.5


def make(folder, privacy: dict, **deploy) -> co.Coordinator:
    cfg = load_config(None, {"sim": {"rounds": 3, "seed": 0}, "privacy": {"clip_norm": CLIP, **privacy},
                             "deploy": {"goal": 4, "quorum": 2, "overselect": 1.0, "deadline_s": 60.0,
                                        "retry_s": 1.0, "secagg_stage_s": 30.0, **deploy}})
    return co.open_coordinator(folder, cfg, "synthetic", init_params)


def full_snapshot(folder) -> dict:
    out = snapshot(folder)
    db = sqlite3.connect(folder / "state.sqlite")
    try:
        out["secagg_rounds"] = db.execute("SELECT * FROM secagg_rounds ORDER BY 1").fetchall()
        out["secagg_messages"] = db.execute("SELECT round_id, device_id, kind FROM secagg_messages ORDER BY 1, 2, 3").fetchall()
    finally:
        db.close()
    return out


def delta(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: torch.randn(s, generator=g) * (0.05 if i % 2 else 0.5) for k, s in SHAPES.items()}


class Party:
    """One device's side of a secagg round: its client, keys and protocol state."""

    def __init__(self, app, name: str):
        self.name, self.client = name, device(app, name)
        self.keys = secagg.generate_keys()
        self.state: secagg.DeviceState | None = None

    def checkin(self) -> int:
        task = self.client.checkin(OK).task
        assert task is not None and task.privacy is not None and task.privacy.secagg
        self.task = task
        return task.round_id

    def advertise(self) -> None:
        advert = secagg.advertise(self.task.round_id, self.keys, self.client.key)  # signed by the device identity
        self.client.secagg_send(self.task.round_id, "keys", sw.to_bytes(sw.keys_arrays(advert)))

    def share(self) -> None:
        view = self.client.secagg_state(self.task.round_id)
        assert view.stage == "share" and view.index is not None and view.params is not None and view.cohort is not None
        self.config = secagg.SecAggConfig(**view.params.model_dump())
        state = secagg.check_directory(secagg.begin(self.config, view.index, self.keys, self.client.key),
                                       directory_of(view, self.task.round_id))
        self.state, msg = secagg.share_keys(state)
        self.client.secagg_send(self.task.round_id, "shares", sw.to_bytes(sw.shares_arrays(msg)))

    def mask(self, vector: np.ndarray) -> None:
        view = self.client.secagg_state(self.task.round_id)
        assert view.stage == "masked" and self.state is not None
        bundle = secagg.SharesForDevice(self.task.round_id, self.state.device_id, tuple(
            secagg.EncryptedShare(s.sender, self.state.device_id, bytes.fromhex(s.nonce), bytes.fromhex(s.ciphertext))
            for s in view.shares or ()))
        self.state, masked = secagg.mask_input(self.state, bundle, vector)
        data = sw.to_bytes(sw.masked_arrays(masked))
        self.client.upload(self.task.round_id, data, chunk_bytes=4096)
        self.client.commit(self.task.round_id, data, num_tokens=0, metrics={})  # nothing per device in the clear

    def sign(self) -> None:
        view = self.client.secagg_state(self.task.round_id)
        assert view.stage == "consistency" and self.state is not None
        self.state, sig = secagg.sign_survivors(self.state, secagg.ConsistencyRequest(self.task.round_id,
                                                                                      frozenset(view.survivors or ())))
        self.client.secagg_send(self.task.round_id, "consistency", sw.to_bytes(sw.signature_arrays(sig)))

    def unmask(self) -> None:
        view = self.client.secagg_state(self.task.round_id)
        assert view.stage == "unmask" and self.state is not None
        request = secagg.UnmaskRequest(self.task.round_id, frozenset(view.survivors or ()), frozenset(view.dropped or ()),
                                       {v: bytes.fromhex(x) for v, x in (view.signatures or {}).items()})
        self.state = secagg.check_consistency(self.state, request)
        resp = secagg.unmask(self.state, request)
        self.client.secagg_send(self.task.round_id, "unmask", sw.to_bytes(sw.unmask_arrays(resp)))


def directory_of(view, round_id: int) -> secagg.KeyDirectory:
    """The key directory a device reads from its stage-"share" view (as `secure_upload` does)."""
    cohort = tuple(secagg.AdvertiseKeys(round_id, bytes.fromhex(a.identity_public), bytes.fromhex(a.enc_public),
                                        bytes.fromhex(a.mask_public), bytes.fromhex(a.signature)) for a in view.cohort)
    return secagg.KeyDirectory(round_id, view.index, cohort, bytes.fromhex(view.graph_seed), frozenset(view.neighbours))


def params_of(c: co.Coordinator, version: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    v = c.store.version(version)
    assert v is not None
    return st_load(c.store.get_blob(v.adapter_sha))


def advertised(tmp_path, n: int = 5) -> tuple[Clock, co.Coordinator, list[Party]]:
    """A secagg round of n devices (t = 3 for n = 5) whose devices all checked in and advertised keys."""
    clock = Clock()
    c = make(tmp_path, {"secagg": True}, goal=n)
    app = app_for(c, clock)
    parties = [Party(app, f"d{i}") for i in range(n)]
    for p in parties:
        p.checkin()
        p.advertise()
    return clock, c, parties


def test_secagg_round_with_dropouts_equals_plain_mean(tmp_path):
    clock, c, parties = advertised(tmp_path)
    for p in parties:
        p.share()
    vectors = [dp.flatten_update(delta(i)) for i in range(5)]
    for p, x in zip(parties[:4], vectors):  # d4 drops before masking
        p.mask(x)
    clock.offset += 31  # the masked stage's deadline passes without d4
    assert parties[0].client.secagg_state(parties[0].task.round_id).stage == "consistency"
    for p in parties[:3]:  # d3 drops after masking: it is still in the sum
        p.sign()
    clock.offset += 31  # the consistency stage's deadline passes without d3
    assert parties[0].client.secagg_state(parties[0].task.round_id).stage == "unmask"
    for p in parties[:3]:
        p.unmask()
    clock.offset += 31
    status = parties[0].client.status(operator_token(tmp_path))
    assert status.rounds[0].status == "committed" and status.rounds[0].devices == 4, status.rounds[0]
    expect = np.sum([dp.clip_vector(x, CLIP) for x in vectors[:4]], axis=0) / 4
    got = dp.flatten_update({k: params_of(c, 1)[k] - params_of(c, 0)[k] for k in SHAPES})
    bound = secagg.error_bound(5, c.cfg.privacy.frac_bits) / 4 + 1e-6  # + float32 storage of the adapter
    assert np.abs(got - expect).max() <= bound
    assert np.abs(got).max() > 10 * bound


def test_secagg_below_threshold_fails_cleanly_and_next_round_runs(tmp_path):
    clock = Clock()
    c = make(tmp_path, {"secagg": True})
    app = app_for(c, clock)
    parties = [Party(app, f"d{i}") for i in range(4)]
    rid = [p.checkin() for p in parties][0]
    for p in parties:
        p.advertise()
    for p in parties:
        p.share()
    for i, p in enumerate(parties):
        p.mask(dp.flatten_update(delta(i)))
    for p in parties:
        p.sign()
    parties[0].unmask()  # 1 of 4 answers; t = 3
    clock.offset += 31
    status = parties[0].client.status(operator_token(tmp_path))
    failed = [r for r in status.rounds if r.round_id == rid][0]
    assert failed.status == "failed" and "threshold is 3" in failed.reason, failed
    assert status.version == 0 and status.open_round is not None and status.open_round.idx == 0
    assert status.open_round.stage == "advertise"
    view = parties[1].client.secagg_state(rid)
    assert view.stage == "failed" and "threshold" in view.reason
    # the next round (same training index) runs to a commit with fresh keys
    again = [Party(app, f"e{i}") for i in range(4)]
    for p in again:
        assert p.checkin() != rid
        p.advertise()
    for p in again:
        p.share()
    for i, p in enumerate(again):
        p.mask(dp.flatten_update(delta(i)))
    for p in again:
        p.sign()
    for p in again:
        p.unmask()
    status = again[0].client.status(operator_token(tmp_path))
    done = [r for r in status.rounds if r.round_id == again[0].task.round_id][0]
    assert done.status == "committed" and done.idx == 0 and done.devices == 4, done
    # the next round's cohort is drawn at random: one too small to commit closes at once, as a
    # skipped version of its own, so the version is 1 plus the skipped rounds after the commit
    skipped = [r for r in status.rounds if r.round_id > done.round_id and r.metrics.get("skipped")]
    assert status.version == 1 + len(skipped), status


def test_secagg_refusals_leave_state_unchanged(tmp_path):
    clock = Clock()
    c = make(tmp_path, {"secagg": True}, goal=3, quorum=2, overselect=1.4)  # target 5: one spare device
    app = app_for(c, clock)
    parties = [Party(app, f"d{i}") for i in range(4)]
    rid = [p.checkin() for p in parties][0]
    outsider = device(app, "outsider")  # registered, never assigned
    good_keys = sw.to_bytes(sw.keys_arrays(secagg.advertise(rid, parties[0].keys, parties[0].client.key)))

    def check(fn, status, code):
        before = full_snapshot(tmp_path)
        refused(fn, status, code)
        assert full_snapshot(tmp_path) == before

    check(lambda: outsider.secagg_send(rid, "keys", good_keys), 403, "not_assigned")
    check(lambda: outsider.secagg_state(rid), 403, "not_assigned")
    check(lambda: parties[0].client.secagg_send(rid + 7, "keys", good_keys), 404, "unknown_round")
    short = {"enc_public": np.zeros(31, np.uint8), "mask_public": np.zeros(32, np.uint8)}
    check(lambda: parties[0].client.secagg_send(rid, "keys", sw.to_bytes(short)), 422, "invalid_secagg_message")
    extra = {**sw.keys_arrays(secagg.advertise(rid, parties[0].keys, parties[0].client.key)), "text": np.zeros(4, np.uint8)}
    check(lambda: parties[0].client.secagg_send(rid, "keys", sw.to_bytes(extra)), 422, "invalid_secagg_message")
    # keys signed by another device's identity, or for another round: the signature must be the sender's
    someone_elses = sw.to_bytes(sw.keys_arrays(secagg.advertise(rid, parties[0].keys, parties[1].client.key)))
    check(lambda: parties[0].client.secagg_send(rid, "keys", someone_elses), 422, "invalid_secagg_message")
    stale = sw.to_bytes(sw.keys_arrays(secagg.advertise(rid + 1, parties[0].keys, parties[0].client.key)))
    check(lambda: parties[0].client.secagg_send(rid, "keys", stale), 422, "invalid_secagg_message")
    check(lambda: parties[0].client.secagg_send(rid, "consistency", b"x"), 409, "wrong_stage")
    check(lambda: parties[0].client.secagg_send(rid, "keys", b"not safetensors"), 422, "invalid_secagg_message")
    check(lambda: parties[0].client.secagg_send(rid, "shares", b"x"), 409, "wrong_stage")  # shares during advertise
    check(lambda: parties[0].client.secagg_send(rid, "unmask", b"x"), 409, "wrong_stage")
    for p in parties[:3]:
        p.advertise()  # goal 3 reached: the cohort is d0-d2
    check(lambda: parties[0].client.secagg_send(rid, "keys", good_keys), 409, "wrong_stage")  # too late / duplicate
    check(lambda: parties[3].advertise(), 409, "wrong_stage")  # d3 was assigned but missed the cohort
    check(lambda: parties[3].client.secagg_send(rid, "shares", b"x"), 403, "not_in_cohort")
    parties[0].share()
    check(lambda: parties[0].client.secagg_send(rid, "shares", b"x"), 409, "duplicate_upload")
    view = parties[1].client.secagg_state(rid)
    state = secagg.check_directory(secagg.begin(secagg.SecAggConfig(**view.params.model_dump()), view.index,
                                                parties[1].keys, parties[1].client.key), directory_of(view, rid))
    state, msg = secagg.share_keys(state)
    arrays = sw.shares_arrays(msg)
    missing = dict(list(arrays.items())[:-1])  # a share for one holder left out
    check(lambda: parties[1].client.secagg_send(rid, "shares", sw.to_bytes(missing)), 422, "invalid_secagg_message")
    stranger = {**arrays, "share/9": next(iter(arrays.values()))}  # a holder outside the cohort
    check(lambda: parties[1].client.secagg_send(rid, "shares", sw.to_bytes(stranger)), 422, "invalid_secagg_message")
    wrong_size = {k: v[:-1] for k, v in arrays.items()}
    check(lambda: parties[1].client.secagg_send(rid, "shares", sw.to_bytes(wrong_size)), 422, "invalid_secagg_message")
    # a masked input before the masked stage, and one of the wrong length
    check(lambda: parties[0].client.upload(rid, b"\0" * 64, 64), 409, "wrong_stage")
    parties[1].share()
    parties[2].share()
    data = sw.to_bytes({"masked": np.zeros(sum(np.prod(s) for s in SHAPES.values()) + 1, np.uint32)})
    parties[0].client.upload(rid, data, 4096)
    check(lambda: parties[0].client.commit(rid, data, 10, {}), 422, "invalid_update")


def test_central_dp_epsilon_per_round_restart_and_budget_stop(tmp_path):
    z, delta_ = 1.0, 1e-5
    eps = [accountant.epsilon(z, 1.0, r, delta_) for r in (1, 2, 3)]
    privacy = {"dp": "central", "noise_multiplier": z, "delta": delta_, "target_epsilon": (eps[1] + eps[2]) / 2}

    def one_round(app, names):
        for name in names:
            d = device(app, name)
            task = d.checkin(OK).task
            assert task is not None and task.privacy is not None and task.privacy.dp == "central"
            plan = task.privacy.to_plan(task.codec)
            assert plan.clip_norm == CLIP and plan.device_noise_std == 0.0
            x, unclipped = dp.privatize_update(delta(1), plan.clip_norm, plan.device_noise_std)
            data = codec.encode(dp.unflatten_update(x, delta(1)), Codec.float32)
            d.upload(task.round_id, data, 4096)
            d.commit(task.round_id, data, 10, {"unclipped": float(unclipped)})
        return d.status(operator_token(tmp_path))

    c = make(tmp_path, privacy, goal=2, quorum=1)
    status = one_round(app_for(c), ["a", "b"])
    assert status.rounds[0].metrics["epsilon_recipients"] == pytest.approx(eps[0], rel=1e-9)
    assert status.privacy is not None and status.privacy["epsilon_recipients"] == pytest.approx(eps[0], rel=1e-9)
    assert status.privacy["epsilon_coordinator"] is None  # central DP: the coordinator sees each update
    assert status.privacy["rounds"] == 1 and not status.stopped
    # the server added N(0, (z C)^2) to the sum, then divided by goal: std z C / goal on the mean.
    # 32 coordinates: the RMS / std ratio lies in [0.5, 1.6] but for ~1e-5 of draws (chi-square, 32 dof)
    got = dp.flatten_update({k: params_of(c, 1)[k] - params_of(c, 0)[k] for k in SHAPES})
    noise = got - dp.clip_vector(dp.flatten_update(delta(1)), CLIP)
    rms, std = float(np.sqrt(np.mean(noise ** 2))), z * CLIP / 2
    assert 0.5 * std < rms < 1.6 * std, (rms, std)
    c.store.close()
    c = make(tmp_path, privacy, goal=2, quorum=1)  # a restart: the ledger comes back from the store
    app = app_for(c)
    status = one_round(app, ["c", "d"])
    assert [r.metrics["epsilon_recipients"] for r in status.rounds if r.status == "committed"] == pytest.approx(eps[:2], rel=1e-9)
    assert status.done and "privacy budget is spent" in status.stopped and status.open_round is None
    assert status.rounds_applied == 2 < status.rounds_planned
    late = device(app, "late").checkin(OK)
    assert late.done and late.task is None and "privacy budget" in late.reason


def test_secagg_with_distributed_dp_carries_each_devices_noise_share(tmp_path):
    z, n = 1.0, 4
    c = make(tmp_path, {"secagg": True, "dp": "distributed", "noise_multiplier": z}, goal=n)
    app = app_for(c, Clock())
    parties = [Party(app, f"d{i}") for i in range(n)]
    for p in parties:
        p.checkin()
        p.advertise()
    for p in parties:
        p.share()
    share_std = parties[0].task.privacy.to_plan(parties[0].task.codec).device_noise_std
    assert share_std == pytest.approx(dp.distributed_noise_std(z, CLIP, n), rel=1e-12)  # z C / sqrt(n)
    for i, p in enumerate(parties):  # each device: clip, then its own share of the noise, then mask
        x, _ = dp.privatize_update(delta(i), p.task.privacy.clip_norm, share_std)
        p.mask(x)
    for p in parties:
        p.sign()
    for p in parties:
        p.unmask()
    status = parties[0].client.status(operator_token(tmp_path))
    assert status.rounds[0].status == "committed" and status.rounds[0].devices == n, status.rounds[0]
    assert status.rounds[0].metrics["epsilon_recipients"] > 0
    got = dp.flatten_update({k: params_of(c, 1)[k] - params_of(c, 0)[k] for k in SHAPES})
    clean = np.sum([dp.clip_vector(dp.flatten_update(delta(i)), CLIP) for i in range(n)], axis=0) / n
    # n shares of std z C / sqrt(n) sum to std z C, the central noise; / n on the mean.
    # 32 coordinates: the RMS / std ratio lies in [0.5, 1.6] but for ~1e-5 of draws (chi-square, 32 dof)
    rms, std = float(np.sqrt(np.mean((got - clean) ** 2))), z * CLIP / n
    assert 0.5 * std < rms < 1.6 * std, (rms, std)


def test_secagg_routing_is_built_once_per_stage_not_per_poll(tmp_path, monkeypatch):
    calls = {"key_directories": 0, "route_shares": 0}
    for name in calls:
        real = getattr(secagg, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(secagg, name, counting)
    _, _, parties = advertised(tmp_path)
    for p in parties:
        p.share()
        p.client.secagg_state(p.task.round_id)  # a second poll of the same stage
    assert calls["key_directories"] == 2  # the check when the stage opens + one build for all 10 polls
    for i, p in enumerate(parties):
        p.mask(dp.flatten_update(delta(i)))
    assert calls["route_shares"] == 1
    for p in parties:
        p.sign()
    for p in parties:
        p.unmask()
    assert parties[0].client.status(operator_token(tmp_path)).rounds[0].status == "committed"
