"""Secure aggregation: correctness under dropout, failure below threshold, masks, Shamir, overflow."""

from __future__ import annotations

import itertools

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
    total = sa.run_round(vectors, threshold=5, dropout_after_masking={0}, rng_seed_for_tests=2)
    assert total.dtype == np.float64 and total.shape == (DIM,)
    assert np.abs(total - _expected(vectors, set(range(N)))).max() <= sa.error_bound(N, FRAC)


def test_secagg_plus_sparse_graph_with_dropout() -> None:
    vectors = _vectors(2)
    graph = sa.neighbour_graph(range(N), 4, b"seed")
    assert all(len(vs) == 4 for vs in graph.values())  # Harary H_{4,10}: 4-regular
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    out = sa.simulate_round(vectors, neighbours=4, threshold=3, dropout_before_masking={4},
                            dropout_after_masking={7}, rng_seed_for_tests=5)
    assert np.abs(out.total - _expected(vectors, out.included)).max() <= sa.error_bound(N, FRAC)


@pytest.mark.parametrize("after, before", [({0, 1, 2, 3, 4}, set()), (set(), {0, 1, 2, 3, 4})])
def test_below_threshold_fails_cleanly(after: set[int], before: set[int]) -> None:
    with pytest.raises(sa.SecAggError, match="threshold is 6"):
        sa.run_round(_vectors(), threshold=6, dropout_after_masking=after,
                     dropout_before_masking=before, rng_seed_for_tests=1)


def test_sparse_neighbourhood_short_of_shares_fails_with_no_result() -> None:
    # ring of degree 2: device 0's neighbours both drop after masking, so b_0 has 1 share < t = 2
    graph = sa.neighbour_graph(range(N), 2, sa.seeded_random_bytes(9, "server")(32))
    victim = 0
    with pytest.raises(sa.SecAggError, match="shares of device 0's self-mask seed"):
        sa.run_round(_vectors(), neighbours=2, threshold=2,
                     dropout_after_masking=set(graph[victim]), rng_seed_for_tests=9)


def test_devices_refuse_to_reveal_both_shares_of_one_device() -> None:
    cfg = sa.SecAggConfig(round_id=0, cohort_size=3, dimension=4, threshold=2)
    state, _ = sa.advertise(cfg, 0, sa.seeded_random_bytes(0, "d"))
    bad = sa.UnmaskRequest(0, frozenset({0, 1}), frozenset({1, 2}))
    with pytest.raises(sa.SecAggError, match="both surviving and dropped"):
        sa.unmask(state, bad)


def test_one_masked_vector_is_uniform_alone() -> None:
    dim = 50_000
    rng = np.random.default_rng(3)
    vectors = [rng.normal(size=dim) * 1e-3 for _ in range(4)]
    cfg = sa.SecAggConfig(round_id=1, cohort_size=4, dimension=dim, threshold=3)
    states, adverts = {}, []
    for u in range(4):
        states[u], a = sa.advertise(cfg, u, sa.seeded_random_bytes(1, f"d{u}"))
        adverts.append(a)
    dirs = sa.key_directories(cfg, adverts, sa.neighbour_graph(range(4), None, b""))
    shares = []
    for u in range(4):
        states[u], m = sa.share_keys(states[u], dirs[u], sa.seeded_random_bytes(1, f"s{u}"))
        shares.append(m)
    bundles = sa.route_shares(cfg, shares)
    _, masked = sa.mask_input(states[0], bundles[0], vectors[0])

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
        seed = sa.agree_seed(states[0].mask_private, adverts[v].mask_public, cfg.round_id, 0, v)
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
    cfg = sa.SecAggConfig(round_id=0, cohort_size=3, dimension=4, threshold=2)
    states, adverts = {}, []
    for u in range(3):
        states[u], a = sa.advertise(cfg, u, sa.seeded_random_bytes(6, f"d{u}"))
        adverts.append(a)
    dirs = sa.key_directories(cfg, adverts, sa.neighbour_graph(range(3), None, b""))
    _, msg = sa.share_keys(states[0], dirs[0], sa.seeded_random_bytes(6, "s0"))
    by_recipient = {s.recipient: s for s in msg.shares}
    assert set(by_recipient) == {0, 1, 2}
    tampered = sa.EncryptedShare(0, 1, by_recipient[1].nonce, bytes([by_recipient[1].ciphertext[0] ^ 1])
                                 + by_recipient[1].ciphertext[1:])
    state1, _ = sa.share_keys(states[1], dirs[1], sa.seeded_random_bytes(6, "s1"))
    sa.mask_input(state1, sa.SharesForDevice(0, 1, (by_recipient[1],)), np.zeros(4))  # intact: fine
    with pytest.raises(sa.SecAggError, match="failed authentication"):
        sa.mask_input(state1, sa.SharesForDevice(0, 1, (tampered,)), np.zeros(4))
