"""A device's side of secure aggregation over HTTP: steps 0-3 of Bonawitz et al. (CCS 2017), each
message through the egress ledger before it is sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketfed.device import http_client as http
from pocketfed.device import ledger
from pocketfed.privacy import secagg
from pocketfed.protocol import secagg_wire as sw
from pocketfed.protocol import wire

Emit = Callable[[str, dict[str, Any]], None]


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


