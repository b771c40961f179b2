"""Secure aggregation against an active server: each test plays a server that deviates from the
protocol (issue 13, findings 4 and 5) and checks that the devices refuse and nothing leaks.

Each attack was run against the protocol before issue 13 (honest-but-curious devices): there the
withheld-shares server recovered x_u exactly, the substituted key went unnoticed, the ring cut
gave an exact 3-device sum (`test_attack_ring_cut_leaks_a_partial_sum_without_the_new_checks`
keeps that demonstration), and the device told a different U3 revealed b_v while others revealed s_v.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pocketfed.privacy import secagg as sa
from pocketfed.privacy.dp import clip_vector
from tests.unit.privacy.test_secagg import setup_round

DIM = 64


def _vectors(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only
    return [rng.normal(size=DIM) * 0.05 for _ in range(n)]


# ---- finding 4: withheld shares -------------------------------------------------------------------


def test_attack_withheld_shares_device_refuses_to_send_its_masked_input() -> None:
    r = setup_round(5, DIM, seed=1)  # full graph, t = 3
    victim = 2
    own = [s for s in r.bundles[victim].shares if s.sender == victim]
    one_other = [s for s in r.bundles[victim].shares if s.sender == 0]
    # the server relays only the victim's own share (then one more): y_u would be masked by PRG(b_u)
    # alone, and b_u's shares sit with the victim's neighbours, who reveal them for a survivor
    for withheld in (own, own + one_other):
        with pytest.raises(sa.SecAggError, match=f"received {len(withheld)} valid shares .* threshold is 3: "
                                                 f"refusing to send its masked input"):
            sa.mask_input(r.states[victim], sa.SharesForDevice(0, victim, tuple(withheld)), _vectors(1)[0])
    # with t shares (its own and two neighbours') it masks: the pairwise masks with both hide x_u
    enough = own + [s for s in r.bundles[victim].shares if s.sender in (0, 1)]
    sa.mask_input(r.states[victim], sa.SharesForDevice(0, victim, tuple(enough)), _vectors(1)[0])


def test_attack_withheld_shares_in_a_full_simulated_round_fails_the_round_not_the_device() -> None:
    r = setup_round(5, DIM, seed=2)
    x = _vectors(5)
    starved = sa.SharesForDevice(0, 3, tuple(s for s in r.bundles[3].shares if s.sender == 3))
    with pytest.raises(sa.SecAggError, match="refusing to send its masked input"):
        sa.mask_input(r.states[3], starved, x[3])
    masked = [r.mask(u, x[u]) for u in (0, 1, 2, 4)]
    request = r.unmask_request(frozenset({0, 1, 2, 4}))
    responses = [r.respond(u, request) for u in (0, 1, 2, 4)]
    assert all(3 not in resp.self_mask_shares for resp in responses)  # device 3 is dropped: only s_3 is revealed
    total = sa.aggregate(r.config, r.cohort, r.graph, masked, request, responses)
    expect = np.sum([clip_vector(x[u], 1.0) for u in (0, 1, 2, 4)], axis=0)
    assert np.abs(total - expect).max() <= sa.error_bound(5, 16)


# ---- finding 4: unsigned keys, a server-chosen seed and threshold ----------------------------------


def _fresh_states(n: int, seed: int, degree: int = 0, threshold: int | None = None
                  ) -> tuple[sa.SecAggConfig, tuple[sa.AdvertiseKeys, ...], dict[int, sa.DeviceState]]:
    t = threshold or sa.threshold_floor(n, degree)
    config = sa.SecAggConfig(0, n, DIM, t, degree=degree)
    keys = [sa.generate_keys(sa.seeded_random_bytes(seed, f"k{i}")) for i in range(n)]
    ids = [sa.seeded_identity(seed, f"i{i}") for i in range(n)]
    cohort = sa.order_cohort(0, [sa.advertise(0, k, i) for k, i in zip(keys, ids)])
    rank = {a.identity_public: u for u, a in enumerate(cohort)}
    states = {}
    for i in range(n):
        u = rank[ids[i].public_key().public_bytes_raw()]
        states[u] = sa.begin(config, u, keys[i], ids[i])
    return config, cohort, states


def _directory(config: sa.SecAggConfig, cohort: tuple[sa.AdvertiseKeys, ...], u: int) -> sa.KeyDirectory:
    """What a server that built the directory from a (possibly doctored) cohort list would send."""
    seed = sa.graph_seed(config.round_id, cohort)
    return sa.KeyDirectory(config.round_id, u, cohort, seed,
                           sa.neighbour_graph(range(len(cohort)), config.degree, seed)[u])


def test_attack_substituted_public_key_is_detected_by_the_device() -> None:
    config, cohort, states = _fresh_states(5, seed=3)
    victim, swapped = 0, 3
    attacker = sa.generate_keys(sa.seeded_random_bytes(99, "server"))
    for field in ("enc_public", "mask_public"):  # the server's own X25519 key in place of device 3's
        doctored = list(cohort)
        doctored[swapped] = dataclasses.replace(cohort[swapped], **{field: getattr(attacker, field)})
        with pytest.raises(sa.SecAggError, match="device 3's advertised keys are not signed by its identity key"):
            sa.check_directory(states[victim], _directory(config, tuple(doctored), victim))
    # the honest directory passes
    sa.check_directory(states[victim], _directory(config, cohort, victim))


def test_attack_duplicated_identity_or_reordered_cohort_is_refused() -> None:
    config, cohort, states = _fresh_states(5, seed=4)
    twice = cohort[:3] + (cohort[2],) + cohort[4:]  # one device listed twice (its signature is valid)
    with pytest.raises(sa.SecAggError, match="duplicated or out of order at 3"):
        sa.check_directory(states[0], _directory(config, twice, 0))
    swapped = (cohort[1], cohort[0]) + cohort[2:]  # the server choosing the order (and so indices)
    with pytest.raises(sa.SecAggError, match="duplicated or out of order at 1"):
        sa.check_directory(states[4], _directory(config, swapped, 4))
    with pytest.raises(sa.SecAggError, match="not this device's keys"):  # told another device's index
        sa.check_directory(dataclasses.replace(states[0], device_id=1), _directory(config, cohort, 1))


def test_attack_server_chosen_graph_seed_or_neighbours_are_refused() -> None:
    config, cohort, states = _fresh_states(20, seed=5, degree=10)
    honest = _directory(config, cohort, 7)
    sa.check_directory(states[7], honest)
    chosen = dataclasses.replace(honest, seed=bytes(32))
    with pytest.raises(sa.SecAggError, match="graph seed is not the hash"):
        sa.check_directory(states[7], chosen)
    other = next(iter(set(range(20)) - honest.neighbours - {7}))
    wrong = dataclasses.replace(honest, neighbours=honest.neighbours - {min(honest.neighbours)} | {other})
    with pytest.raises(sa.SecAggError, match="are not the graph's"):
        sa.check_directory(states[7], wrong)


def test_attack_server_chosen_low_threshold_is_refused() -> None:
    for n, degree, low in [(5, 0, 2), (20, 10, 6), (20, 4, 3)]:  # a majority; h + 2 on H_{2h,n}
        config, cohort, states = _fresh_states(n, seed=6, degree=degree, threshold=low)
        with pytest.raises(sa.SecAggError, match=f"threshold {low} is below {low + 1}"):
            sa.check_directory(states[0], _directory(config, cohort, 0))


# ---- finding 5: a SecAgg+ ring cut by staged dropouts ---------------------------------------------


def _arc_sum(r: setup_round, arc: set[int], masked: list[sa.MaskedInput], dropped: frozenset[int],
             responses: list[sa.UnmaskResponse]) -> np.ndarray:
    """The server's attack: unmask the arc on its own (no pairwise mask joins it to the rest)."""
    cfg = r.config
    total = np.zeros(cfg.dimension, dtype=np.uint64)
    for m in masked:
        if m.device_id in arc:
            total += m.masked.astype(np.uint64)
    for u in sorted(arc):
        shares = {x.device_id: x.self_mask_shares[u] for x in responses if u in x.self_mask_shares}
        total -= sa.expand_mask(sa._reconstruct(cfg, u, shares, "self-mask seed"), cfg.dimension, cfg.bits)
    for d in sorted(dropped):
        partners = sorted(r.graph[d] & arc)
        if partners:
            shares = {x.device_id: x.key_shares[d] for x in responses if d in x.key_shares}
            key = sa._reconstruct(cfg, d, shares, "mask key")
            for v in partners:
                mask = sa.expand_mask(sa.agree_seed(key, r.cohort[v].mask_public, cfg.round_id, d, v), cfg.dimension,
                                      cfg.bits).astype(np.uint64)
                total = total - mask if v < d else total + mask
    return sa.decode(total, cfg.frac_bits, cfg.bits)


def _cut(n: int, degree: int, seed: bytes) -> tuple[set[int], frozenset[int]]:
    """Two runs of h consecutive ring positions with an arc of 3 between them: (arc, the runs)."""
    h = degree // 2
    ring = sa.ring_order(range(n), seed)
    return set(ring[h : h + 3]), frozenset(ring[:h] + ring[h + 3 : 2 * h + 3])


@pytest.mark.parametrize("degree", [sa.graph_degree(20, 4), 4], ids=["degree-the-code-picks-10", "old-degree-4"])
def test_attack_ring_cut_by_staged_dropouts_devices_refuse_and_no_partial_sum(degree: int) -> None:
    n = 20
    r = setup_round(n, DIM, degree=degree, seed=7)  # t = h + 2
    arc, runs = _cut(n, degree, r.directories[0].seed)
    x = _vectors(n, 1)
    survivors = frozenset(range(n)) - runs  # the server says both runs dropped before masking
    masked = [r.mask(u, x[u]) for u in sorted(survivors)]
    request = r.unmask_request(survivors, shared=frozenset(range(n)))
    refused, responses = set(), []
    for u in sorted(survivors):
        try:
            responses.append(r.respond(u, request))
        except sa.SecAggError as e:
            # its neighbourhood has < t survivors, so < t signers too: the consistency check refuses first
            assert "refusing to unmask" in str(e)
            refused.add(u)
    beside_a_run = {u for u in survivors if len((r.graph[u] | {u}) & survivors) < r.config.threshold}
    assert refused == beside_a_run and arc <= refused  # every device of the 3-device arc refuses
    with pytest.raises(sa.SecAggError, match="shares of device .*'s self-mask seed"):
        _arc_sum(r, arc, masked, request.dropped, responses)
    with pytest.raises(sa.SecAggError):  # nor the other arc, nor the whole sum
        _arc_sum(r, set(survivors) - arc, masked, request.dropped, responses)
    with pytest.raises(sa.SecAggError):
        sa.aggregate(r.config, r.cohort, r.graph, masked, request, responses)


def test_attack_ring_cut_leaks_a_partial_sum_without_the_new_checks() -> None:
    """Finding 5 as it stood: t = a bare majority of the 2h + 1 neighbourhood (3 for degree 4) and
    devices that reveal whatever the server asks. The arc's exact 3-device sum comes out."""
    n, degree = 20, 4
    r = setup_round(n, DIM, degree=degree, threshold=4, seed=8)
    old = dataclasses.replace(r.config, threshold=3)  # what default_threshold gave before issue 13
    r.config = old
    for u in r.states:  # re-share under t = 3, bypassing the floor the devices now enforce
        r.states[u] = dataclasses.replace(r.states[u], config=old)
    messages = []
    for u in range(n):
        r.states[u], m = sa.share_keys(dataclasses.replace(r.states[u], self_seed=b""), sa.seeded_random_bytes(8, f"t{u}"))
        messages.append(m)
    r.bundles = sa.route_shares(old, messages)
    arc, runs = _cut(n, degree, r.directories[0].seed)
    x = _vectors(n, 2)
    survivors = frozenset(range(n)) - runs
    masked = [r.mask(u, x[u]) for u in sorted(survivors)]
    # the old unmask: b-shares for U3, s-shares for D, no signatures and no neighbourhood check
    responses = [sa.UnmaskResponse(0, u, {v: p[1] for v, p in r.states[u].held.items() if v in survivors},
                                   {v: p[0] for v, p in r.states[u].held.items() if v in runs}) for u in sorted(survivors)]
    leaked = _arc_sum(r, arc, masked, runs, responses)
    exact = np.sum([clip_vector(x[u], 1.0) for u in arc], axis=0)
    assert np.abs(leaked - exact).max() <= sa.error_bound(3, 16)


# ---- finding 4: inconsistent survivor sets ---------------------------------------------------------


def test_attack_inconsistent_survivor_sets_are_refused_by_the_consistency_check() -> None:
    r = setup_round(5, DIM, seed=9)  # full graph, t = 3
    x = _vectors(5, 3)
    masked = [r.mask(u, x[u]) for u in range(5)]
    everyone, without4 = frozenset(range(5)), frozenset(range(4))
    # the server tells 0 and 4 that everyone survived (to get b_4's shares) and 1, 2, 3 that device 4
    # dropped (to get s_4's): each device signs the set it is told
    signatures = []
    for u, told in [(0, everyone), (4, everyone), (1, without4), (2, without4), (3, without4)]:
        r.states[u], sig = sa.sign_survivors(r.states[u], sa.ConsistencyRequest(0, told))
        signatures.append(sig)
    to_0 = sa.UnmaskRequest(0, everyone, frozenset(), {s.device_id: s.signature for s in signatures})
    to_1 = sa.UnmaskRequest(0, without4, frozenset({4}), {s.device_id: s.signature for s in signatures})
    for u in (0, 4):
        with pytest.raises(sa.SecAggError, match="2 of its neighbourhood signed this survivor set; threshold is 3"):
            sa.check_consistency(r.states[u], to_0)
        with pytest.raises(sa.SecAggError, match="without t signatures"):  # and cannot be made to skip the check
            sa.unmask(r.states[u], to_0)
    responses = [r.respond(u, to_1) for u in (1, 2, 3)]  # 3 signatures over {0..3}: these answer
    revealed_b4 = [x for x in responses if 4 in x.self_mask_shares]
    assert not revealed_b4 and all(4 in x.key_shares for x in responses)  # b_4 never leaves a device
    # a device is not talked into a second set either
    with pytest.raises(sa.SecAggError, match="already signed another survivor set"):
        sa.sign_survivors(r.states[0], sa.ConsistencyRequest(0, without4))
    with pytest.raises(sa.SecAggError, match="not the set it signed"):
        sa.check_consistency(r.states[0], to_1)
    # all the server gets from the consistent side is what an honest round with device 4 dropped gives
    total = sa.aggregate(r.config, r.cohort, r.graph, masked, to_1, responses)
    assert np.abs(total - np.sum([clip_vector(x[u], 1.0) for u in range(4)], axis=0)).max() <= sa.error_bound(5, 16)


def test_attack_junk_consistency_signatures_count_as_not_signing() -> None:
    """The server relays consistency signatures unverified; a device counts a junk one (or one over
    another set) as a device that did not sign: with enough honest signers it unmasks, with fewer than
    t valid ones it refuses, whatever the server's count of "signers" says."""
    n = 5  # full graph, t = 3
    r = setup_round(n, 4, seed=21)
    survivors = frozenset(range(n))
    for u in range(n):
        r.mask(u, np.zeros(4))
    honest = r.unmask_request(survivors, signers=frozenset({0, 1, 2}))
    junk = dict(honest.signatures)
    junk.update({3: bytes(64), 4: bytes(64)})  # two junk signatures the server did not check
    forged = sa.UnmaskRequest(honest.round_id, honest.survivors, honest.dropped, junk)
    r.respond(0, forged)  # itself, 1 and 2: t = 3 valid, the junk ones skipped
    few = {v: junk[v] for v in (0, 3, 4)}  # one valid besides its own: 2 < t
    r.states[1] = dataclasses.replace(r.states[1], confirmed=None)
    with pytest.raises(sa.SecAggError, match="refusing to unmask"):
        r.respond(1, sa.UnmaskRequest(honest.round_id, honest.survivors, honest.dropped, few))
