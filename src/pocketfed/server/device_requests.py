"""What devices ask of the coordinator: check in, upload (chunked, resumable, size-limited,
validated), and the secure-aggregation messages. Each checks the request against the round and
the store, records it in one transaction and ticks the lifecycle. A sampled device is given a
federated evaluation's task before a training one (`evaluations.checkin`); under secure aggregation
its report takes the same stages and upload as an update, under the evaluation's id (`_round`)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

from pocketfed.privacy import secagg
from pocketfed.protocol import secagg_wire as sw
from pocketfed.server import evaluations, lifecycle, operations
from pocketfed.server import round as engine
from pocketfed.server import secagg_stages as stages
from pocketfed.server.sampling import device_seed
from pocketfed.server.service import (DUPLICATE, HASH_MISMATCH, INVALID_SECAGG, INVALID_UPDATE, NOT_ASSIGNED,
                                      NOT_IN_COHORT, OFFSET_MISMATCH, ROUND_CLOSED, STAGE_OF, TOO_LARGE, TRUNCATED,
                                      UNKNOWN_ROUND, WRONG_STAGE, Assignment, Coordinator, Eligibility, Refused, Wait)
from pocketfed.server.store import Round, SecAggRound, Update, private_dir, sha256_hex


def eligibility_problem(e: Eligibility, c: Coordinator) -> str | None:
    missing = [name for name, ok in (("charging", e.charging), ("idle", e.idle), ("on an unmetered network", e.unmetered)) if not ok]
    if missing:
        return "device is not " + ", ".join(missing)
    if e.free_memory_mb < c.cfg.deploy.min_free_memory_mb:
        return f"device has {e.free_memory_mb} MB free memory; training needs {c.cfg.deploy.min_free_memory_mb} MB"
    return None


def checkin(c: Coordinator, device_id: str, e: Eligibility, now: float) -> Assignment | Wait:
    """A task for `device_id` in the open round if the round's Poisson draw sampled it and it is
    eligible now, or when to come back. When it checks in plays no part: a device that always
    checks in first is in a round with probability q, as every other device."""
    with c.lock:
        lifecycle.tick(c, now)
        c.store.touch_device(device_id, now)
        later = now + c.cfg.deploy.retry_s
        if eligibility_problem(e, c) is None and (task := evaluations.checkin(c, device_id, now)) is not None:
            return task  # evaluating a released version comes before training (and outlives it)
        stop = lifecycle.stop_reason(c)
        if stop is not None:
            return Wait(later, stop, done=True)
        problem = eligibility_problem(e, c)
        c.store.note_checkin(device_id, now, problem is None, e.profile)  # the console's devices panel
        if problem:
            return Wait(later, problem)
        r = c.store.open_round()
        if r is None:  # `lifecycle.open_round` waits for enough registered devices, or the operator
            return Wait(later, operations.hold_reason(c)
                        or f"no round is open: {c.store.count_devices()} devices are registered and a round "
                           f"needs at least {engine.min_cohort(c.cfg.deploy.quorum, c.cfg.privacy.secagg)} "
                           f"(the coordinator's deploy.quorum={c.cfg.deploy.quorum}; its operator can lower it)")
        if c.store.has_update(r.round_id, device_id):
            return Wait(later, f"this device's update for round {r.round_id} is in; wait for the next round")
        s = c.store.secagg_round(r.round_id)
        if s is not None and (s.stage != "advertise" or c.store.has_secagg_message(r.round_id, device_id, sw.KEYS)):
            return Wait(later, f"round {r.round_id} is past this device's key advertising (stage {s.stage!r}); "
                               f"wait for the next round")
        if not c.store.is_assigned(r.round_id, device_id):  # a device that crashed gets its task again
            if not lifecycle.sampled(c, r, device_id):
                q = "" if r.sample_rate is None else f" (each device with probability {r.sample_rate:.3g})"
                return Wait(later, f"not selected for round {r.round_id}: its cohort was drawn at random{q} "
                                   f"when it opened; wait for a later round")
            c.store.assign(r.round_id, device_id, now)
        version = c.store.version(r.base_version)
        assert version is not None
        return Assignment(r.round_id, r.idx, device_seed(c.cfg.sim.seed, r.idx, device_id), r.deadline, version)


def _round(c: Coordinator, round_id: int) -> Round | None:
    """A training round, or a federated evaluation seen as one (`evaluations.as_round`): under
    secure aggregation an evaluation's report goes through the same stages and upload."""
    return c.store.round(round_id) or evaluations.as_round(c, round_id)


def _check_can_upload(c: Coordinator, round_id: int, device_id: str, now: float) -> Round:
    r = _round(c, round_id)
    if r is None:
        raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
    if evaluations.eval_id_of(round_id) is not None and not c.cfg.privacy.secagg:
        raise Refused(WRONG_STAGE, f"evaluation {round_id} takes its report in the clear at "
                                   f"/v1/evaluations/{round_id}/report, not as an upload")
    if r.status != "open":
        raise Refused(ROUND_CLOSED, f"round {round_id} is closed ({r.status}); its uploads are refused")
    if c.cfg.privacy.secagg:  # the upload is step 2's masked input
        _check_secagg_step(c, round_id, device_id, sw.MASKED, now)
        if not c.store.has_secagg_message(round_id, device_id, sw.SHARES):
            raise Refused(NOT_IN_COHORT, f"device {device_id} shared no keys in round {round_id}; its masked input cannot be unmasked")
        return r
    if now >= r.deadline:
        raise Refused(ROUND_CLOSED, f"round {round_id} passed its deadline; late uploads are refused")
    if not c.store.is_assigned(round_id, device_id):
        raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
    if c.store.has_update(round_id, device_id):
        raise Refused(DUPLICATE, f"device {device_id} already uploaded its update for round {round_id}")
    return r


def upload_received(c: Coordinator, round_id: int, device_id: str, now: float) -> int:
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
    path = c.store.upload_path(round_id, device_id)
    return path.stat().st_size if path.exists() else 0


def receive_chunk(c: Coordinator, round_id: int, device_id: str, offset: int, data: bytes | Path, now: float) -> int:
    """Append one chunk of an upload at `offset` (which must be what was received so far): its bytes,
    or the file the HTTP layer streamed the request's body into. The .part file is 0600 in a 0700
    folder (`store.private_dir`): an update in progress is the server's alone."""
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
        path = c.store.upload_path(round_id, device_id)
        lock = c.upload_locks.setdefault(path, threading.Lock())
    with lock:  # one device's chunks in order; other devices' chunks and requests go on meanwhile
        have = path.stat().st_size if path.exists() else 0
        if offset != have:
            raise Refused(OFFSET_MISMATCH, f"upload offset {offset} does not follow the {have} bytes received", received=have)
        if have + size > c.max_upload_bytes:
            raise Refused(TOO_LARGE, f"upload would be {have + size} bytes; the limit is {c.max_upload_bytes}")
        private_dir(path.parent)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as f:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, f, 2**20)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return have + size


def _check_payload(c: Coordinator, data: bytes, round_id: int, device_id: str) -> None:
    if c.cfg.privacy.secagg:  # y_u: D words below 2^k, nothing else
        with c.lock:
            s = c.store.secagg_round(round_id)
        assert s is not None
        try:
            sw.parse_masked(data, stages.config_of(s), stages.index_of(s)[device_id])
        except sw.MalformedMessage as e:
            raise Refused(INVALID_UPDATE, f"masked input: {e}") from None
        return
    try:
        engine.decode_upload(data, c.like, c.plan)  # names, shapes, the codec's dtypes, NaN / Inf
    except engine.InvalidUpload as e:
        raise Refused(INVALID_UPDATE, str(e)) from None


def commit_upload(c: Coordinator, round_id: int, device_id: str, size: int, sha256: str, num_tokens: int,
                  metrics: dict[str, float], now: float) -> bool:
    """Check a complete upload and record it; True if it closed the round. Under secure aggregation
    the device sends 0 tokens and no metrics (nothing per device in the clear); otherwise its token
    count weights the mean and must be at least 1."""
    if num_tokens < 1 and not c.cfg.privacy.secagg:
        raise Refused(INVALID_UPDATE, f"num_tokens is {num_tokens}: an update without secure aggregation "
                                      "must report the tokens it trained on (at least 1)")
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
    path = c.store.upload_path(round_id, device_id)
    data = path.read_bytes() if path.exists() else b""
    if len(data) != size:
        raise Refused(TRUNCATED, f"upload has {len(data)} bytes, the commit says {size}", received=len(data))
    if sha256_hex(data) != sha256:
        path.unlink(missing_ok=True)
        raise Refused(HASH_MISMATCH, "upload's sha256 differs from the commit's; upload it again from offset 0", received=0)
    _check_payload(c, data, round_id, device_id)
    blob = c.store.put_blob(data)  # the blob exists before the row that names it
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
        with c.store.transaction():
            c.store.add_update(Update(round_id, device_id, blob, size, num_tokens, dict(metrics), now))
        path.unlink(missing_ok=True)
        lifecycle.tick(c, now)
        r = _round(c, round_id)
        return r is not None and r.status != "open"


def _check_secagg_step(c: Coordinator, round_id: int, device_id: str, kind: str, now: float) -> tuple[Round, SecAggRound]:
    """The round is open, in `kind`'s stage, before its deadline; the device is in it, once."""
    r = _round(c, round_id)
    if r is None:
        raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
    if not c.cfg.privacy.secagg:
        raise Refused(WRONG_STAGE, "this run does not use secure aggregation (privacy.secagg is false)")
    if r.status != "open":
        raise Refused(ROUND_CLOSED, f"round {round_id} is closed ({r.status}); its messages are refused")
    if not c.store.is_assigned(round_id, device_id):
        raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
    s = c.store.secagg_round(round_id)
    assert s is not None
    want = STAGE_OF[kind]
    if s.stage != want:
        raise Refused(WRONG_STAGE, f"round {round_id} is in stage {s.stage!r}; a {kind} message belongs to stage {want!r}")
    if now >= (r.deadline if want == "advertise" else s.stage_deadline):
        raise Refused(WRONG_STAGE, f"round {round_id}'s {want!r} stage passed its deadline")
    if want != "advertise" and device_id not in stages.index_of(s):
        raise Refused(NOT_IN_COHORT, f"device {device_id} did not advertise keys in time for round {round_id}")
    done = c.store.has_update(round_id, device_id) if kind == sw.MASKED else c.store.has_secagg_message(round_id, device_id, kind)
    if done:
        raise Refused(DUPLICATE, f"device {device_id} already sent its {kind} message for round {round_id}")
    return r, s


def secagg_message(c: Coordinator, round_id: int, device_id: str, kind: str, body: bytes, now: float) -> None:
    """Record one device's step-0, step-1, step-2' or step-3 message after checking it against the
    round; step 0's signature over the keys must verify under the device's registered key, so the
    server relays no advert that would make every neighbour refuse its directory (step 2''s over U3
    is checked by the devices: `secagg.unmask_request`)."""
    with c.lock:
        lifecycle.tick(c, now)
        r, s = _check_secagg_step(c, round_id, device_id, kind, now)
        try:
            if kind == sw.KEYS:
                if not secagg.verify_advert(stages.advert_of(c, round_id, device_id, body)):
                    raise sw.MalformedMessage("the signature does not verify under this device's registered key "
                                              "over (round, key, enc_public, mask_public)")
            elif kind == sw.CONSISTENCY:
                u = stages.index_of(s)[device_id]
                if s.survivors is None or u not in s.survivors:
                    raise Refused(NOT_IN_COHORT, f"device {device_id} sent no masked input in round {round_id}; "
                                                 f"only survivors sign the survivor set")
                # 64 bytes, not verified here: the devices verify it (they cannot trust the server's
                # word), and a bad one costs no more than a device that does not sign (secagg.unmask_request)
                sw.parse_signature(body)
            elif kind == sw.SHARES:
                u, graph = stages.index_of(s)[device_id], stages.graph_of(c, s)
                sw.parse_shares(body, round_id, u, graph[u] | {u})
            elif kind == sw.UNMASK:
                u, graph = stages.index_of(s)[device_id], stages.graph_of(c, s)
                if s.survivors is None or not c.store.has_secagg_message(round_id, device_id, sw.CONSISTENCY):
                    raise Refused(NOT_IN_COHORT, f"device {device_id} did not sign the survivor set of round {round_id}; "
                                                 f"only survivors that signed it answer the unmasking")
                sw.parse_unmask(body, round_id, u, set(s.survivors) & (graph[u] | {u}), set(s.dropped or ()) & graph[u])
            else:
                raise Refused(WRONG_STAGE, f"{kind!r} is not a secure-aggregation message sent this way")
        except sw.MalformedMessage as e:
            raise Refused(INVALID_SECAGG, f"{kind} message for round {round_id}: {e}") from None
        with c.store.transaction():
            c.store.add_secagg_message(round_id, device_id, kind, body)
        lifecycle.tick(c, now)


def secagg_view(c: Coordinator, round_id: int, device_id: str, now: float) -> dict[str, Any]:
    """What the server tells device `device_id` about the round's current stage (wire.SecAggState)."""
    with c.lock:
        lifecycle.tick(c, now)
        r = _round(c, round_id)
        if r is None:
            raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
        if not c.store.is_assigned(round_id, device_id):
            raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
        s = c.store.secagg_round(round_id)
        if s is None:
            raise Refused(WRONG_STAGE, f"round {round_id} does not use secure aggregation")
        if r.status != "open":
            return {"round_id": round_id, "stage": r.status, "reason": r.reason or "", "deadline": r.closed_at or now}
        out: dict[str, Any] = {"round_id": round_id, "stage": s.stage, "reason": "",
                               "deadline": r.deadline if s.stage == "advertise" else s.stage_deadline}
        u = stages.index_of(s).get(device_id)
        if s.stage == "advertise" or u is None:
            return out
        out.update(index=u, params=s.params)
        if s.stage == "share":  # step 0 -> 1: the signed adverts, the seed and N(u) (`key_directories`)
            directory = stages.routing(c, s)[u]
            out["cohort"] = [{"identity_public": a.identity_public.hex(), "enc_public": a.enc_public.hex(),
                              "mask_public": a.mask_public.hex(), "signature": a.signature.hex()} for a in directory.cohort]
            out.update(graph_seed=directory.seed.hex(), neighbours=sorted(directory.neighbours))
        elif s.stage == "masked":  # step 1 -> 2: the ciphertexts addressed to u (`route_shares`)
            bundles = stages.routing(c, s)
            out["shares"] = [{"sender": e.sender, "nonce": e.nonce.hex(), "ciphertext": e.ciphertext.hex()}
                             for e in (bundles[u].shares if u in bundles else ())]
        elif s.stage == "consistency":  # step 2 -> 2': U3 to sign (`consistency_request`)
            out.update(survivors=s.survivors)
        elif s.stage == "unmask":  # step 2' -> 3: U3, D and N(u) + u's signatures over U3 (`unmask_request`)
            signatures, graph = stages.routing(c, s)
            out.update(survivors=s.survivors, dropped=s.dropped,
                       signatures={v: sig.hex() for v, sig in signatures.items() if v in graph[u] | {u}})
        return out


