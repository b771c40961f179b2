"""Secure aggregation over HTTP: the four stages of Bonawitz et al. (CCS 2017, Fig. 4), each with a
deadline: advertise keys (the training deadline), share keys, masked input (the resumable upload),
unmasking. The server calls the same `pocketfed.privacy.secagg` steps `secagg.simulate_round` calls
and sees only public keys, ciphertexts, masked vectors and the shares the protocol reveals. Fewer
than t devices at any stage fails the round ("failed", model unchanged).

`advance` is the stage machine (a Decision for the round engine's driver); `secure_sum` is step 3.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from pocketfed.privacy import secagg
from pocketfed.protocol import secagg_wire as sw
from pocketfed.server.round import Decision
from pocketfed.server.service import Coordinator
from pocketfed.server.store import Round, SecAggRound


def config_of(s: SecAggRound) -> secagg.SecAggConfig:
    assert s.params is not None
    return secagg.SecAggConfig(**s.params)


def graph_of(c: Coordinator, s: SecAggRound) -> dict[int, frozenset[int]]:
    assert s.cohort is not None and s.graph_seed is not None
    return secagg.neighbour_graph(range(len(s.cohort)), c.cfg.privacy.secagg_degree or None, bytes.fromhex(s.graph_seed))


def index_of(s: SecAggRound) -> dict[str, int]:
    return {name: i for i, name in enumerate(s.cohort or [])}


def adverts(c: Coordinator, s: SecAggRound) -> list[secagg.AdvertiseKeys]:
    keys = c.store.secagg_messages(s.round_id, sw.KEYS)
    return [secagg.AdvertiseKeys(s.round_id, i, *sw.parse_keys(keys[name])) for name, i in index_of(s).items()]


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
    request = secagg.UnmaskRequest(r.round_id, survivors, dropped)
    return secagg.aggregate(config, adverts(c, s), graph, masked_inputs(c, s), request, responses)


def _start_sharing(c: Coordinator, r: Round, now: float) -> str | None:
    """End of step 0: fix the cohort U1 (advertisers, indexed by name order), k, t and N(u).
    -> None, or why the round cannot go on."""
    p = c.cfg.privacy
    keys = c.store.secagg_messages(r.round_id, sw.KEYS)
    cohort = sorted(keys)
    n, dim = len(cohort), c.dimension
    config = secagg.SecAggConfig(r.round_id, n, dim, secagg.default_threshold(n, p.secagg_degree),
                                 c.plan.upload_bound(dim), p.frac_bits)
    seed = os.urandom(32)  # public randomness for the SecAgg+ graph, drawn after the cohort is fixed
    graph = secagg.neighbour_graph(range(n), p.secagg_degree or None, seed)
    try:
        adverts = [secagg.AdvertiseKeys(r.round_id, i, *sw.parse_keys(keys[name])) for i, name in enumerate(cohort)]
        secagg.key_directories(config, adverts, graph)
    except secagg.SecAggError as e:
        return str(e)
    c.store.set_secagg_stage(r.round_id, "share", now + c.cfg.deploy.secagg_stage_s,
                             params=dataclasses.asdict(config), cohort=cohort, graph_seed=seed.hex())
    return None


def advance(c: Coordinator, r: Round, now: float) -> Decision:
    """Advance a secure-aggregation round by one stage when every device of the stage answered or
    its deadline passed. A stage short of t devices fails the round; the last commits it."""
    s = c.store.secagg_round(r.round_id)
    assert s is not None
    if s.stage == "advertise":
        n = len(c.store.secagg_messages(r.round_id, sw.KEYS))
        if n < r.goal and now < r.deadline:
            return Decision("wait")
        if n < max(r.quorum, 2):
            return Decision("abort", f"deadline with {n} devices advertising keys, below quorum {max(r.quorum, 2)}")
        problem = _start_sharing(c, r, now)
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
            request = secagg.unmask_request(config, masked, shared)
        except secagg.SecAggError as e:
            return Decision("fail", str(e))
        c.store.set_secagg_stage(r.round_id, "unmask", now + c.cfg.deploy.secagg_stage_s,
                                 survivors=sorted(request.survivors), dropped=sorted(request.dropped))
        return Decision("wait")
    assert s.stage == "unmask" and s.survivors is not None
    answered = len(c.store.secagg_messages(r.round_id, sw.UNMASK))
    if answered < len(s.survivors) and now < s.stage_deadline:
        return Decision("wait")
    return Decision("commit", f"secure sum of {len(s.survivors)} masked inputs, {answered} devices unmasked")


def routing(c: Coordinator, s: SecAggRound) -> Any:
    """Every device's key directory (stage "share") or share bundle (stage "masked"), built once per
    stage: the adverts and shares are frozen when the stage opens. Without this, each device's poll
    rebuilt all n devices' routing, O(n^2) work per stage."""
    key = (s.round_id, s.stage)
    if key not in c.secagg_routing:
        if s.stage == "share":
            routing = secagg.key_directories(config_of(s), adverts(c, s), graph_of(c, s))
        else:
            routing = secagg.route_shares(config_of(s), shares(c, s))
        c.secagg_routing.clear()  # one stage at a time is asked for; the old ones never again
        c.secagg_routing[key] = routing
    return c.secagg_routing[key]


