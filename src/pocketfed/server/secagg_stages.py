"""Secure aggregation over HTTP: the five stages of Bonawitz et al. (CCS 2017, Fig. 4, the
active-adversary rounds), each with a deadline: advertise keys (the training deadline), share keys,
masked input (the resumable upload), consistency (each survivor signs U3), unmasking. The server
calls the same `pocketfed.privacy.secagg` steps `secagg.simulate_round` calls and sees only signed
public keys, ciphertexts, masked vectors, signatures and the shares the protocol reveals; the
devices check each step (`pocketfed.device.secure_upload`). Fewer than t devices at any stage fails
the round ("failed", model unchanged).

The cohort's index order is its identity keys' order (the keys the devices registered with), and
the SecAgg+ graph seed is the hash of the signed adverts (`secagg.graph_seed`): nothing about the
graph is the server's choice once the cohort is.

`advance` is the stage machine (a Decision for the round engine's driver); `secure_sum` is step 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pocketfed.privacy import pipeline, secagg
from pocketfed.protocol import secagg_wire as sw
from pocketfed.server.round import Decision
from pocketfed.server.service import Coordinator
from pocketfed.server.store import Round, SecAggRound


def config_of(s: SecAggRound) -> secagg.SecAggConfig:
    assert s.params is not None
    return secagg.SecAggConfig(**s.params)


def graph_of(c: Coordinator, s: SecAggRound) -> dict[int, frozenset[int]]:
    assert s.cohort is not None and s.graph_seed is not None
    return secagg.neighbour_graph(range(len(s.cohort)), config_of(s).degree, bytes.fromhex(s.graph_seed))


def index_of(s: SecAggRound) -> dict[str, int]:
    return {name: i for i, name in enumerate(s.cohort or [])}


def advert_of(c: Coordinator, round_id: int, device: str, body: bytes) -> secagg.AdvertiseKeys:
    """A device's step-0 message with its registered identity key (MalformedMessage if malformed)."""
    identity = c.store.device_key(device)
    assert identity is not None  # only registered devices reach the round
    enc, mask, signature = sw.parse_keys(body)
    return secagg.AdvertiseKeys(round_id, bytes.fromhex(identity), enc, mask, signature)


def adverts(c: Coordinator, s: SecAggRound) -> list[secagg.AdvertiseKeys]:
    """The cohort's signed adverts in index order."""
    keys = c.store.secagg_messages(s.round_id, sw.KEYS)
    return [advert_of(c, s.round_id, name, keys[name]) for name in s.cohort or []]


def signers(c: Coordinator, s: SecAggRound) -> dict[int, bytes]:
    """Step 2': {u: u's signature over (round, seed, U3)}, each checked when it arrived."""
    index = index_of(s)
    return {index[name]: sw.parse_signature(body)
            for name, body in c.store.secagg_messages(s.round_id, sw.CONSISTENCY).items()}


def shares(c: Coordinator, s: SecAggRound) -> list[secagg.ShareKeys]:
    index, graph = index_of(s), graph_of(c, s)
    return [sw.parse_shares(body, s.round_id, index[name], graph[index[name]] | {index[name]})
            for name, body in c.store.secagg_messages(s.round_id, sw.SHARES).items()]


def masked_inputs(c: Coordinator, s: SecAggRound) -> list[secagg.MaskedInput]:
    index, config = index_of(s), config_of(s)
    return [sw.parse_masked(c.store.get_blob(u.blob_sha), config, index[u.device_id]) for u in c.store.updates(s.round_id)]


def secure_sum(c: Coordinator, r: Round) -> np.ndarray:
    """Step 3 (server): sum_{u in U3} x_u from the masked inputs and the revealed shares."""
    s = c.store.secagg_round(r.round_id)
    assert s is not None and s.survivors is not None and s.dropped is not None
    config, index, graph = config_of(s), index_of(s), graph_of(c, s)
    survivors, dropped = frozenset(s.survivors), frozenset(s.dropped)
    responses = []
    for name, body in c.store.secagg_messages(r.round_id, sw.UNMASK).items():
        u = index[name]
        responses.append(sw.parse_unmask(body, r.round_id, u, survivors & (graph[u] | {u}), dropped & graph[u]))
    request = secagg.UnmaskRequest(r.round_id, survivors, dropped, signers(c, s))
    return secagg.aggregate(config, adverts(c, s), graph, masked_inputs(c, s), request, responses)


def _start_sharing(c: Coordinator, r: Round, now: float, shape: tuple[int, float] | None = None) -> str | None:
    """End of step 0: fix the cohort U1 (advertisers, indexed by identity key), k, the degree 2h
    (`secagg.graph_degree`: the configured degree is a minimum), t (`secagg.threshold_floor`) and
    the graph seed (the hash of the signed adverts). `shape`: the secure vector's (length, L2 bound)
    when it is not the round's update (a federated evaluation's report). -> None, or why not."""
    p = c.cfg.privacy
    signed = {name: advert_of(c, r.round_id, name, body)
              for name, body in c.store.secagg_messages(r.round_id, sw.KEYS).items()}
    by_identity = {a.identity_public: name for name, a in signed.items()}
    try:
        cohort = secagg.order_cohort(r.round_id, signed.values())  # each signature was verified on arrival
    except secagg.SecAggError as e:
        return str(e)
    n = len(cohort)
    dim, bound = shape or (pipeline.secure_length(c.plan, c.dimension),  # + 1: the centred clip bit, if any
                           pipeline.secure_bound(c.plan, c.dimension))
    degree = secagg.graph_degree(n, p.secagg_degree)
    config = secagg.SecAggConfig(r.round_id, n, dim, secagg.threshold_floor(n, degree), bound, p.frac_bits, degree)
    try:
        secagg.key_directories(config, cohort)
    except secagg.SecAggError as e:
        return str(e)
    c.store.set_secagg_stage(r.round_id, "share", now + c.cfg.deploy.secagg_stage_s,
                             params=dataclasses.asdict(config), cohort=[by_identity[a.identity_public] for a in cohort],
                             graph_seed=secagg.graph_seed(r.round_id, cohort).hex())
    return None


def advance(c: Coordinator, r: Round, now: float, shape: tuple[int, float] | None = None) -> Decision:
    """Advance a secure-aggregation round by one stage when every device of the stage answered or
    its deadline passed. A stage short of t devices fails the round; the last commits it.
    `shape`: as `_start_sharing`'s (a federated evaluation's)."""
    s = c.store.secagg_round(r.round_id)
    assert s is not None
    if s.stage == "advertise":
        n = len(c.store.secagg_messages(r.round_id, sw.KEYS))
        if n < r.goal and now < r.deadline:
            return Decision("wait")
        if n < max(r.quorum, 2):
            return Decision("abort", f"deadline with {n} devices advertising keys, below quorum {max(r.quorum, 2)}")
        problem = _start_sharing(c, r, now, shape)
        if problem:
            return Decision("fail", problem)
        return Decision("wait")
    config = config_of(s)
    t, n = config.threshold, config.cohort_size
    if s.stage == "share":
        shared = c.store.secagg_messages(r.round_id, sw.SHARES)
        if len(shared) < n and now < s.stage_deadline:
            return Decision("wait")
        if len(shared) < t:
            return Decision("fail", f"only {len(shared)} of {n} devices shared keys; threshold is {t}")
        c.store.set_secagg_stage(r.round_id, "masked", now + c.cfg.deploy.secagg_stage_s)
        return Decision("wait")
    if s.stage == "masked":
        shared = {index_of(s)[name] for name in c.store.secagg_messages(r.round_id, sw.SHARES)}
        masked = masked_inputs(c, s)
        if len(masked) < len(shared) and now < s.stage_deadline:
            return Decision("wait")
        try:
            request = secagg.consistency_request(config, masked, shared)
        except secagg.SecAggError as e:
            return Decision("fail", str(e))
        c.store.set_secagg_stage(r.round_id, "consistency", now + c.cfg.deploy.secagg_stage_s,
                                 survivors=sorted(request.survivors), dropped=sorted(shared - request.survivors))
        return Decision("wait")
    assert s.survivors is not None
    if s.stage == "consistency":  # each signature was verified on arrival (`device_requests.secagg_message`)
        signed = len(c.store.secagg_messages(r.round_id, sw.CONSISTENCY))
        if signed < len(s.survivors) and now < s.stage_deadline:
            return Decision("wait")
        if signed < t:
            return Decision("fail", f"only {signed} of {len(s.survivors)} survivors signed the survivor set; "
                                    f"threshold is {t}")
        c.store.set_secagg_stage(r.round_id, "unmask", now + c.cfg.deploy.secagg_stage_s)
        return Decision("wait")
    assert s.stage == "unmask"
    answered = len(c.store.secagg_messages(r.round_id, sw.UNMASK))
    if answered < len(c.store.secagg_messages(r.round_id, sw.CONSISTENCY)) and now < s.stage_deadline:
        return Decision("wait")
    return Decision("commit", f"secure sum of {len(s.survivors)} masked inputs, {answered} devices unmasked")


def routing(c: Coordinator, s: SecAggRound) -> Any:
    """Every device's key directory (stage "share"), share bundle (stage "masked") or the
    survivors' signatures and the graph (stage "unmask"), built once per stage: the adverts, shares and
    signatures are frozen when the stage opens. Without this, each device's poll rebuilt all n
    devices' routing, O(n^2) work per stage."""
    key = (s.round_id, s.stage)
    if key not in c.secagg_routing:
        if s.stage == "share":
            routing = secagg.key_directories(config_of(s), adverts(c, s))
        elif s.stage == "masked":
            routing = secagg.route_shares(config_of(s), shares(c, s))
        else:  # the signatures over U3, and the graph that says whose each device is sent
            routing = (signers(c, s), graph_of(c, s))
        c.secagg_routing.clear()  # one stage at a time is asked for; the old ones never again
        c.secagg_routing[key] = routing
    return c.secagg_routing[key]


