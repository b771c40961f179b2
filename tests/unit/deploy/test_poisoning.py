"""Audit finding 1 over the coordinator's HTTP API: one enrolled device uploading all-3e38 values
with a self-reported num_tokens of 10^10 (twice) made the next release's adapter Inf, and every
honest device then failed. Now its token weight is bounded by its task's budget and its update by
the norm bound, the released adapters stay finite, and the honest devices keep training."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load as st_load

from pocketfed import codec
from pocketfed.config import Codec
from pocketfed.server import lifecycle
from pocketfed.server import round as engine
from tests.unit.deploy.http_fixtures import OK, SHAPES, app_for, device, make_coordinator, update


def adapter_of(c, version: int) -> dict[str, torch.Tensor]:
    v = c.store.version(version)
    return st_load(c.store.get_blob(v.adapter_sha))


def test_attack_huge_values_and_inflated_tokens_are_bounded_audit_finding_1(tmp_path):
    c = make_coordinator(tmp_path, goal=3, quorum=3, overselect=1.0)
    app = app_for(c)
    evil, a, b = device(app, "evil"), device(app, "a"), device(app, "b")
    huge = codec.encode({k: torch.full(s, 3e38) for k, s in SHAPES.items()}, Codec.float32)
    budget = engine.token_budget(c.cfg.train, c.cfg.data.seq_len)  # 4 steps x 4 rows x 128 = 2048
    honest_norm = math.sqrt(sum(math.prod(s) for s in SHAPES.values())) * 0.01  # update(0.01)
    for idx in range(3):  # two poisoned rounds (the audit's), then one the honest devices train in alone
        tasks = {d: d.checkin(OK).task for d in (evil, a, b)}
        assert all(t is not None and t.round_index == idx for t in tasks.values())
        for d, t in tasks.items():
            payload = huge if d is evil and idx < 2 else update(0.01)
            d.upload(t.round_id, payload, 1 << 20)
            d.commit(t.round_id, payload, 10**10 if d is evil else 100, {"train_loss": 1.0})
        r = c.store.rounds()[-2] if c.store.open_round() else c.store.rounds()[-1]
        assert r.status == "committed" and r.idx == idx, r.reason
        if idx < 2:  # the bounds were at work: evil's weight is its budget, its update 3 x the median norm
            assert r.metrics["tokens_bounded"] == 1 and r.metrics["clipped"] == 1
            assert r.metrics["tokens"] == budget + 200
            assert abs(r.metrics["norm_bound"] - 3 * honest_norm) < 1e-6  # median of (h, h, huge) = h
            assert r.metrics["update_norm"] <= r.metrics["norm_bound"] + 1e-6
    assert c.store.latest_version().version == 3  # sim.rounds = 3: all committed, the last by the honest ones
    for v in range(4):  # every released adapter is finite, and moved at most by the bound per round
        assert all(torch.isfinite(t).all() for t in adapter_of(c, v).values())
        if v:
            step = math.sqrt(sum(float((adapter_of(c, v)[k] - adapter_of(c, v - 1)[k]).norm()) ** 2 for k in SHAPES))
            assert 0 < step <= 3 * honest_norm + 1e-6


def test_attack_a_round_whose_result_is_not_finite_fails_and_releases_nothing(tmp_path, monkeypatch):
    c = make_coordinator(tmp_path, goal=2, quorum=2, overselect=1.0)
    app = app_for(c)
    a, b = device(app, "a"), device(app, "b")

    def inf_mean(contributions, plan, like, *args, **kwargs):  # what an overflow in aggregation would give
        return {k: torch.full_like(v, math.inf) for k, v in like.items()}

    monkeypatch.setattr(engine, "aggregate", inf_mean)
    for d in (a, b):
        t = d.checkin(OK).task
        d.upload(t.round_id, update(0.01), 1 << 20)
        d.commit(t.round_id, update(0.01), 100, {})
    first = c.store.rounds()[0]
    assert first.status == "failed" and "not finite" in first.reason and first.new_version is None
    assert c.store.latest_version().version == 0  # nothing committed, nothing released
    monkeypatch.undo()
    lifecycle.tick(c, __import__("time").time())
    t = a.checkin(OK).task  # the next round draws anew from version 0
    assert t is not None and t.round_index == 0 and t.round_id != first.round_id


def test_attack_a_smuggled_scale_tensor_is_refused_on_upload_audit_finding_5(tmp_path):
    from safetensors.torch import save

    from tests.unit.deploy.http_fixtures import refused, snapshot

    c = make_coordinator(tmp_path, goal=2, quorum=2, overselect=1.0)
    app = app_for(c)
    a = device(app, "a")
    device(app, "b")
    t = a.checkin(OK).task
    tensors = {k: torch.full(s, 0.01) for k, s in SHAPES.items()}
    smuggled = save({**tensors, "base_model.model.l0.lora_A.weight.__scale": torch.ones(1)})  # float32 has no scales
    a.upload(t.round_id, smuggled, 1 << 20)
    before = snapshot(tmp_path)
    err = refused(lambda: a.commit(t.round_id, smuggled, 10, {}), 422, "invalid_update")
    assert "outside the adapter schema under the codec float32" in err.detail and "__scale" in err.detail
    assert snapshot(tmp_path)["updates"] == before["updates"] == []
