"""Secure aggregation: correctness under dropout, failure below threshold, masks, Shamir, overflow."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np
import pytest
from scipy.stats import chisquare

from pocketfed.privacy import secagg as sa
from pocketfed.privacy.dp import clip_vector

N, DIM, CLIP, FRAC = 10, 2000, 1.0, 16


def _vectors(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only; masks never use numpy
    # half of them have norm > CLIP, so clipping matters
    return [rng.normal(size=DIM) * (0.5 if i % 2 else 0.05) for i in range(N)]


class setup_round:  # noqa: N801 (read as a function: the round, steps 0-1 done honestly)
    """n devices with seeded keys and identities past steps 0 and 1 (index = cohort position);
    tests play the server from here, honestly or not."""

    def __init__(self, n: int, dim: int, *, degree: int = 0, threshold: int | None = None, seed: int = 0,
                 round_id: int = 0, withhold: Sequence[int] = ()) -> None:
        t = threshold or sa.threshold_floor(n, degree)
        self.config = sa.SecAggConfig(round_id, n, dim, t, degree=degree)
        keys = [sa.generate_keys(sa.seeded_random_bytes(seed, f"k{i}")) for i in range(n)]
        ids = [sa.seeded_identity(seed, f"i{i}") for i in range(n)]
        self.cohort = sa.order_cohort(round_id, [sa.advertise(round_id, k, i) for k, i in zip(keys, ids)])
        self.directories = sa.key_directories(self.config, self.cohort)
        self.graph = {u: d.neighbours for u, d in self.directories.items()}
        rank = {a.identity_public: u for u, a in enumerate(self.cohort)}
        self.states: dict[int, sa.DeviceState] = {}
        messages = []
        for i in range(n):
            u = rank[ids[i].public_key().public_bytes_raw()]
            state = sa.check_directory(sa.begin(self.config, u, keys[i], ids[i]), self.directories[u])
            self.states[u], m = sa.share_keys(state, sa.seeded_random_bytes(seed, f"s{i}"))
            messages.append(m)
        self.bundles = sa.route_shares(self.config, messages)

    def mask(self, u: int, x: np.ndarray) -> sa.MaskedInput:
        self.states[u], m = sa.mask_input(self.states[u], self.bundles[u], x)
        return m

    def unmask_request(self, survivors: frozenset[int], signers: frozenset[int] | None = None,
                       shared: frozenset[int] | None = None) -> sa.UnmaskRequest:
        """Step 2' done honestly: every signer signs `survivors`."""
        signatures = []
        for u in sorted(signers if signers is not None else survivors):
            self.states[u], sig = sa.sign_survivors(self.states[u], sa.ConsistencyRequest(self.config.round_id, survivors))
            signatures.append(sig)
        everyone = frozenset(range(self.config.cohort_size)) if shared is None else shared
        return sa.unmask_request(self.config, sa.ConsistencyRequest(self.config.round_id, survivors),
                                 signatures, everyone)

    def respond(self, u: int, request: sa.UnmaskRequest) -> sa.UnmaskResponse:
        self.states[u] = sa.check_consistency(self.states[u], request)
        return sa.unmask(self.states[u], request)


def _expected(vectors: list[np.ndarray], included: set[int] | frozenset[int]) -> np.ndarray:
    return np.sum([clip_vector(vectors[i], CLIP) for i in sorted(included)], axis=0)


def test_error_bound_and_bits_hand_checked() -> None:
    # n 2^-(f+1) = 10 / 2^17
    assert sa.error_bound(10, 16) == pytest.approx(7.62939453125e-05)
    # Q = floor(1 * 2^16) + 1 = 65537; n Q = 655370 has 20 bits; + 1 sign bit = 21
    assert sa.modulus_bits(10, 1.0, 16) == 21
    assert sa.modulus_bits(100, 2.5, 10) == (100 * 2561).bit_length() + 1 == 19


@pytest.mark.parametrize(
    "after, before",
    [(set(), set()), ({3}, set()), ({1, 4, 8}, set()), (set(), {2}), (set(), {0, 5, 9}), ({7}, {2, 6})],
    ids=["0%", "10%-after", "30%-after", "10%-before", "30%-before", "mixed-30%"],
)
def test_unmasked_sum_matches_plain_sum_within_bound(after: set[int], before: set[int]) -> None:
    vectors = _vectors()
    out = sa.simulate_round(vectors, clip_norm=CLIP, frac_bits=FRAC, threshold=6,
                            dropout_after_masking=after, dropout_before_masking=before,
                            round_id=3, rng_seed_for_tests=11)
    assert out.included == frozenset(range(N)) - before  # after-masking dropouts stay in the sum
    err = np.abs(out.total - _expected(vectors, out.included)).max()
    assert err <= sa.error_bound(N, FRAC)
    assert err > 0  # fixed point really rounds: the bound is not vacuous


def test_run_round_returns_the_float_sum() -> None:
    vectors = _vectors(1)
    total = sa.run_round(vectors, dropout_after_masking={0}, rng_seed_for_tests=2)  # t = 6, the floor
    assert total.dtype == np.float64 and total.shape == (DIM,)
    assert np.abs(total - _expected(vectors, set(range(N)))).max() <= sa.error_bound(N, FRAC)


def test_degree_grows_with_log_n_and_the_threshold_floor_hand_checked() -> None:
    # h = max(ceil(configured / 2), ceil(log2 n)); degree 2h, or the full graph (0) once 2h >= n - 1
    assert sa.graph_degree(20, 4) == 10  # ceil(log2 20) = ceil(4.32) = 5 > 2
    assert sa.graph_degree(100, 4) == 14  # ceil(6.64) = 7
    assert sa.graph_degree(100, 40) == 40  # the configured degree is a minimum
    assert sa.graph_degree(10, 4) == 8  # h = 4: 8 < 9
    assert sa.graph_degree(7, 4) == 0  # h = 3: 6 >= 6, so everyone neighbours everyone
    assert sa.graph_degree(100, 0) == 0  # 0 = the full graph, as configured
    # full graph: a majority, floor(n/2) + 1; H_{2h,n}: h + 2
    assert [sa.threshold_floor(n, 0) for n in (4, 5, 10, 100)] == [3, 3, 6, 51]
    assert sa.threshold_floor(20, 10) == 7 and sa.threshold_floor(20, 4) == 4 and sa.threshold_floor(100, 14) == 9
    assert sa.default_threshold(20, 4) == 7 and sa.default_threshold(10, None) == 6
    with pytest.raises(ValueError, match="secagg_degree must be >= 0"):
        sa.graph_degree(10, -1)


def test_h_consecutive_removals_cut_the_harary_ring() -> None:
    """The fact the sparse threshold rests on: an edge of H_{2h,n} spans at most h ring positions."""
    n, h = 20, 2
    graph = sa.neighbour_graph(range(n), 2 * h, b"seed")
    ring = sa.ring_order(range(n), b"seed")
    removed = set(ring[0:h]) | set(ring[h + 3 : 2 * h + 3])  # two runs of h: an arc of 3 between them
    arc = set(ring[h : h + 3])
    rest = set(range(n)) - removed - arc
    assert not any(graph[u] & rest for u in arc)  # no pairwise mask joins the arc to the rest
    removed_short = set(ring[0 : h - 1]) | set(ring[h + 3 : 2 * h + 3])  # a run of h - 1 does not cut
    assert any(graph[u] & (set(range(n)) - removed_short - arc) - arc for u in arc)
    # the devices beside a run keep at most h + 1 survivors in their 2h + 1 neighbourhood: < t = h + 2
    for u in (ring[h], ring[h + 2]):
        assert len((graph[u] | {u}) - removed) == h + 1 < sa.threshold_floor(n, 2 * h)


def test_secagg_plus_sparse_graph_with_dropout() -> None:
    n = 20
    vectors = _vectors(2) + _vectors(3)
    graph = sa.neighbour_graph(range(N), 4, b"seed")
    assert all(len(vs) == 4 for vs in graph.values())  # Harary H_{4,10}: 4-regular
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    # configured degree 4 is a minimum: at n = 20 the graph has degree 2 ceil(log2 20) = 10, t = 7
    out = sa.simulate_round(vectors, neighbours=4, dropout_before_masking={4, 11},
                            dropout_after_masking={7}, rng_seed_for_tests=5)
    assert (out.degree, out.threshold) == (10, 7)
    assert np.abs(out.total - _expected(vectors, out.included)).max() <= sa.error_bound(n, FRAC)


@pytest.mark.parametrize("after, before", [({0, 1, 2, 3, 4}, set()), (set(), {0, 1, 2, 3, 4})])
def test_below_threshold_fails_cleanly(after: set[int], before: set[int]) -> None:
    with pytest.raises(sa.SecAggError, match="threshold is 6"):
        sa.run_round(_vectors(), threshold=6, dropout_after_masking=after,
                     dropout_before_masking=before, rng_seed_for_tests=1)


def test_a_threshold_below_the_floor_is_refused_by_the_devices() -> None:
    with pytest.raises(sa.SecAggError, match="threshold 5 is below 6"):
        sa.run_round(_vectors(), threshold=5, rng_seed_for_tests=1)  # was accepted before issue 13


def test_sparse_neighbourhood_short_of_shares_fails_with_no_result() -> None:
    # n = 10, degree 8, t = 6: four of the victim's 8 neighbours sign the survivor set, then answer
    # nothing, so b_victim has 5 shares (itself and 4 neighbours) < t
    r = setup_round(N, 4, degree=8, seed=9)
    victim = 0
    silent = sorted(r.directories[victim].neighbours)[:4]
    survivors = frozenset(range(N))
    masked = [r.mask(u, np.zeros(4)) for u in range(N)]
    request = r.unmask_request(survivors)
    responses = [r.respond(u, request) for u in sorted(survivors - set(silent))]
    with pytest.raises(sa.SecAggError, match=f"shares of device {victim}'s self-mask seed"):
        sa.aggregate(r.config, r.cohort, r.graph, masked, request, responses)


def test_devices_refuse_to_reveal_both_shares_of_one_device() -> None:
    cfg = sa.SecAggConfig(round_id=0, cohort_size=3, dimension=4, threshold=2)
    state = sa.begin(cfg, 0, sa.generate_keys(sa.seeded_random_bytes(0, "d")), sa.seeded_identity(0, "d"))
    bad = sa.UnmaskRequest(0, frozenset({0, 1}), frozenset({1, 2}), {})
    with pytest.raises(sa.SecAggError, match="both surviving and dropped"):
        sa.unmask(state, bad)


def test_signed_messages_are_pinned() -> None:
    # step 0 signs version || "advertise" || round (8 bytes, big-endian) || identity || C_u || S_u
    ident, enc, mask = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    assert sa.advert_message(7, ident, enc, mask) == (b"pocketfed/secagg/v1/advertise" + bytes(7) + b"\x07"
                                                      + ident + enc + mask)
    # step 2' signs version || "consistency" || round || seed || |U3| || sorted U3 (4 bytes each)
    assert sa.consistency_message(7, b"\x09" * 32, {2, 0}) == (
        b"pocketfed/secagg/v1/consistency" + bytes(7) + b"\x07" + b"\x09" * 32
        + bytes.fromhex("00000002" "00000000" "00000002"))
    identity = sa.seeded_identity(0, "a")
    advert = sa.advertise(7, sa.generate_keys(sa.seeded_random_bytes(0, "a")), identity)
    assert sa.verify_advert(advert) and len(advert.signature) == sa.SIGNATURE_BYTES
    assert not sa.verify_advert(dataclasses.replace(advert, round_id=8))  # bound to the round
    assert not sa.verify_advert(dataclasses.replace(advert, mask_public=enc))  # and to each key
    # the graph seed is fixed by the signed adverts: any change to one moves it
    other = sa.advertise(7, sa.generate_keys(sa.seeded_random_bytes(0, "b")), sa.seeded_identity(0, "b"))
    seed = sa.graph_seed(7, [advert, other])
    assert seed == hashlib.sha256(b"pocketfed/secagg/v1/graph-seed" + bytes(7) + b"\x07" + bytes(3) + b"\x02"
                                  + b"".join(a.identity_public + a.enc_public + a.mask_public + a.signature
                                             for a in (advert, other))).digest()
    assert seed != sa.graph_seed(7, [other, advert]) != sa.graph_seed(8, [advert, other])


def test_device_checks_the_rounds_parameters_against_its_task() -> None:
    cfg = sa.SecAggConfig(round_id=3, cohort_size=20, dimension=8, threshold=7, clip_norm=1.0, degree=10)
    ok = dict(round_id=3, dimension=8, min_degree=4, clip_norm=1.0, frac_bits=16)
    sa.accept_config(cfg, **ok)
    sa.accept_config(dataclasses.replace(cfg, degree=0, threshold=11), **ok)  # denser is fine
    for change, match in [(dict(dimension=9), "dimension 8 != the update's 9"),
                          (dict(frac_bits=12), "frac_bits 16 != the task's 12"),
                          (dict(clip_norm=1.5), "clip_norm 1.0 < the device's upload bound 1.5"),
                          (dict(min_degree=12), "degree 10 < 12"),
                          (dict(min_degree=0), "degree 10 < the full graph")]:
        with pytest.raises(sa.SecAggError, match=re.escape(match)):
            sa.accept_config(cfg, **{**ok, **change})


def test_one_masked_vector_is_uniform_alone() -> None:
    dim = 50_000
    rng = np.random.default_rng(3)
    vectors = [rng.normal(size=dim) * 1e-3 for _ in range(4)]
    r = setup_round(4, dim, round_id=1, seed=1)  # t = 3
    cfg, states = r.config, r.states
    masked = r.mask(0, vectors[0])

    def top_byte_pvalue(words: np.ndarray) -> float:
        top = (words.astype(np.uint64) >> np.uint64(cfg.bits - 8)).astype(np.int64)
        return float(chisquare(np.bincount(top, minlength=256)).pvalue)

    assert masked.masked.max() < 2**cfg.bits
    assert top_byte_pvalue(masked.masked) > 1e-3  # looks uniform on Z_{2^k}
    # a device the server wrongly declares dropped, so its pairwise masks come off, is still
    # hidden by its self mask PRG(b_u) (Bonawitz et al.'s reason for the double mask)
    word = np.uint64(2**cfg.bits - 1)
    unpaired = masked.masked.astype(np.uint64)
    for v in (1, 2, 3):
        seed = sa.agree_seed(states[0].mask_private, r.cohort[v].mask_public, cfg.round_id, 0, v)
        unpaired = (unpaired - sa.expand_mask(seed, dim, cfg.bits).astype(np.uint64)) & word
    assert top_byte_pvalue(unpaired) > 1e-3
    plain = sa.encode(vectors[0], cfg.clip_norm, cfg.frac_bits, cfg.bits)
    assert top_byte_pvalue(plain) < 1e-12  # the same test catches an unmasked input


def test_prg_masks_are_cryptographic_and_reproducible() -> None:
    cfg_bits = 21
    a_sk, a_pk = sa._keypair(sa.seeded_random_bytes(0, "a"))
    b_sk, b_pk = sa._keypair(sa.seeded_random_bytes(0, "b"))
    c_sk, c_pk = sa._keypair(sa.seeded_random_bytes(0, "c"))
    s_ab = sa.agree_seed(a_sk, b_pk, round_id=7, u=0, v=1)
    assert s_ab == sa.agree_seed(b_sk, a_pk, round_id=7, u=1, v=0)  # both ends agree
    assert s_ab != sa.agree_seed(a_sk, b_pk, round_id=8, u=0, v=1)  # bound to the round
    assert s_ab != sa.agree_seed(a_sk, c_pk, round_id=7, u=0, v=2)  # and to the pair
    assert s_ab != sa.agree_seed(a_sk, b_pk, round_id=7, u=0, v=3)  # and to the ids
    m1 = sa.expand_mask(s_ab, 1000, cfg_bits)
    assert np.array_equal(m1, sa.expand_mask(s_ab, 1000, cfg_bits))  # seed alone reproduces it
    assert not np.array_equal(m1, sa.expand_mask(sa.agree_seed(a_sk, b_pk, 8, 0, 1), 1000, cfg_bits))
    assert m1.max() < 2**cfg_bits
    # pinned AES-256-CTR keystream: key = 32 zero bytes, zero counter (FIPS-197 AES, first block
    # 0xdc95c078a2408989ad48a21492842087), read as little-endian uint32, low 21 bits
    first = sa.expand_mask(bytes(32), 1, 21)[0]
    assert int(first) == int.from_bytes(bytes.fromhex("dc95c078"), "little") & (2**21 - 1)


def test_shamir_any_t_shares_reconstruct_t_minus_1_do_not() -> None:
    secret = int.from_bytes(b"\x42" * 32, "big")
    shares = sa.shamir_split(secret, 3, range(1, 6), sa.seeded_random_bytes(4, "shamir"))
    for subset in itertools.combinations(shares, 3):
        assert sa.shamir_combine({x: shares[x] for x in subset}) == secret
    for subset in itertools.combinations(shares, 2):
        assert sa.shamir_combine({x: shares[x] for x in subset}) != secret
    # hand-checked degree-1 example over GF(p): f(X) = 5 + 3X -> f(1) = 8, f(2) = 11
    assert sa.shamir_combine({1: 8, 2: 11}) == 5


def test_k_is_large_enough_at_the_clip_bound() -> None:
    n, dim = 10, 8
    bits = sa.modulus_bits(n, CLIP, FRAC)
    for sign in (1.0, -1.0):
        x = np.zeros(dim)
        x[0] = sign * CLIP  # all mass on one coordinate: |x_0| = C, the worst case
        total = sum(sa.encode(x, CLIP, FRAC, bits).astype(np.uint64) for _ in range(n))
        assert sa.decode(total, FRAC, bits)[0] == sign * n * CLIP
        # one bit fewer and the same sum wraps
        small = sum(sa.encode(x, CLIP, FRAC, bits - 1).astype(np.uint64) for _ in range(n))
        assert sa.decode(small, FRAC, bits - 1)[0] != sign * n * CLIP
    # end to end through the protocol, every device at the bound
    ones = [np.full(4, CLIP / 2) for _ in range(n)]  # norm exactly C = 1
    assert np.array_equal(sa.run_round(ones, threshold=6, rng_seed_for_tests=0), np.full(4, n * CLIP / 2))


def test_server_only_relays_ciphertexts() -> None:
    r = setup_round(3, 4, seed=6)  # t = 2
    by_sender = {s.sender: s for s in r.bundles[1].shares}
    assert set(by_sender) == {0, 1, 2}
    from0 = by_sender[0]
    tampered = sa.EncryptedShare(0, 1, from0.nonce, bytes([from0.ciphertext[0] ^ 1]) + from0.ciphertext[1:])
    sa.mask_input(r.states[1], sa.SharesForDevice(0, 1, (from0, by_sender[1])), np.zeros(4))  # intact: fine
    with pytest.raises(sa.SecAggError, match="failed authentication"):
        sa.mask_input(r.states[1], sa.SharesForDevice(0, 1, (tampered, by_sender[1])), np.zeros(4))
