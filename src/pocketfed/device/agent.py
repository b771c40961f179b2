"""The device process (`pocketfed device`): one readable loop, top to bottom.

    set-up   identity (Ed25519, kept in <home>/identity.key), trusted release key, register
    loop     check in with eligibility -> a task, or "come back at T"
             verify the task's signed release (tamper, rollback, freeze) and fetch its adapter
             train with `pocketfed.device.trainer.run_task` (the simulator's own code)
             encode (`pocketfed.codec.encode`) -> egress ledger (`check_and_record`) -> upload
             or, under DP / secure aggregation (task.privacy): clip -> noise share
             (`dp.privatize_update`) -> the four secagg stages (`secure_upload`), or the clipped
             update uploaded as above (central DP)
    until    the server says training is finished (or --max-rounds updates were sent)

The device's data never leaves: only the update and scalar metrics do, and both pass the
egress ledger first. A device killed at any point starts again from its home: same identity,
same installed release; training is deterministic under the task's seed, so a resumed upload
continues the same bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load as st_load

import numpy as np

from pocketfed.files import write_atomic
from pocketfed import codec
from pocketfed.config import Codec, DataConfig, LoraConfig, TrainConfig
from pocketfed.device import ledger
from pocketfed.errors import UserError
from pocketfed.privacy import dp, secagg
from pocketfed.release import signing
from pocketfed.protocol import secagg_wire as sw
from pocketfed.device import http_client as http
from pocketfed.protocol import wire
from pocketfed.protocol.messages import TrainTask

IDENTITY = "identity.key"
RELEASE_PIN = "release.pub"
INSTALLED = "installed.json"
ADAPTER = "adapter.safetensors"
Emit = Callable[[str, dict[str, Any]], None]


def probe_eligibility(min_free_mb: int = 0) -> wire.Eligibility:
    """What this machine can tell: mains power (Linux sysfs; no battery counts as plugged in) and
    free memory (/proc/meminfo). Idle and unmetered have no portable probe here and are reported
    true; a phone runtime fills them from the OS (JobScheduler / BGTaskScheduler constraints)."""
    charging = True
    supplies = Path("/sys/class/power_supply")
    if supplies.is_dir():
        for ps in supplies.iterdir():
            kind = (ps / "type").read_text().strip() if (ps / "type").is_file() else ""
            if kind == "Mains" and (ps / "online").is_file():
                charging = (ps / "online").read_text().strip() == "1"
                break
            if kind == "Battery" and (ps / "status").is_file():
                charging = (ps / "status").read_text().strip() in ("Charging", "Full", "Not charging")
    free_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free_mb = int(line.split()[1]) // 1024
    except OSError:
        free_mb = min_free_mb
    return wire.Eligibility(charging=charging, idle=True, unmetered=True, free_memory_mb=min(free_mb, 10**7))


def trusted_release_key(home: Path, pinned: Path | None, fetch: Callable[[], str]) -> Any:
    """The release public key: --release-key if given, else the one pinned in <home> on first
    contact (trust on first use), else fetched from the server over TLS and pinned now."""
    if pinned is not None:
        if not pinned.is_file():
            raise UserError(f"release key file {str(pinned)!r} does not exist")
        try:
            return signing.public_from_hex(pinned.read_text())
        except signing.ReleaseRejected:
            raise UserError(f"{str(pinned)!r} must hold the release public key as 64 hex digits") from None
    pin = home / RELEASE_PIN
    if not pin.is_file():
        write_atomic(pin, (fetch() + "\n").encode())
    return signing.public_from_hex(pin.read_text())


def accept_release(home: Path, trusted: Any, release: wire.SignedManifest,
                   download: Callable[[str], bytes], now: float) -> tuple[signing.Manifest, dict]:
    """Verify a release against the trusted key and the installed one; return it and its adapter.

    Raises ReleaseRejected for a bad signature, an expired manifest, a rollback, or an adapter
    whose sha256 is not the manifest's. The installed release changes only after all checks."""
    installed_path, adapter_path = home / INSTALLED, home / ADAPTER
    installed = signing.Manifest.from_json(json.loads(installed_path.read_text())) if installed_path.is_file() else None
    m = signing.verify(trusted, dict(release.manifest), release.signature, now, installed)
    if installed is not None and m.version == installed.version and adapter_path.is_file():
        data = adapter_path.read_bytes()
    else:
        data = download(m.sha256)
    if signing.sha256_hex(data) != m.sha256:
        raise signing.ReleaseRejected(f"adapter of version {m.version} does not match its manifest's sha256")
    if installed is None or m.version != installed.version:
        write_atomic(adapter_path, data)  # the adapter first, then the record that names it
        write_atomic(installed_path, json.dumps(m.to_json()).encode())
    return m, st_load(data)


def upload_schema(task: wire.TaskSpec) -> ledger.Schema:
    """The tensors the encoded update may hold: the task's adapter schema under its codec."""
    dtype = {"float32": "float32", "float16": "float16", "int8": "int8"}[task.codec]
    schema: dict[str, tuple[tuple[int, ...], str]] = {}
    for t in task.adapter_schema:
        schema[t.name] = (tuple(t.shape), dtype)
        if task.codec == "int8":
            schema[t.name + codec.SCALE] = ((1,), "float32")
    return schema


class RoundLost(Exception):
    """This device dropped out of a secure-aggregation round (a stage passed it, or it failed)."""


def _wait_stage(client: http.DeviceClient, round_id: int, stage: str, call: Callable[..., Any],
                poll_s: float = 0.2) -> wire.SecAggState:
    """Poll the round until it reaches `stage`; RoundLost if it moves past it or closes."""
    order = ["advertise", "share", "masked", "unmask"]
    while True:
        view = call(client.secagg_state, round_id)
        if view.stage == stage:
            return view
        if view.stage not in order or order.index(view.stage) > order.index(stage):
            raise RoundLost(f"round {round_id} is {view.stage} ({view.reason or 'the stage passed'}) before this device's {stage}")
        time.sleep(poll_s)


def secure_upload(client: http.DeviceClient, call: Callable[..., Any], home: Path, server: str, task: wire.TaskSpec,
                  vector: np.ndarray, metrics: dict[str, float], num_tokens: int, emit: Emit) -> None:
    """Steps 0-3 of Bonawitz et al. (CCS 2017) for one round, each message through the ledger first.

    The same device functions `secagg.simulate_round` runs: `generate_keys` (step 0), `share_keys`
    (step 1), `mask_input` (step 2), `unmask` (step 3). Raises RoundLost when the round leaves
    this device behind.
    """
    rid = task.round_id
    keys = secagg.generate_keys()  # step 0: AdvertiseKeys; the request is signed by the device identity
    call(client.secagg_send, rid, "keys", ledger.check_and_record(home, server, ledger.SECAGG_KEYS, sw.keys_arrays(keys),
                                                                 sw.keys_schema()))
    emit("secagg", {"round": task.round_index, "step": "keys"})

    view = _wait_stage(client, rid, "share", call)  # step 1: ShareKeys to N(u) + u
    if view.index is None or view.params is None or view.neighbours is None:
        raise RoundLost(f"round {rid} fixed its cohort without this device")
    config = secagg.SecAggConfig(**view.params.model_dump())
    if config.round_id != rid or config.dimension != vector.size:
        raise RoundLost(f"round {rid}'s secure-aggregation parameters do not match this task")
    state = secagg.begin(config, view.index, keys)
    directory = secagg.KeyDirectory(rid, view.index, {v: (bytes.fromhex(k.enc_public), bytes.fromhex(k.mask_public))
                                                      for v, k in view.neighbours.items()})
    state, shares = secagg.share_keys(state, directory)
    holders = set(directory.neighbours) | {view.index}
    call(client.secagg_send, rid, "shares", ledger.check_and_record(home, server, ledger.SECAGG_SHARES,
                                                                   sw.shares_arrays(shares), sw.shares_schema(holders)))
    emit("secagg", {"round": task.round_index, "step": "shares"})

    view = _wait_stage(client, rid, "masked", call)  # step 2: MaskedInput through the resumable upload
    bundle = secagg.SharesForDevice(rid, view.index or 0, tuple(
        secagg.EncryptedShare(s.sender, state.device_id, bytes.fromhex(s.nonce), bytes.fromhex(s.ciphertext))
        for s in view.shares or ()))
    state, masked = secagg.mask_input(state, bundle, vector)
    payload = ledger.check_and_record(home, server, ledger.MASKED_UPDATE, sw.masked_arrays(masked), sw.masked_schema(config))
    call(client.upload, rid, payload, task.chunk_bytes)
    call(client.commit, rid, payload, num_tokens, metrics)
    emit("secagg", {"round": task.round_index, "step": "masked", "bytes": len(payload)})

    view = _wait_stage(client, rid, "unmask", call)  # step 3: shares of b_u (u in U3) and s_d (d in D)
    request = secagg.UnmaskRequest(rid, frozenset(view.survivors or ()), frozenset(view.dropped or ()))
    response = secagg.unmask(state, request)
    schema = sw.unmask_schema(response.self_mask_shares, response.key_shares)
    call(client.secagg_send, rid, "unmask", ledger.check_and_record(home, server, ledger.UNMASK_SHARES,
                                                                   sw.unmask_arrays(response), schema))
    emit("secagg", {"round": task.round_index, "step": "unmask"})


@dataclass
class Trainer:
    """The base model with LoRA and this device's training split, built on the first task."""

    model: Any
    train: Any
    key: tuple[Any, ...]


def _trainer(current: Trainer | None, task: wire.TaskSpec, data_dir: Path, device_id: str) -> Trainer:
    from pocketfed.data import textdir
    from pocketfed.data.federated import FederatedDataset
    from pocketfed.model import lora
    from pocketfed.model.zoo import load_base

    key = (task.model, task.lora.model_dump_json(), task.data.model_dump_json())
    if current is not None and current.key == key:
        return current
    base = load_base(task.model)
    lcfg = LoraConfig(**task.lora.model_dump())
    model = lora.attach(base.model, lcfg, seed=0)  # A's init is overwritten by the global adapter
    dcfg = DataConfig(dataset="textdir", path=str(data_dir), **task.data.model_dump())
    dataset = FederatedDataset("textdir", {device_id: textdir.read_device(data_dir)}, base.tokenizer, dcfg)
    return Trainer(model, dataset.device(device_id).train, key)


def run_device(
    server: str, ca: Path | None, data_dir: Path, home: Path, name: str | None = None,
    release_key: Path | None = None, threads: int = 1, max_rounds: int = 0, patience_s: float = 600.0,
    max_wait_s: float = 60.0, on_event: Emit | None = None, enrollment_token: str | None = None,
) -> int:
    """Take part in rounds until the server says training is finished. -> updates sent."""
    import torch

    from pocketfed.device.trainer import run_task

    emit = on_event or (lambda kind, info: None)
    # ---- set-up -------------------------------------------------------------------------------
    if threads:
        torch.set_num_threads(threads)
    data_dir, home = data_dir.expanduser(), home.expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data {str(data_dir)!r} is not a folder of .txt/.md/.jsonl files")
    home.mkdir(parents=True, exist_ok=True)
    name = name or data_dir.resolve().name
    key = signing.load_or_create_key(home, IDENTITY)
    client = http.DeviceClient(http.connect(server, ca), key)
    last_contact, contacted = time.time(), False

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, retrying while the server is unreachable: up to patience_s once it has
        answered (it may be restarting), 10 s before that (a wrong URL should say so soon)."""
        nonlocal last_contact, contacted
        delay = 0.5
        while True:
            try:
                out = fn(*args)
                last_contact, contacted = time.time(), True
                return out
            except http.Unreachable as e:
                limit = patience_s if contacted else min(patience_s, 10.0)
                if time.time() - last_contact > limit:
                    raise UserError(f"cannot reach the server at {server} (tried for {limit:.0f} s): {e}") from None
                emit("unreachable", {"error": str(e)})
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    if enrollment_token is not None and not wire.ENROLLMENT_TOKEN.fullmatch(enrollment_token):
        raise UserError("--enroll-token is not a token `pocketfed enroll` prints (16-64 letters, digits, - or _)")

    def register() -> str:
        try:
            return call(client.register, name, enrollment_token)
        except http.ServerRefused as e:
            if e.code in ("enrollment_required", "enrollment_refused", "name_taken", "key_registered"):
                raise UserError(f"the server refused to register {name!r}: {e.detail}") from None
            raise

    device_id = register()
    trusted = trusted_release_key(home, release_key, lambda: call(client.release_key))
    emit("registered", {"device_id": device_id})

    # ---- loop ---------------------------------------------------------------------------------
    sent, trainer = 0, None
    while max_rounds == 0 or sent < max_rounds:
        try:
            reply = call(client.checkin, probe_eligibility())
        except http.ServerRefused as e:
            if e.code == "unknown_device":  # the server lost its state: register again
                device_id = register()
                continue
            raise
        if reply.done:
            emit("done", {"reason": reply.reason})
            break
        task = reply.task
        if task is None:
            emit("wait", {"reason": reply.reason})
            time.sleep(min(max(reply.retry_at - time.time(), 0.2), max_wait_s))
            continue
        try:
            manifest, global_adapter = accept_release(home, trusted, task.release,
                                                      lambda sha: call(client.adapter, sha), time.time())
        except signing.ReleaseRejected as e:
            emit("release_refused", {"reason": str(e)})
            time.sleep(min(max(reply.retry_at - time.time(), 0.2), max_wait_s))
            continue
        want = {t.name: tuple(t.shape) for t in task.adapter_schema}
        if {k: tuple(v.shape) for k, v in global_adapter.items()} != want:
            emit("release_refused", {"reason": "the adapter does not match the task's schema"})
            time.sleep(1.0)
            continue
        emit("task", {"round": task.round_index, "round_id": task.round_id, "version": manifest.version})
        trainer = _trainer(trainer, task, data_dir, device_id)
        result = run_task(trainer.model, trainer.train,
                          TrainTask(task.round_index, device_id, global_adapter,
                                    TrainConfig(**task.train.model_dump()), task.seed))
        if task.privacy is not None and task.privacy.secagg:  # clip -> noise share -> the four stages
            vector, unclipped = dp.privatize_update(result.update, task.privacy.clip_norm, task.privacy.noise_std)
            metrics = json.loads(ledger.check_and_record(home, server, ledger.METRICS, {
                "num_tokens": result.num_tokens, "unclipped": float(unclipped),
                **{k: v for k, v in result.metrics.items() if k in ledger.ALLOWED_METRICS}}, {}))
            try:
                secure_upload(client, call, home, server, task, vector, metrics, result.num_tokens, emit)
                sent += 1
                emit("uploaded", {"round": task.round_index, "secagg": True})
            except (RoundLost, secagg.SecAggError) as e:
                emit("round_lost", {"round": task.round_index, "reason": str(e)})
            except http.ServerRefused as e:
                emit("upload_refused", {"round": task.round_index, "code": e.code, "detail": e.detail})
            continue
        update, extra = result.update, {}
        if task.privacy is not None:  # central DP: clip on the device; the server adds the noise
            vector, unclipped = dp.privatize_update(result.update, task.privacy.clip_norm, task.privacy.noise_std)
            update, extra = dp.unflatten_update(vector, result.update), {"unclipped": float(unclipped)}
        # encode -> ledger (recorded before anything is sent) -> upload
        encoded = st_load(codec.encode(update, Codec(task.codec)))
        payload = ledger.check_and_record(home, server, ledger.UPDATE, encoded, upload_schema(task))
        metrics = json.loads(ledger.check_and_record(home, server, ledger.METRICS, {
            "num_tokens": result.num_tokens, **extra,
            **{k: v for k, v in result.metrics.items() if k in ledger.ALLOWED_METRICS}}, {}))
        if len(payload) > task.max_upload_bytes:
            raise RuntimeError(f"update of {len(payload)} bytes is over the server's limit {task.max_upload_bytes}")
        try:
            for attempt in range(2):
                try:
                    call(client.upload, task.round_id, payload, task.chunk_bytes)
                    out = call(client.commit, task.round_id, payload, result.num_tokens, metrics)
                    break
                except http.ServerRefused as e:
                    if e.code != "hash_mismatch" or attempt:
                        raise
            sent += 1
            emit("uploaded", {"round": task.round_index, "bytes": len(payload), "round_closed": out.round_closed})
        except http.ServerRefused as e:
            if e.code == "duplicate_upload":  # committed before a crash or a lost reply
                sent += 1
                emit("uploaded", {"round": task.round_index, "bytes": len(payload), "duplicate": True})
            else:
                emit("upload_refused", {"round": task.round_index, "code": e.code, "detail": e.detail})
    return sent
