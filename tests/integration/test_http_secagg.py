"""Secure aggregation over loopback TLS with the real device loop, on the `tiny` model.

One coordinator (uvicorn, in a thread) and device loops (`run_device`, in threads), running the
active-adversary protocol: signed keys, the devices' own checks, the consistency round. Round 0:
five devices; one stops after sending its key shares (dropped before masking), one after sending
its masked input (dropped after masking: it signs nothing, but its input is in the sum). The round
commits and the new global adapter equals the plain mean of the survivors' clipped updates within
secagg's fixed-point bound. Round 1: three of five devices stop after masking, leaving 2 < t = 3
to sign the survivor set: the round fails, the model is unchanged, and a retry with fresh devices
commits.

The waits fail only when nothing moves (no device event, no round state change) for `STALL_S`,
never on the clock alone. The protocol's own stage deadline (`STAGE_S`) is the one fixed time
here: an honest device that misses it counts as dropped. It is long enough that a device's next
message (one key agreement, a few ms of work) lands in time on a heavily loaded box, and short
enough that the three stages which wait out a dropped device cost well under a minute each.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from tests.conftest import CAP_S, wait_for

# pytest's --timeout is a last resort far above any healthy run; the waits below fail on a stall first.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine on quiet hills "
         "and rivers run to the sea under old bridges where children sing of summer rain").split()
CLIP, STAGE_S = 0.05, 20.0  # stages wait out their deadline when a device drops


class Stop(Exception):
    """Raised from a device's event hook: the device process 'dies' at that point."""


def test_secagg_rounds_over_tls_with_dropouts(tmp_path, monkeypatch):
    import uvicorn
    from safetensors.torch import load as st_load

    from pocketfed.config import load_config
    from pocketfed.device import ledger
    from pocketfed.device import task as device_task
    from pocketfed.device.agent import run_device
    from pocketfed.model import zoo
    from pocketfed.model.zoo import tiny_dir
    from pocketfed.privacy import dp, secagg
    from pocketfed.server import coordinator as co
    from pocketfed.server.http.app import create_app
    from pocketfed.server.http.certs import make_dev_certs, server_files
    from tests.integration.test_http_rounds import free_port

    tiny_dir()
    for i in range(12):
        rng = random.Random(i)
        (tmp_path / "data" / f"dev{i}").mkdir(parents=True)
        (tmp_path / "data" / f"dev{i}" / "notes.txt").write_text(
            "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(8)))
    make_dev_certs(tmp_path / "certs")
    cfg = load_config(None, {
        "model": {"name": "tiny"}, "data": {"seq_len": 32, "min_train_tokens": 32, "test_fraction": 0.2},
        "train": {"steps": 2, "batch_size": 4, "lr": 5e-3}, "sim": {"rounds": 2, "seed": 0},
        "privacy": {"secagg": True, "clip_norm": CLIP},
        # overselect 2: an expected cohort of 10 >= the 10 devices, so q = 1 and every registered device
        # is drawn into every round (Poisson sampling at q < 1 would leave out devices this test scripts)
        "deploy": {"goal": 5, "overselect": 2.0, "quorum": 3, "deadline_s": 3600.0, "retry_s": 0.3,
                   "secagg_stage_s": STAGE_S},
    })

    def init_params():
        from pocketfed.model import lora
        from pocketfed.model.zoo import load_base

        return lora.get_state(lora.attach(load_base("tiny").model, cfg.lora, seed=cfg.sim.seed))

    c = co.open_coordinator(tmp_path / "state", cfg, "tiny", init_params)
    tokens = co.enroll(c.store, 12)  # one per device, as an operator hands them out
    port = free_port()
    cert, key = server_files(tmp_path / "certs")
    server = uvicorn.Server(uvicorn.Config(create_app(c), host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(cert), ssl_keyfile=str(key)))
    threading.Thread(target=server.run, daemon=True).start()

    updates: dict[tuple[str, int], object] = {}
    real_run_task = device_task.run_task

    one_at_a_time = threading.Lock()  # real devices are processes; threads here must not load or train at once

    def recording_run_task(model, train, task):  # the test keeps each device's raw update to check the sum
        with one_at_a_time:
            result = real_run_task(model, train, task)
        updates[(task.device_id, task.round)] = result.update
        return result

    def serial_load_base(*args, **kwargs):
        with one_at_a_time:
            return real_load_base(*args, **kwargs)

    real_load_base = zoo.load_base
    monkeypatch.setattr(device_task, "run_task", recording_run_task)
    monkeypatch.setattr(zoo, "load_base", serial_load_base)
    outcome: dict[str, str] = {}
    events: list[tuple] = []
    t0 = time.perf_counter()

    def start(i: int, stop_at: tuple[int, str] | None = None) -> threading.Thread:
        def hook(kind, info):
            if kind not in ("wait", "unreachable"):
                events.append((round(time.perf_counter() - t0, 2), i, kind, info))
            if stop_at and kind == "secagg" and (info["round"], info["step"]) == stop_at:
                raise Stop(f"dev{i} stops after {stop_at[1]}")

        def run():
            try:
                run_device(f"https://127.0.0.1:{port}", tmp_path / "certs" / "ca.pem", tmp_path / "data" / f"dev{i}",
                           tmp_path / "homes" / f"dev{i}", name=f"dev{i}", threads=1, patience_s=300, max_wait_s=0.5,
                           on_event=hook, enrollment_token=tokens[i])
                outcome[f"dev{i}"] = "done"
            except Stop as e:
                outcome[f"dev{i}"] = str(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def rounds():
        return c.store.rounds()

    def progress():  # any device event or round state change is progress
        return len(events), [(r.round_id, r.status) for r in rounds()]

    t0 = time.perf_counter()
    try:
        wait_for("the server", lambda: server.started, progress)  # a round opens once 3 (the quorum) registered
        # ---- round 0: dev3 drops before masking, dev4 after -----------------------------------
        threads = [start(0, (1, "masked")), start(1), start(2), start(3, (0, "shares")), start(4, (0, "masked"))]
        wait_for("round 0 to close", lambda: any(r.status != "open" for r in rounds()), progress)
        round0_s = time.perf_counter() - t0
        r0 = rounds()[0]
        if r0.status != "committed":
            print("\n".join(map(str, events)), r0.reason)
        assert r0.status == "committed", r0.reason
        assert r0.participants == ["dev0", "dev1", "dev2", "dev4"]
        before, after = (st_load(c.store.get_blob(c.store.version(v).adapter_sha)) for v in (0, 1))
        got = dp.flatten_update({k: after[k] - before[k] for k in after})
        clipped = [dp.privatize_update(updates[(d, 0)], CLIP, 0.0)[0] for d in r0.participants]
        expect = np.mean(clipped, axis=0)
        bound = secagg.error_bound(5, cfg.privacy.frac_bits) / 4 + 1e-7
        assert np.abs(got - expect).max() <= bound, np.abs(got - expect).max()
        assert np.abs(expect).max() > 100 * bound

        # ---- round 1, first try: 3 of 5 stop after masking; 2 < t = 3 unmask -> failed -------------
        threads += [start(5, (1, "masked")), start(6, (1, "masked"))]
        outcome_before = dict(outcome)
        wait_for("round 1 to fail", lambda: len(rounds()) >= 2 and rounds()[1].status != "open", progress)
        r1 = rounds()[1]
        assert r1.status == "failed" and "threshold is 3" in r1.reason, r1
        assert c.store.latest_version().version == 1  # the model did not change
        # ---- round 1, retry: fresh devices join the two left; it commits ----------------------------
        threads += [start(i) for i in (7, 8, 9)]
        wait_for("the retry to commit", lambda: c.store.latest_version().version == 2, progress)
        assert rounds()[2].status == "committed" and rounds()[2].idx == 1
        wait_for("the device loops to end", lambda: not any(t.is_alive() for t in threads), progress)
    finally:
        server.should_exit = True
    total_s = time.perf_counter() - t0
    print(f"secagg over HTTPS: round 0 (5 devices, 2 dropouts) {round0_s:.1f} s; all rounds {total_s:.1f} s")
    assert outcome_before["dev3"] == "dev3 stops after shares" and outcome_before["dev4"] == "dev4 stops after masked"
    assert outcome["dev0"] == "dev0 stops after masked" and outcome["dev1"] == "done", outcome

    # ---- the ledgers: every secagg message written down; the summary says what left ---------------------
    kinds = {k for k, _ in ledger.summarize(tmp_path / "homes" / "dev1").by_kind.items()}
    # no metrics: under secure aggregation nothing per device leaves in the clear
    assert kinds == {"registration", "checkin", "secagg_keys", "secagg_shares", "masked_update", "secagg_signature",
                     "unmask_shares"}
    sentence = ledger.summarize(tmp_path / "homes" / "dev1").sentence
    assert ("model updates (masked), key-agreement messages, registration, check-ins; no raw data left this device"
            in sentence)
    assert set(ledger.summarize(tmp_path / "homes" / "dev3").by_kind) == {"registration", "checkin", "secagg_keys",
                                                                          "secagg_shares"}


def test_secure_upload_over_http_and_attack_by_a_doctored_key_directory(tmp_path, monkeypatch):
    """`secure_upload` itself, five devices in threads over the in-process app (no training, no TLS):
    d4 stops after its shares, d3 after its masked input; the sum is the plain mean of d0-d3. Then a
    server that swaps one neighbour's X25519 key in one device's directory: that device refuses
    (SecAggError) before sending anything more, and its ledger shows no shares."""
    import json

    from pocketfed.device import ledger
    from pocketfed.device.secure_upload import secure_upload
    from pocketfed.privacy import dp, secagg
    from pocketfed.server import device_requests
    from tests.unit.deploy.http_fixtures import SHAPES, Clock, app_for
    from tests.unit.deploy.test_http_secagg import CLIP, Party, delta, make, params_of

    def run_round(folder, parties, stop_at, vectors, clock):
        errors: dict[str, str] = {}
        steps: list[tuple[str, str]] = []
        for p in parties:
            p.checkin()

        def device(p, x):
            def emit(kind, info):
                steps.append((p.name, info["step"]))
                if stop_at.get(p.name) == info["step"]:
                    raise Stop(info["step"])

            try:
                secure_upload(p.client, lambda fn, *a: fn(*a), folder / p.name, "server", p.task, x, {}, 0, emit)
            except (Stop, secagg.SecAggError) as e:
                errors[p.name] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=device, args=(p, x), daemon=True) for p, x in zip(parties, vectors)]
        for t in threads:
            t.start()
        seen, still = -1, time.monotonic()
        while any(t.is_alive() for t in threads):  # a stage that waits for a dropped device: pass its deadline
            time.sleep(0.2)
            if len(steps) != seen:
                seen, still = len(steps), time.monotonic()
            elif time.monotonic() - still > 2.0:
                clock.offset += 31
                still = time.monotonic()
            assert time.monotonic() - still < 120
        return errors, steps

    clock = Clock()
    c = make(tmp_path / "state", {"secagg": True}, goal=5)
    app = app_for(c, clock)
    vectors = [dp.flatten_update(delta(i)) for i in range(5)]
    parties = [Party(app, f"d{i}") for i in range(5)]
    errors, steps = run_round(tmp_path, parties, {"d4": "shares", "d3": "masked"}, vectors, clock)
    assert errors == {"d4": "Stop: shares", "d3": "Stop: masked"}, errors
    assert ("d0", "consistency") in steps and ("d3", "consistency") not in steps
    got = dp.flatten_update({k: params_of(c, 1)[k] - params_of(c, 0)[k] for k in SHAPES})
    expect = np.sum([dp.clip_vector(x, CLIP) for x in vectors[:4]], axis=0) / 4
    assert np.abs(got - expect).max() <= secagg.error_bound(5, c.cfg.privacy.frac_bits) / 4 + 1e-6
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "d0" / ledger.LEDGER_FILE).read_text().splitlines()]
    assert kinds == ["secagg_keys", "secagg_shares", "masked_update", "secagg_signature", "unmask_shares"]
    unmask = json.loads((tmp_path / "d0" / ledger.LEDGER_FILE).read_text().splitlines()[-1])
    # the schema came from the request: b-shares of the 4 survivors, the s-share of d4 (dropped)
    assert sorted(name.split("/")[0] for name, _, _ in unmask["arrays"]) == ["key"] + ["self"] * 4

    # ---- the next round, the same five devices: the server doctors d1's key directory -------------
    real_view = device_requests.secagg_view

    def doctored_view(c_, round_id, device_id, now):
        out = real_view(c_, round_id, device_id, now)
        if out.get("stage") == "share" and device_id == "d1":  # a consistent liar: the seed of the doctored list
            victim = next(v for v in out["neighbours"])
            out["cohort"] = [dict(a) for a in out["cohort"]]
            out["cohort"][victim]["enc_public"] = "ab" * 32
            doctored = [secagg.AdvertiseKeys(round_id, *(bytes.fromhex(a[k]) for k in ("identity_public", "enc_public",
                                                                                         "mask_public", "signature")))
                        for a in out["cohort"]]
            out["graph_seed"] = secagg.graph_seed(round_id, doctored).hex()  # the full graph: N(u) is everyone still
        return out

    monkeypatch.setattr(device_requests, "secagg_view", doctored_view)
    monkeypatch.setattr("pocketfed.server.coordinator.secagg_view", doctored_view)
    before = len((tmp_path / "d1" / ledger.LEDGER_FILE).read_text().splitlines())
    errors, steps = run_round(tmp_path, parties, {}, vectors, clock)
    assert list(errors) == ["d1"] and "not signed by its identity key" in errors["d1"], errors
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "d1" / ledger.LEDGER_FILE).read_text().splitlines()[before:]]
    assert kinds == ["secagg_keys"]  # it refused before sending its shares
    assert c.store.latest_version().version == 2  # the four others still commit the round
