"""A device's side of secure aggregation over HTTP: steps 0-3 of Bonawitz et al. (CCS 2017, Fig. 4,
with signatures and the consistency round), each message through the egress ledger before it is
sent, and every check a device makes against an active server (`pocketfed.privacy.secagg`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketfed.device import http_client as http
from pocketfed.device import ledger
from pocketfed.privacy import pipeline, secagg
from pocketfed.protocol import secagg_wire as sw
from pocketfed.protocol import wire

Emit = Callable[[str, dict[str, Any]], None]
STAGES = ("advertise", "share", "masked", "consistency", "unmask")


class RoundLost(Exception):
    """This device dropped out of a secure-aggregation round (a stage passed it, or it failed)."""


def _wait_stage(client: http.DeviceClient, round_id: int, stage: str, call: Callable[..., Any],
                poll_s: float = 0.2) -> wire.SecAggState:
    """Poll the round until it reaches `stage`; RoundLost if it moves past it or closes."""
    while True:
        view = call(client.secagg_state, round_id)
        if view.stage == stage:
            return view
        if view.stage not in STAGES or STAGES.index(view.stage) > STAGES.index(stage):
            raise RoundLost(f"round {round_id} is {view.stage} ({view.reason or 'the stage passed'}) before this device's {stage}")
        time.sleep(poll_s)


def _directory(view: wire.SecAggState, round_id: int) -> secagg.KeyDirectory:
    assert view.index is not None and view.cohort is not None and view.graph_seed is not None
    cohort = tuple(secagg.AdvertiseKeys(round_id, bytes.fromhex(a.identity_public), bytes.fromhex(a.enc_public),
                                        bytes.fromhex(a.mask_public), bytes.fromhex(a.signature)) for a in view.cohort)
    return secagg.KeyDirectory(round_id, view.index, cohort, bytes.fromhex(view.graph_seed),
                               frozenset(view.neighbours or ()))


def secure_upload(client: http.DeviceClient, call: Callable[..., Any], home: Path, server: str, task: wire.TaskSpec,
                  vector: np.ndarray, metrics: dict[str, float], num_tokens: int, emit: Emit,
                  bound: float | None = None, kind: str = ledger.MASKED_UPDATE) -> None:
    """Steps 0-3 for one round, each message through the ledger first; the same device functions
    `secagg.simulate_round` runs, with the device's identity key (`client.key`) as its signer.
    `bound` and `kind`: the vector's L2 bound and the masked input's ledger kind when the vector is
    not the round's update (a federated evaluation's report: `pocketfed.device.evaluate`).

    Raises RoundLost when the round leaves this device behind, SecAggError when the server's
    parameters or messages fail a check (then this device sends nothing more for the round).
    """
    rid = task.round_id
    assert task.privacy is not None
    plan = task.privacy.to_plan(task.codec)
    adapter_dim = sum(math.prod(t.shape) for t in task.adapter_schema)
    keys = secagg.generate_keys()  # step 0: AdvertiseKeys, signed by the device identity
    advert = secagg.advertise(rid, keys, client.key)
    call(client.secagg_send, rid, "keys", ledger.check_and_record(home, server, ledger.SECAGG_KEYS, sw.keys_arrays(advert),
                                                                 sw.keys_schema()))
    emit("secagg", {"round": task.round_index, "step": "keys"})

    view = _wait_stage(client, rid, "share", call)  # end of step 0: check everything, then ShareKeys
    if view.index is None or view.params is None or view.cohort is None:
        raise RoundLost(f"round {rid} fixed its cohort without this device")
    config = secagg.SecAggConfig(**view.params.model_dump())
    secagg.accept_config(config, round_id=rid, dimension=vector.size, min_degree=plan.secagg_degree,
                         clip_norm=bound if bound is not None else pipeline.secure_bound(plan, adapter_dim),
                         frac_bits=plan.frac_bits)
    state = secagg.check_directory(secagg.begin(config, view.index, keys, client.key), _directory(view, rid))
    state, shares = secagg.share_keys(state)
    holders = set(state.neighbours) | {state.device_id}
    call(client.secagg_send, rid, "shares", ledger.check_and_record(home, server, ledger.SECAGG_SHARES,
                                                                   sw.shares_arrays(shares), sw.shares_schema(holders)))
    emit("secagg", {"round": task.round_index, "step": "shares"})

    view = _wait_stage(client, rid, "masked", call)  # step 2: MaskedInput (refused below t shares)
    bundle = secagg.SharesForDevice(rid, state.device_id, tuple(
        secagg.EncryptedShare(s.sender, state.device_id, bytes.fromhex(s.nonce), bytes.fromhex(s.ciphertext))
        for s in view.shares or ()))
    state, masked = secagg.mask_input(state, bundle, vector)
    payload = ledger.check_and_record(home, server, kind, sw.masked_arrays(masked), sw.masked_schema(config))
    call(client.upload, rid, payload, task.chunk_bytes)
    call(client.commit, rid, payload, num_tokens, metrics)
    emit("secagg", {"round": task.round_index, "step": "masked", "bytes": len(payload)})

    view = _wait_stage(client, rid, "consistency", call)  # step 2': sign U3, once
    state, signature = secagg.sign_survivors(state, secagg.ConsistencyRequest(rid, frozenset(view.survivors or ())))
    call(client.secagg_send, rid, "consistency", ledger.check_and_record(
        home, server, ledger.SECAGG_SIGNATURE, sw.signature_arrays(signature), sw.signature_schema()))
    emit("secagg", {"round": task.round_index, "step": "consistency"})

    view = _wait_stage(client, rid, "unmask", call)  # step 3: t signatures over U3, then the shares
    request = secagg.UnmaskRequest(rid, frozenset(view.survivors or ()), frozenset(view.dropped or ()),
                                   {v: bytes.fromhex(sig) for v, sig in (view.signatures or {}).items()})
    state = secagg.check_consistency(state, request)
    response = secagg.unmask(state, request)
    # what may leave is fixed by the request, not by the response: b-shares for the survivors and
    # s-shares for the dropped the server named, of the devices whose shares this device holds
    schema = sw.unmask_schema(request.survivors & state.held.keys(), request.dropped & state.held.keys())
    call(client.secagg_send, rid, "unmask", ledger.check_and_record(home, server, ledger.UNMASK_SHARES,
                                                                   sw.unmask_arrays(response), schema))
    emit("secagg", {"round": task.round_index, "step": "unmask"})
