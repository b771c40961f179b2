"""Federated evaluation over loopback TLS with the real device loop, on the `tiny` model.

One coordinator (uvicorn, in a thread) and three device loops (`run_device`, in threads). One
training round commits version 1; deploy.eval_every = 1 then opens an evaluation of version 1:
the sampled devices score it on their own test splits (at most deploy.eval_max_tokens = 40
positions, which cuts a row in two) and report. The test recomputes each evaluated device's loss
and top-k directly (the tiny model with version 1's adapter, row by row, its own code) and checks
the coordinator's figures: equal in the clear; within secure aggregation's fixed-point bound
(`fedeval.loss_error_bound`) under privacy.secagg, where the server only ever held the sum.

In the clear the evaluation draws 2 of the 3 devices (q = 2/3, a fixed draw key): the third
gets no evaluation task and sends no report. Waits fail only when nothing moves for `STALL_S`.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CAP_S, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine on quiet hills "
         "and rivers run to the sea under old bridges where children sing of summer rain").split()
NAMES = ["dev0", "dev1", "dev2"]
CAP = 40  # deploy.eval_max_tokens


class Done(Exception):
    """Raised from a device's event hook when the server says training is finished: the device
    loop ends there (what a device does after that, on its own, is not this test's)."""


def direct(model, blocks, cap: int) -> tuple[float, int, int, int]:
    """(loss sum, tokens, top-1 hits, top-3 hits) of the first `cap` predicted positions, row by row."""
    nll, n, h1, h3 = 0.0, 0, 0, 0
    with torch.inference_mode():
        for i in range(len(blocks)):
            ids, mask = blocks.input_ids[i : i + 1], blocks.mask[i : i + 1]
            logits = model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask.long()).logits[0, :-1].float()
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            for t in range(ids.shape[1] - 1):
                if n == cap or not (mask[0, t] and mask[0, t + 1]):
                    continue
                target = int(ids[0, t + 1])
                top = logits[t].topk(3).indices.tolist()
                nll, n, h1, h3 = nll + float(losses[t]), n + 1, h1 + (top[0] == target), h3 + (target in top)
    return nll, n, h1, h3


def run_federation(tmp_path, monkeypatch, secure: bool):
    """3 devices, 1 training round, an evaluation of version 1. -> (coordinator, cfg, events, status)."""
    import uvicorn
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pocketfed import deploy_cli
    from pocketfed.config import load_config
    from pocketfed.device import http_client as http
    from pocketfed.device import task as device_task
    from pocketfed.device.agent import run_device
    from pocketfed.model import zoo
    from pocketfed.model.zoo import tiny_dir
    from pocketfed.server import coordinator as co
    from pocketfed.server import operator, sampling
    from pocketfed.server.http.app import create_app
    from pocketfed.server.http.certs import make_dev_certs, server_files
    from tests.integration.test_http_rounds import free_port

    tiny_dir()
    for i, name in enumerate(NAMES):
        rng = random.Random(i)
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "notes.txt").write_text(
            "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(8)))
    make_dev_certs(tmp_path / "certs")
    if not secure:  # a draw key under which the evaluation (q = 2/3) takes exactly 2 of the 3 devices;
        # training rounds draw at q = 1, where the key plays no part
        key = next(k for i in range(10_000)
                   if len(sampling.poisson_sample(NAMES, 2 / 3, k := sampling.simulation_key(5, i))) == 2)
        monkeypatch.setattr(sampling, "fresh_key", lambda: key)
    cfg = load_config(None, {
        "model": {"name": "tiny"}, "data": {"seq_len": 32, "min_train_tokens": 32, "test_fraction": 0.2},
        "train": {"steps": 2, "batch_size": 4, "lr": 5e-3}, "sim": {"rounds": 1, "seed": 0},
        "privacy": {"secagg": secure, "clip_norm": 0.05},
        "deploy": {"goal": 3, "overselect": 1.0, "quorum": 2, "deadline_s": 3600.0, "retry_s": 0.3,
                   "secagg_stage_s": 60.0, "eval_every": 1, "eval_devices": 3 if secure else 2,
                   "eval_max_tokens": CAP, "eval_deadline_s": 3600.0},
    })

    def init_params():
        from pocketfed.model import lora
        from pocketfed.model.zoo import load_base

        return lora.get_state(lora.attach(load_base("tiny").model, cfg.lora, seed=cfg.sim.seed))

    c = co.open_coordinator(tmp_path / "state", cfg, "tiny", init_params)
    tokens = co.enroll(c.store, 3)
    port = free_port()
    cert, key_file = server_files(tmp_path / "certs")
    server = uvicorn.Server(uvicorn.Config(create_app(c), host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(cert), ssl_keyfile=str(key_file)))
    threading.Thread(target=server.run, daemon=True).start()

    one_at_a_time = threading.Lock()  # real devices are processes; threads here must not load or train at once
    real_run_task, real_load_base = device_task.run_task, zoo.load_base

    def serial_run_task(*args, **kwargs):
        with one_at_a_time:
            return real_run_task(*args, **kwargs)

    def serial_load_base(*args, **kwargs):
        with one_at_a_time:
            return real_load_base(*args, **kwargs)

    monkeypatch.setattr(device_task, "run_task", serial_run_task)
    monkeypatch.setattr(zoo, "load_base", serial_load_base)
    events: list[tuple] = []
    errors: list[BaseException] = []
    url = f"https://127.0.0.1:{port}"

    def start(i: int) -> threading.Thread:
        def hook(kind, info):
            if kind not in ("wait", "unreachable"):
                events.append((i, kind, info))
            if kind == "done":  # the server said training is over: what follows is local (personalizing)
                raise Done

        def run():
            try:
                run_device(url, tmp_path / "certs" / "ca.pem", tmp_path / "data" / NAMES[i], tmp_path / "homes" / NAMES[i],
                           name=NAMES[i], threads=1, patience_s=300, max_wait_s=0.5, enrollment_token=tokens[i],
                           on_event=hook)
            except Done:
                pass
            except BaseException as e:  # noqa: BLE001 (reported by the test)
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def progress():
        return len(events), [(r.round_id, r.status) for r in c.store.rounds()], [e["status"] for e in c.store.evaluations()]

    try:
        wait_for("the server", lambda: server.started, progress)
        threads = [start(i) for i in range(3)]
        wait_for("the evaluation to close", lambda: any(e["status"] != "open" for e in c.store.evaluations()), progress)
        wait_for("the device loops to end", lambda: not any(t.is_alive() for t in threads), progress)  # each at "done"
        status = http.DeviceClient(http.connect(url, tmp_path / "certs" / "ca.pem"), Ed25519PrivateKey.generate()).status(
            operator.load_or_create(c.store.folder))
        with deploy_cli.console.capture() as shown:  # what `pocketfed status` prints
            deploy_cli.status(url, tmp_path / "certs" / "ca.pem", c.store.folder / "operator.token")
    finally:
        server.should_exit = True
    assert not errors, errors
    [row] = c.store.evaluations()
    assert "federated evaluation" in shown.get() and f"{row['loss']:.4f}" in shown.get(), shown.get()
    return c, cfg, events, status


def expected_sums(tmp_path, c, cfg, devices: list[str]) -> dict[str, tuple[float, int, int, int]]:
    """Each device's sums recomputed directly: version 1's adapter on the tiny model, its test split."""
    from safetensors.torch import load as st_load

    from pocketfed.config import DataConfig
    from pocketfed.data import textdir
    from pocketfed.data.federated import FederatedDataset
    from pocketfed.model import lora
    from pocketfed.model.zoo import load_base

    base = load_base("tiny")
    model = lora.attach(base.model, cfg.lora, seed=0)
    lora.set_state(model, st_load(c.store.get_blob(c.store.version(1).adapter_sha)))
    model.eval()
    out = {}
    for name in devices:
        dcfg = DataConfig(dataset="textdir", path=str(tmp_path / "data" / name), seq_len=cfg.data.seq_len,
                          test_fraction=cfg.data.test_fraction, min_train_tokens=cfg.data.min_train_tokens)
        ds = FederatedDataset("textdir", {name: textdir.read_device(tmp_path / "data" / name)}, base.tokenizer, dcfg)
        out[name] = direct(model, ds.device(name).test, CAP)
    return out


def ledger_lines(tmp_path, name: str) -> list[dict]:
    from pocketfed.device import ledger

    path = tmp_path / "homes" / name / ledger.LEDGER_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_federated_evaluation_in_the_clear_equals_the_devices_own_losses(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    c, cfg, events, status = run_federation(tmp_path, monkeypatch, secure=False)
    elapsed = time.perf_counter() - t0
    [row] = c.store.evaluations()
    assert row["status"] == "done" and row["version"] == 1 and row["devices"] == 2 and row["sampled"] == 2, row
    evaluated = sorted({NAMES[i] for i, kind, *_ in events if kind == "evaluated"})
    assert evaluated == c.store.eval_cohort(row["eval_id"]) and len(evaluated) == 2
    left_out = next(n for n in NAMES if n not in evaluated)
    # the device the draw left out was never given the evaluation and sent no report
    assert not any(kind == "evaluated" for i, kind, *_ in events if NAMES[i] == left_out)
    assert not any(line["kind"] == "eval_report" for line in ledger_lines(tmp_path, left_out))

    sums = expected_sums(tmp_path, c, cfg, evaluated)
    nll, n, h1, h3 = (sum(s[k] for s in sums.values()) for k in range(4))
    assert all(s[1] == CAP for s in sums.values())  # the cap binds: each test split has more than 40 positions
    # the token-weighted mean of the devices' own losses: sum_i n_i (L_i / n_i) / sum_i n_i
    weighted = sum(s[1] * (s[0] / s[1]) for s in sums.values()) / n
    assert row["loss"] == pytest.approx(weighted, rel=1e-9) and row["loss"] == pytest.approx(nll / n, rel=1e-9)
    assert (row["top1"], row["top3"], row["tokens"]) == (h1 / n, h3 / n, n)
    # each evaluated device's ledger: one eval_report line, exactly the report's fields, these numbers
    for name in evaluated:
        [line] = [x for x in ledger_lines(tmp_path, name) if x["kind"] == "eval_report"]
        report = line["eval_report"]
        assert set(report) == {"loss_sum", "tokens", "top1_hits", "top3_hits", "wire_version"}
        assert report["loss_sum"] == pytest.approx(sums[name][0], rel=1e-9)
        assert (report["tokens"], report["top1_hits"], report["top3_hits"]) == sums[name][1:]
    assert [e["loss"] for e in status.evaluations] == [row["loss"]]
    print(f"\nfederated evaluation in the clear over HTTPS, 3 devices on tiny: {elapsed:.1f} s in all; "
          f"loss {row['loss']:.4f}, top-3 {row['top3']:.3f} over {row['tokens']:.0f} tokens")


def test_federated_evaluation_under_secure_aggregation_is_within_the_fixed_point_bound(tmp_path, monkeypatch):
    from pocketfed.protocol import fedeval

    t0 = time.perf_counter()
    c, cfg, events, status = run_federation(tmp_path, monkeypatch, secure=True)
    elapsed = time.perf_counter() - t0
    [row] = c.store.evaluations()
    assert row["status"] == "done" and row["secure"] and row["devices"] == 3, row
    assert c.store.eval_reports(row["eval_id"]) == {}  # nothing per device was held in the clear
    sums = expected_sums(tmp_path, c, cfg, NAMES)
    nll, n, h1, h3 = (sum(s[k] for s in sums.values()) for k in range(4))
    got = fedeval.Sums(row["loss"] * row["tokens"], row["tokens"], row["top1"] * row["tokens"], row["top3"] * row["tokens"])
    e = fedeval.coordinate_error(3, cfg.privacy.frac_bits, CAP)
    assert abs(got.tokens - n) <= e and abs(got.top1_hits - h1) <= e and abs(got.top3_hits - h3) <= e
    bound = fedeval.loss_error_bound(got, 3, cfg.privacy.frac_bits, CAP)
    assert abs(row["loss"] - nll / n) <= bound and bound < 1e-3, (row["loss"], nll / n, bound)
    for name in NAMES:
        kinds = [x["kind"] for x in ledger_lines(tmp_path, name)]
        assert "masked_eval_report" in kinds and "eval_report" not in kinds and "metrics" not in kinds
        [line] = [x for x in ledger_lines(tmp_path, name) if x["kind"] == "masked_eval_report"]
        assert [a[1] for a in line["arrays"]] == [[4]]  # four masked words, nothing else
    assert status.evaluations[0]["secure"] is True
    print(f"\nfederated evaluation under secagg over HTTPS, 3 devices on tiny: {elapsed:.1f} s in all; "
          f"loss {row['loss']:.6f} vs {nll / n:.6f} direct (bound {bound:.2e})")
