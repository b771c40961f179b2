"""The device process (`pocketfed device`): one readable loop, top to bottom.

    set-up   identity (Ed25519, kept in <home>/identity.key), name (--name, else a random one kept in
             <home>/device.name), trusted release key (a pin the server no longer signs with: one
             sentence naming `pocketfed release trust`, exit; `pocketfed.device.releases`), register
    loop     check in with eligibility -> a task, or "come back at T"
             the task's privacy plan against this device's floors (`pocketfed.device.floors`): below
             them, the refusal goes into the ledger, nothing is sent, and the device checks in later
             verify the task's signed release (tamper, rollback, freeze), fetch its adapter and
             install it in <home>/releases/<version> (`pocketfed.runtime.home`)
             on the first task: load the base once under the plan for --profile (`open_session`)
             the device task (`pocketfed.device.task.run_task`, the simulator's own code): train,
             then the privacy pipeline `device_privatize` under the task's PrivacyPlan
             (clip -> noise share -> encode, or the clipped vector for secure aggregation)
             -> egress ledger (`check_and_record`) -> upload, or the five secagg stages (`secure_upload`)
             an evaluation task (`task.evaluate`) instead: score the release on the test split and
             report four sums (`pocketfed.device.evaluate`), no training
             a release holding NaN/Inf is refused (never installed), and a round whose loss or update
             is not finite is skipped with its reason in the ledger (`pocketfed.device.guard`): one bad
             round never ends the process
    until    the server says training is finished (or --max-rounds updates were sent)
    then     the final release is installed too; with on_device_model (`pocketfed device`'s default)
             the personal adapter is trained for it and the int4 runtime model built in <home>/model
             (`pocketfed.device.ondevice`; also during a wait of IDLE_FOR_MODEL_S or more)

Memory: with --profile the process stays within the profile's budget (its whole-process peak
RSS, VmHWM): the planner (`pocketfed.device.planner`) plans on top of what this process measures
once its code and data are in, and picks the backend: for Llama models the lean one, whose
process imports neither transformers nor PEFT (the tokenizer is `tokenizers` alone). Without
--profile there is no budget: the simulator's transformers + PEFT model, in fp32.

The device's data never leaves: only the registration, check-ins, the update, scalar metrics and
evaluation reports (four sums) do, each through the egress ledger first (the client's `egress` door). Under secure aggregation
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
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from safetensors.torch import load as st_load  # noqa: E402

from pocketfed import codec  # noqa: E402
from pocketfed.config import Codec, DataConfig, LoraConfig, TrainConfig  # noqa: E402
from pocketfed.data.federated import Blocks, to_blocks  # noqa: E402
from pocketfed.device import http_client as http  # noqa: E402
from pocketfed.device import evaluate, ledger, ondevice, task as device_task  # noqa: E402
from pocketfed.device import guard  # noqa: E402
from pocketfed.device.floors import PrivacyFloors  # noqa: E402
from pocketfed.device.lowmem import fix_malloc_thresholds  # noqa: E402
from pocketfed.memory import release_free_memory  # noqa: E402
from pocketfed.device.planner import Backend, Plan, backend_for, make_plan  # noqa: E402
from pocketfed.device.profiles import DeviceProfile  # noqa: E402
from pocketfed.device.releases import KeyChanged, trusted_release_key  # noqa: E402,F401  (KeyChanged: re-exported)
from pocketfed.device import releases  # noqa: E402
from pocketfed.device.shape import ModelShape  # noqa: E402
from pocketfed.device.secure_upload import RoundLost, secure_upload  # noqa: E402
from pocketfed.errors import UserError  # noqa: E402
from pocketfed.files import write_atomic  # noqa: E402
from pocketfed.model import rank as rank_ops  # noqa: E402
from pocketfed.privacy import secagg  # noqa: E402
from pocketfed.privacy.pipeline import PrivacyPlan  # noqa: E402
from pocketfed.protocol import wire  # noqa: E402
from pocketfed.protocol.messages import TrainTask  # noqa: E402
from pocketfed import signing  # noqa: E402
from pocketfed.runtime import home as device_home  # noqa: E402

IDENTITY = "identity.key"
NAME = "device.name"
IDLE_FOR_MODEL_S = 30.0  # a wait at least this long is spent personalizing and converting
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


def accept_release(home: Path, trusted: Any, release: wire.SignedManifest, download: Callable[[str], bytes],
                   now: float, task: dict[str, Any] | None = None) -> tuple[signing.Manifest, dict, bool]:
    """`releases.accept_release` with the poisoned-release guard, the adapter loaded as tensors."""
    m, data, fresh = releases.accept_release(home, trusted, release, download, now, task,
                                             lambda raw, version: guard.release_problem(st_load(raw), version))
    return m, st_load(data), fresh


def home_session(home: Path, data_dir: Path, device_id: str, profile: DeviceProfile | None) -> Session | None:
    """A training session for the installed release's task settings (None without them): what
    personalization trains with when this process has not trained (a restart, `pocketfed personalize`)."""
    from types import SimpleNamespace

    task = releases.installed_task(home)
    if not {"model", "lora", "data", "train"} <= set(task):
        return None
    spec = SimpleNamespace(model=task["model"], lora=wire.LoraSpec(**task["lora"]), data=wire.DataSpec(**task["data"]),
                           train=wire.TrainSpec(**task["train"]))
    return open_session(spec, data_dir, device_id, profile)  # type: ignore[arg-type]


def task_settings(task: wire.TaskSpec) -> dict[str, Any]:
    """What building the runtime model and personalizing need from a task (kept as task.json)."""
    return {"model": task.model, "lora": task.lora.model_dump(), "data": task.data.model_dump(),
            "train": task.train.model_dump()}


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
    test: Blocks | None = None  # this device's test split, which federated evaluation scores


def session_key(task: wire.TaskSpec) -> tuple[Any, ...]:
    """What a session depends on: a task with another key needs another session."""
    return task.model, task.lora.model_dump_json(), task.data.model_dump_json(), task.train.batch_size


def device_dataset(pieces: list[str], data_dir: Path, device_id: str, tokenizer: Any, dcfg: DataConfig) -> Any:
    """This device's data as the task cuts it; too few training tokens for the coordinator's
    data.min_train_tokens is a setting only the operator can change, so the sentence says so."""
    from pocketfed.data.federated import FederatedDataset

    try:
        return FederatedDataset("textdir", {device_id: pieces}, tokenizer, dcfg)
    except UserError:  # the only one it raises: no device above the minimum
        n = FederatedDataset("textdir", {device_id: pieces}, tokenizer,
                             replace(dcfg, min_train_tokens=0)).train_token_counts([device_id])[0]
        raise UserError(f"the coordinator's data.min_train_tokens ({dcfg.min_train_tokens}) is above this device's "
                        f"{n} training tokens (--data {str(data_dir)!r}, less the last {dcfg.test_fraction:.0%} kept "
                        "for test): add text to --data, or the operator can lower it "
                        f"(`pocketfed server --set data.min_train_tokens={max(n, 1)}`)") from None


def open_session(task: wire.TaskSpec, data_dir: Path, device_id: str, profile: DeviceProfile | None) -> Session:
    """Tokenize this device's data (then drop the tokenizer), measure this process, plan, load the base."""
    from pocketfed.data import textdir
    from pocketfed.model.zoo import resolve

    key = session_key(task)
    lcfg = LoraConfig(**task.lora.model_dump())
    dcfg = DataConfig(dataset="textdir", path=str(data_dir), **task.data.model_dump())
    folder, _ = resolve(task.model)
    backend = backend_for(folder)
    sim = None
    if profile is None:  # no budget: the simulator's model and tokenizer, as `pocketfed simulate` loads them
        from pocketfed.transport.shared import load_simulator

        sim = load_simulator(task.model, "", lcfg, seed=0)  # A is overwritten by the global adapter
        tokenizer: Any = sim.tokenizer
    elif backend is Backend.lean:
        from pocketfed.device.leanmodel import Tokenizer

        tokenizer = Tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = device_dataset(textdir.read_device(data_dir), data_dir, device_id, tokenizer, dcfg)
    split = dataset.device(device_id)
    rows, test = split.train, split.test
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if sim is not None:
        return Session(sim.model, None, rows, key, test)
    del dataset, tokenizer
    gc.collect()
    release_free_memory()  # the tokenizer's memory (~35 MB for SmolLM2's) goes back before this process is measured
    if backend is Backend.lean:
        # the libraries' code pages that importing and tokenizing faulted in, with the neighbours
        # fault-around mapped from a page cache other processes keep hot (a test runner that ran torch:
        # +56 MB measured), are released; one warm-up step faults back what a round runs, page by page
        release_shared_libraries()
        device_task.warm_up(tuple(lcfg.target_modules))
        gc.collect()
        release_free_memory()
    train = TrainConfig(**task.train.model_dump())
    plan = make_plan(ModelShape.from_folder(folder), profile, lcfg, train, dcfg.seq_len, task.model, rss_mb(), backend,
                     warmed=backend is Backend.lean)
    if plan.seq_len != dcfg.seq_len:  # the planner shortened the rows: the same tokens, re-cut
        rows = to_blocks(rows.input_ids[rows.mask].tolist(), plan.seq_len, pad)
        test = to_blocks(test.input_ids[test.mask].tolist(), plan.seq_len, pad)
    alpha = rank_ops.alpha_for_rank(lcfg.alpha, plan.rank, lcfg.rank)  # keeps the global scaling alpha / R
    return Session(device_task.load_model(folder, plan, alpha, seed=0, dropout=lcfg.dropout), plan, rows, key, test)


def run_device(
    server: str, ca: Path | None, data_dir: Path, home: Path, name: str | None = None,
    release_key: Path | None = None, threads: int = 1, max_rounds: int = 0, patience_s: float = 600.0,
    max_wait_s: float = 60.0, on_event: Emit | None = None, enrollment_token: str | None = None,
    profile: str | None = None, profiles_file: str = "", floors: PrivacyFloors = PrivacyFloors(),
    on_device_model: bool = False,
) -> int:
    """Take part in rounds until the server says training is finished. -> updates sent.
    `profile` (watch, phone, car, or one of `profiles_file`): train within its budget.
    `floors`: the privacy a task must promise, else it is refused before training.
    `on_device_model` (`pocketfed device` sets it): after the final release (and during a long wait),
    train the personal adapter and build the runtime model in <home> (`pocketfed.device.ondevice`)."""
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

    def skip_round(task: wire.TaskSpec, reason: str) -> None:
        """Give up this round (its task is not trained again) and wait before checking in."""
        skipped.add(task.round_id)
        emit("round_skipped", {"round": task.round_index, "round_id": task.round_id, "reason": reason})
        time.sleep(min(max(task.deadline - time.time(), 0.2), max_wait_s))

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
    trusted = trusted_release_key(home, release_key, lambda: call(client.release_key), server)
    write_atomic(home / device_home.DEVICE_INFO, json.dumps({  # for `pocketfed release pull` and `personalize`
        "server": server, "ca": str(ca.expanduser().resolve()) if ca is not None else None,
        "data": str(data_dir.resolve()), "profile": profile, "profiles_file": profiles_file}))
    emit("registered", {"device_id": device_id})

    def personalize(session: Session | None) -> None:
        """Train the personal adapter of the installed release (once per release)."""
        if not on_device_model or device_home.current_release(home) is None:
            return
        session = session or home_session(home, data_dir, device_id, device_profile)
        if session is not None:
            emit("personal", ondevice.personalize_home(home, session.model, session.train))

    def build_model() -> None:
        """The runtime model of the installed release and personal adapter, in a child process;
        called with no training model held, so the two never sit in memory together."""
        gc.collect()
        release_free_memory()
        if on_device_model and device_home.current_release(home) is not None and not ondevice.model_is_current(home):
            built = ondevice.convert(home)
            if device_profile is not None:  # each conversion process against the profile's budget
                built["budget_mb"] = device_profile.train_memory_mb
                built["within_budget"] = built["peak_rss_mb"] <= device_profile.train_memory_mb
            emit("model", built)

    # ---- loop ---------------------------------------------------------------------------------
    sent, session = 0, None
    skipped: set[int] = set()  # rounds this device could not train (`guard.round_problem`): not trained again
    while max_rounds == 0 or sent < max_rounds:
        try:
            reply = call(client.checkin, probe_eligibility().model_copy(update={"profile": wire.profile_label(profile)}))
        except http.ServerRefused as e:
            if e.code == "unknown_device":  # the server lost its state: register again
                device_id = register()
                continue
            raise
        if reply.done:
            emit("done", {"reason": reply.reason})
            # the final release too: devices use the model the run ends with
            latest = call(client.latest_release)
            try:
                manifest, _, fresh = accept_release(home, trusted, latest, lambda sha: call(client.adapter, sha), time.time(),
                                                    releases.installed_task(home))
                emit("release", {"version": manifest.version, "installed": fresh})
            except signing.ReleaseRejected as e:
                emit("release_refused", {"reason": str(e)})
            personalize(session)
            session = None
            build_model()
            break
        task = reply.task
        if task is not None and task.round_id in skipped:  # the same task again: wait for the next round
            task = None
        if task is None:
            emit("wait", {"reason": reply.reason})
            if on_device_model and reply.retry_at - time.time() >= IDLE_FOR_MODEL_S and not ondevice.model_is_current(home):
                personalize(session)  # a long wait: personalize and convert now, not only at the end
                session = None
                build_model()
            time.sleep(min(max(reply.retry_at - time.time(), 0.2), max_wait_s))
            continue
        refusal = floors.refusal(task.privacy)  # before the adapter download, before training
        if refusal is None and task.evaluate is not None:
            refusal = evaluate.refusal(floors)
        if refusal is not None:
            ledger.record_refusal(home, server, "task", f"round {task.round_id}: {refusal}")
            emit("task_refused", {"round": task.round_index, "round_id": task.round_id, "reason": refusal})
            time.sleep(min(max(reply.retry_at - time.time(), 0.2), max_wait_s))
            continue
        try:
            manifest, global_adapter, fresh = accept_release(home, trusted, task.release,
                                                             lambda sha: call(client.adapter, sha), time.time(),
                                                             task_settings(task))
            if fresh:
                emit("release", {"version": manifest.version, "installed": True})
        except signing.ReleaseRejected as e:
            if "signature" in str(e):  # a new coordinator key: one sentence and exit (KeyChanged), not a loop
                trusted_release_key(home, release_key, lambda: call(client.release_key), server)
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
        if task.evaluate is not None:  # federated evaluation: score the release on the test split and report
            session.model.set_state(start)
            assert session.test is not None
            try:
                evaluate.run_evaluation(client, call, home, server, task, session.model, session.test, emit)
            except (RoundLost, secagg.SecAggError) as e:
                emit("round_lost", {"round": task.round_index, "round_id": task.round_id, "reason": str(e)})
            except http.ServerRefused as e:
                emit("upload_refused", {"round": task.round_index, "code": e.code, "detail": e.detail})
            continue
        privacy = privacy_plan(task)
        train = TrainConfig(**task.train.model_dump())
        try:
            result = device_task.run_task(session.model, session.train, TrainTask(
                task.round_index, device_id, start, train, task.seed, privacy, upload_rank=global_rank))
        except ValueError:  # e.g. distributed DP's rounding refuses a non-finite vector: if training went
            bad = guard.nonfinite(session.model.get_state())  # non-finite, that is the cause, and the round is lost
            if not bad:
                raise
            problem = f"training made {bad[0]!r} NaN or Inf (the privacy pipeline refused it): nothing is sent"
            ledger.record_refusal(home, server, ledger.UPDATE, f"round {task.round_id}: {problem}")
            skip_round(task, problem)
            continue
        upload = result.upload
        assert upload is not None
        problem = guard.round_problem(result)
        if problem is not None:  # nothing leaves; the ledger says why, and the device takes later rounds
            ledger.record_refusal(home, server, ledger.UPDATE, f"round {task.round_id}: {problem}")
            skip_round(task, problem)
            continue
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
        try:
            payload = ledger.check_and_record(home, server, ledger.UPDATE, st_load(upload.payload), upload_schema(task))
            metrics = json.loads(ledger.check_and_record(home, server, ledger.METRICS, {
                "num_tokens": result.num_tokens, **extra, **stats}, {}))
        except ledger.EgressRefused as e:  # the ledger wrote the refusal down; nothing was sent
            skip_round(task, str(e))
            continue
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
            "checkpointing": p.checkpointing, "keep_rebuilt": p.keep_rebuilt, "predicted_mb": p.predicted_peak_mb,
            "budget_mb": p.budget_mb, "runtime_mb": p.memory_mb["runtime"]}
