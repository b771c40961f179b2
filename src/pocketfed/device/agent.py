"""The device process (`pocketfed device`): one readable loop, top to bottom.

    set-up   identity (Ed25519, kept in <home>/identity.key), name (--name, else a random one kept in
             <home>/device.name), trusted release key, register
    loop     check in with eligibility -> a task, or "come back at T"
             the task's privacy plan against this device's floors (`pocketfed.device.floors`): below
             them, the refusal goes into the ledger, nothing is sent, and the device checks in later
             verify the task's signed release (tamper, rollback, freeze) and fetch its adapter
             on the first task: load the base once under the plan for --profile (`open_session`)
             the device task (`pocketfed.device.task.run_task`, the simulator's own code): train,
             then the privacy pipeline `device_privatize` under the task's PrivacyPlan
             (clip -> noise share -> encode, or the clipped vector for secure aggregation)
             -> egress ledger (`check_and_record`) -> upload, or the five secagg stages (`secure_upload`)
    until    the server says training is finished (or --max-rounds updates were sent)

Memory: with --profile the process stays within the profile's budget (its whole-process peak
RSS, VmHWM): the planner (`pocketfed.device.planner`) plans on top of what this process measures
once its code and data are in, and picks the backend: for Llama models the lean one, whose
process imports neither transformers nor PEFT (the tokenizer is `tokenizers` alone). Without
--profile there is no budget: the simulator's transformers + PEFT model, in fp32.

The device's data never leaves: only the registration, check-ins, the update and scalar metrics
do, each through the egress ledger first (the client's `egress` door). Under secure aggregation
no metric leaves in the clear: the commit of the masked input carries 0 tokens and no metrics
(a per-device loss or token count beside a masked input would undo the masking's point).
A device killed at any point starts again from its home: same identity, same name, same
installed release; training is deterministic under the task's seed, so a resumed upload
continues the same bytes.
"""

from __future__ import annotations

from pocketfed.memory import drop_cached_library_pages, peak_rss_mb, release_shared_libraries, rss_mb

drop_cached_library_pages("torch")  # before torch is imported: the process's RSS is the code it runs

import gc  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from safetensors.torch import load as st_load  # noqa: E402

from pocketfed import codec  # noqa: E402
from pocketfed.config import Codec, DataConfig, LoraConfig, TrainConfig  # noqa: E402
from pocketfed.data.federated import Blocks, to_blocks  # noqa: E402
from pocketfed.device import http_client as http  # noqa: E402
from pocketfed.device import ledger, task as device_task  # noqa: E402
from pocketfed.device.floors import PrivacyFloors  # noqa: E402
from pocketfed.device.lowmem import fix_malloc_thresholds, trim_heap  # noqa: E402
from pocketfed.device.planner import Backend, Plan, backend_for, make_plan  # noqa: E402
from pocketfed.device.profiles import DeviceProfile  # noqa: E402
from pocketfed.device.shape import ModelShape  # noqa: E402
from pocketfed.device.secure_upload import RoundLost, secure_upload  # noqa: E402
from pocketfed.errors import UserError  # noqa: E402
from pocketfed.files import write_atomic  # noqa: E402
from pocketfed.model import rank as rank_ops  # noqa: E402
from pocketfed.privacy import secagg  # noqa: E402
from pocketfed.privacy.pipeline import PrivacyPlan  # noqa: E402
from pocketfed.protocol import wire  # noqa: E402
from pocketfed.protocol.messages import TrainTask  # noqa: E402
from pocketfed.release import signing  # noqa: E402

IDENTITY = "identity.key"
RELEASE_PIN = "release.pub"
INSTALLED = "installed.json"
ADAPTER = "adapter.safetensors"
NAME = "device.name"
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


def device_name(home: Path, given: str | None) -> str:
    """--name if given, else this home's name: "device-" + 8 hex digits from `secrets`, made once and
    kept in <home>/device.name so a restart registers the same name. Never derived from the data
    folder, whose name may say whose data it is."""
    if given is not None:
        return given
    path = home / NAME
    if not path.is_file():
        write_atomic(path, f"device-{secrets.token_hex(4)}\n")
    name = path.read_text().strip()
    if not wire.DEVICE_NAME.fullmatch(name):
        raise UserError(f"{str(path)!r} holds {name!r}, not a device name (letters, digits, . _ -; at most 64); "
                        "delete it for a new random one or give --name")
    return name


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


def privacy_plan(task: wire.TaskSpec) -> PrivacyPlan:
    """The round's PrivacyPlan from the task (the server's own, field for field)."""
    return task.privacy.to_plan(task.codec) if task.privacy is not None else PrivacyPlan(codec=Codec(task.codec))


@dataclass
class Session:
    """What the device keeps across rounds: the model with LoRA under its plan (None: no profile,
    the simulator's model), and this device's training rows."""

    model: device_task.DeviceModel
    plan: Plan | None
    train: Blocks
    key: tuple[Any, ...]


def session_key(task: wire.TaskSpec) -> tuple[Any, ...]:
    """What a session depends on: a task with another key needs another session."""
    return task.model, task.lora.model_dump_json(), task.data.model_dump_json(), task.train.batch_size


def open_session(task: wire.TaskSpec, data_dir: Path, device_id: str, profile: DeviceProfile | None) -> Session:
    """Tokenize this device's data (then drop the tokenizer), measure this process, plan, load the base."""
    from pocketfed.data import textdir
    from pocketfed.data.federated import FederatedDataset
    from pocketfed.model.zoo import resolve

    key = session_key(task)
    lcfg = LoraConfig(**task.lora.model_dump())
    dcfg = DataConfig(dataset="textdir", path=str(data_dir), **task.data.model_dump())
    folder, _ = resolve(task.model)
    backend = backend_for(folder) if profile is not None else Backend.peft
    base = None
    if profile is None:  # no budget: the simulator's model and tokenizer, as `pocketfed simulate` loads them
        from pocketfed.model.zoo import load_base

        base = load_base(task.model)
        tokenizer: Any = base.tokenizer
    elif backend is Backend.lean:
        from pocketfed.device.leanmodel import Tokenizer

        tokenizer = Tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = FederatedDataset("textdir", {device_id: textdir.read_device(data_dir)}, tokenizer, dcfg)
    rows = dataset.device(device_id).train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if base is not None:
        from pocketfed.model import lora

        model = device_task.wrap_peft(lora.attach(base.model, lcfg, seed=0))  # A is overwritten by the global adapter
        return Session(model, None, rows, key)
    del dataset, tokenizer
    gc.collect()
    trim_heap()  # the tokenizer's memory (~35 MB for SmolLM2's) goes back before this process is measured
    if backend is Backend.lean:
        # the libraries' code pages that importing and tokenizing faulted in, with the neighbours
        # fault-around mapped from a page cache other processes keep hot (a test runner that ran torch:
        # +56 MB measured), are released; one warm-up step faults back what a round runs, page by page
        release_shared_libraries()
        device_task.warm_up(tuple(lcfg.target_modules))
        gc.collect()
        trim_heap()
    train = TrainConfig(**task.train.model_dump())
    plan = make_plan(ModelShape.from_folder(folder), profile, lcfg, train, dcfg.seq_len, task.model, rss_mb(), backend,
                     warmed=backend is Backend.lean)
    if plan.seq_len != dcfg.seq_len:  # the planner shortened the rows: the same tokens, re-cut
        rows = to_blocks(rows.input_ids[rows.mask].tolist(), plan.seq_len, pad)
    alpha = rank_ops.alpha_for_rank(lcfg.alpha, plan.rank, lcfg.rank)  # keeps the global scaling alpha / R
    return Session(device_task.load_model(folder, plan, alpha, seed=0, dropout=lcfg.dropout), plan, rows, key)


def run_device(
    server: str, ca: Path | None, data_dir: Path, home: Path, name: str | None = None,
    release_key: Path | None = None, threads: int = 1, max_rounds: int = 0, patience_s: float = 600.0,
    max_wait_s: float = 60.0, on_event: Emit | None = None, enrollment_token: str | None = None,
    profile: str | None = None, profiles_file: str = "", floors: PrivacyFloors = PrivacyFloors(),
) -> int:
    """Take part in rounds until the server says training is finished. -> updates sent.
    `profile` (watch, phone, car, or one of `profiles_file`): train within its budget.
    `floors`: the privacy a task must promise, else it is refused before training."""
    import torch

    from pocketfed.device.profiles import get_profile

    emit = on_event or (lambda kind, info: None)
    # ---- set-up -------------------------------------------------------------------------------
    fix_malloc_thresholds()
    device_profile = get_profile(profile, profiles_file) if profile is not None else None
    if threads:
        torch.set_num_threads(threads)
    data_dir, home = data_dir.expanduser(), home.expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data {str(data_dir)!r} is not a folder of .txt/.md/.jsonl files")
    home.mkdir(parents=True, exist_ok=True)
    name = device_name(home, name)
    key = signing.load_or_create_key(home, IDENTITY)
    client = http.DeviceClient(http.connect(server, ca), key,
                               egress=lambda kind, payload: ledger.check_and_record(home, server, kind, payload, {}))
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
    sent, session = 0, None
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
        refusal = floors.refusal(task.privacy)  # before the adapter download, before training
        if refusal is not None:
            ledger.record_refusal(home, server, "task", f"round {task.round_id}: {refusal}")
            emit("task_refused", {"round": task.round_index, "round_id": task.round_id, "reason": refusal})
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
        if session is None or session.key != session_key(task):
            session = None  # the old model goes before the new one loads
            gc.collect()
            session = open_session(task, data_dir, device_id, device_profile)
            emit("plan", plan_summary(session))
        plan = session.plan
        global_rank = rank_ops.rank_of(global_adapter)
        start = global_adapter
        if plan is not None and plan.rank < global_rank:  # HetLoRA: train the first r slots, upload all R
            start = rank_ops.truncate(global_adapter, plan.rank)
        privacy = privacy_plan(task)
        train = TrainConfig(**task.train.model_dump())
        result = device_task.run_task(session.model, session.train, TrainTask(
            task.round_index, device_id, start, train, task.seed, privacy, upload_rank=global_rank))
        upload = result.upload
        assert upload is not None
        stats = {k: v for k, v in result.metrics.items() if k in ledger.ALLOWED_METRICS}
        # the centred (and, under distributed DP, noised) adaptive-clipping bit; under secure aggregation it
        # travels only inside the masked vector, never in the clear
        extra = {"unclipped": upload.clip_bit} if upload.clip_bit is not None else {}
        if not privacy.private and start is not global_adapter:  # the server renormalizes the padded slots
            extra["lora_rank"] = float(rank_ops.rank_of(start))
        if upload.vector is not None:  # secure aggregation: the clipped (and noised) vector, masked next
            # nothing per device in the clear: the commit carries 0 tokens and no metrics
            try:
                secure_upload(client, call, home, server, task, upload.vector, {}, 0, emit)
                sent += 1
                emit("uploaded", {"round": task.round_index, "secagg": True, "peak_rss_mb": round(peak_rss_mb(), 1)})
            except (RoundLost, secagg.SecAggError) as e:
                emit("round_lost", {"round": task.round_index, "reason": str(e)})
            except http.ServerRefused as e:
                emit("upload_refused", {"round": task.round_index, "code": e.code, "detail": e.detail})
            continue
        # the encoded update -> ledger (recorded before anything is sent) -> upload
        assert upload.payload is not None
        if len(upload.payload) > task.max_upload_bytes:
            raise UserError(
                f"this device's update is {len(upload.payload)} bytes, over the server's limit of {task.max_upload_bytes} bytes "
                f"for {task.model} at LoRA rank {global_rank} with codec {task.codec}: the server's operator must raise "
                f"deploy.max_upload_mb to at least {len(upload.payload) / 2**20:.1f}, or choose a smaller lora.rank, fewer "
                f"lora.target_modules or privacy.codec int8")
        payload = ledger.check_and_record(home, server, ledger.UPDATE, st_load(upload.payload), upload_schema(task))
        metrics = json.loads(ledger.check_and_record(home, server, ledger.METRICS, {
            "num_tokens": result.num_tokens, **extra, **stats}, {}))
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
            emit("uploaded", {"round": task.round_index, "bytes": len(payload), "round_closed": out.round_closed,
                              "peak_rss_mb": round(peak_rss_mb(), 1)})
        except http.ServerRefused as e:
            if e.code == "duplicate_upload":  # committed before a crash or a lost reply
                sent += 1
                emit("uploaded", {"round": task.round_index, "bytes": len(payload), "duplicate": True})
            else:
                emit("upload_refused", {"round": task.round_index, "code": e.code, "detail": e.detail})
    emit("finished", {"sent": sent, "peak_rss_mb": round(peak_rss_mb(), 1)})
    return sent


def plan_summary(session: Session) -> dict[str, Any]:
    """The session's plan, as the "plan" event shows it."""
    p = session.plan
    if p is None:
        return {"backend": session.model.backend.value, "profile": "none (fp32, no budget)"}
    return {"backend": p.backend.value, "profile": p.profile, "precision": p.precision.value, "rank": p.rank,
            "micro_batch": p.micro_batch, "grad_accum": p.grad_accum, "seq_len": p.seq_len,
            "checkpointing": p.checkpointing, "loss_chunk": p.loss_chunk, "predicted_mb": p.predicted_peak_mb,
            "budget_mb": p.budget_mb, "runtime_mb": p.memory_mb["runtime"]}
