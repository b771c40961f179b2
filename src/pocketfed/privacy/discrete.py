"""The distributed discrete Gaussian: integer noise for secure aggregation.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021 (arXiv:2102.06387; "KLS21" below). Each of n devices

    1. clips its update x in R^d to L2 norm C                         (`pocketfed.privacy.dp`)
    2. scales by 1/gamma and rounds each coordinate at random to floor or ceil, unbiased, and
       redraws until the rounded vector has ||x~||_2 <= D2 (conditional randomized rounding,
       KLS21 Sec. 4.1 / Theorem 1, below)                              `conditional_stochastic_round`
    3. adds integer noise Y ~ N_Z(0, sigma^2)^d, the discrete Gaussian   `discrete_gaussian`
       (Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020;
       "CKS20" below), with sigma^2 in grid units (`sigma_int_sq`)
    4. reduces mod 2^k and hands the words to secure aggregation         `encode`

and the server decodes the signed sum mod 2^k and multiplies by gamma (`decode`). Noise never
exists in floating point, so there are no low-order float bits to leak the signal (Mironov, CCS 2012),
and only the signal is rounded; the noise is on the integer grid from the start.

Random rotation. KLS21 rotate x (randomized Hadamard) before rounding so that every coordinate is
small and a small k suffices with rare "modular clipping". It is not needed for correctness or
privacy here (rotations keep the L2 norm): `modulus_bits` sizes k for the worst case
|x~_i| <= ||x~||_2 <= D2, so the sum never wraps except with the noise-tail probability it is given.
Rotation would only save bits (about log2(sqrt(d / log d)) per coordinate).

Conditional rounding bound (KLS21 Theorem 1, Eq. for Delta_2^2; in grid units c = C / gamma):
    D2^2 = min{ c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2),  (c + sqrt(d))^2 }
Randomized rounding exceeds the first term with probability <= beta (their Lemma on randomized
rounding), so a redraw is needed with probability <= beta; the second term holds always, since
|x~_i - x_i| < 1. beta = 0 means "deterministic bound only" (no redraws in practice). Conditioning
on the event A makes the rounding biased, per coordinate by |E[(x~_i - E x~_i) 1(not A)]| / P(A)
<= P(not A) / P(A) <= beta / (1 - beta) grid steps (|x~_i - E x~_i| < 1); in practice P(not A) is far
below beta. beta = exp(-1/2) is TensorFlow Federated's default.

Privacy of the sum (KLS21 Proposition 14, as used by their accounting code in
google-research/federated `distributed_dp/accounting_utils.py`): with n noise shares of
N_Z(0, sigma^2) in the sum, sigma >= 1/2, integer sensitivities D2 (L2) and D1 (L1), and

    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))        (KLS21 Theorem 1)

the sum satisfies (alpha, eps(alpha))-RDP for every alpha > 1 with, writing s = sqrt(n) sigma,

    eps(alpha) = min{ alpha D2^2 / (2 s^2) + tau d,
                      alpha/2 (D2^2 / s^2 + 2 tau D1 / s + tau^2 d),
                      alpha/2 (D2 / s + tau sqrt(d))^2 }.

tau measures how far the sum of n discrete Gaussians is from N_Z(0, n sigma^2) (a single discrete
Gaussian, which has the continuous Gaussian's RDP alpha D2^2 / (2 s^2) for integer shifts, CKS20
Sec. 2). The first term alone is dp-accounting's `ZCDpEvent(rho=D2^2 / (2 s^2), xi=tau d)`, and
(1/2) eps^2-CDP with eps^2 = D2^2 / s^2 + 2 tau d. D1 <= min(sqrt(d) D2, D2^2) for integer vectors.

Neighbouring relation: one device's (rounded) vector changes by at most D2 while the n noise shares
stay in the sum (the model of KLS21). Pass as n the number of devices whose noise is guaranteed to be
in the sum (the secure-aggregation threshold of honest devices), not the invited cohort.

Randomness comes from `pocketfed.privacy.dp.uniform_open01` (AES-256-CTR keyed by `secrets`);
`seed` arguments exist for tests only. Every draw inside one call uses its own sub-seed, so a
seeded call is reproducible and an unseeded call draws fresh keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from pocketfed.privacy.dp import clip_vector, uniform_open01

DEFAULT_BETA = math.exp(-0.5)
"""Conditional-rounding knob beta: a redraw happens with probability <= beta (TFF's default)."""

MAX_BITS = 64  # words are uint64 at most
SUBSAMPLED_ORDERS = tuple(range(2, 129)) + (256,)  # the subsampled bound needs integer orders
_MAX_ROUNDING_TRIES = 1000  # beta^1000 is 0 in float64 for beta <= exp(-1/2); only a bug gets here

# --------------------------------------------------------------------------- randomness


def _subseed(seed: int | None, label: str, index: int) -> int | None:
    """A distinct test seed per draw inside one call (None stays None: a fresh `secrets` key)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"pocketfed/discrete/{seed}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_count(count: int) -> None:
    if int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")


# --------------------------------------------------------------------------- discrete Gaussian


def discrete_gaussian(count: int, sigma_sq: float, seed: int | None = None) -> np.ndarray:
    """`count` samples of N_Z(0, sigma^2): P[Y = y] = exp(-y^2 / (2 sigma^2)) / Z over the integers.

    CKS20 Algorithm 3, vectorized: with t = floor(sigma) + 1, propose Y ~ DLap(t) (P[Y = y] is
    proportional to exp(-|y| / t)) and accept with probability
        exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2));
    the accepted Y are exactly N_Z(0, sigma^2) (CKS20 Sec. 5). Proposals are drawn in batches and
    the rejected ones redrawn. About 1 / 0.76 proposals per sample for large sigma. DLap(t) is
    G1 - G2 for two geometric variables with P[G = g] = (1 - e^{-1/t}) e^{-g/t}, and
    G = floor(-t ln U) for U uniform on (0, 1).

    Exactness: like TensorFlow Privacy's vectorized sampler, this uses floating point where CKS20
    Algorithm 1-3 use exact rational Bernoulli(exp(-x)) trials (tens of times slower in Python).
    The output is an integer, so Mironov's attack on float outputs does not apply; what floating point
    costs is a perturbation of the pmf: the uniforms have 53-bit resolution, so each geometric bin
    and each acceptance probability is off by at most about 2^-53 absolute (plus the relative
    rounding of log and exp, ~1e-16). In the bulk of the distribution, where the bins of DLap(t)
    have mass ~ 1/t, that is a relative error of about t 2^-53 (~1e-12 at sigma = 1e4), i.e. an extra
    privacy loss of that order; the proposal is cut off at |Y| < 37.5 t, where the exact pmf is
    below exp(-700). `sigma_sq = 0` returns zeros.
    """
    _check_count(count)
    if not 0 <= sigma_sq <= 2.0**92:  # sigma <= 2^46 keeps every proposal (|Y| < 37.5 t) exact in float64
        raise ValueError(f"sigma_sq must be a number in [0, 2^92], got {sigma_sq}")
    out = np.zeros(count, dtype=np.int64)
    if sigma_sq == 0 or count == 0:
        return out
    sigma = math.sqrt(sigma_sq)
    t = math.floor(sigma) + 1
    pending = np.arange(count)  # indices still without an accepted sample
    draw = 0
    while pending.size:
        m = pending.size
        batch = int(m / 0.7) + 16  # ~1.3 proposals per sample at large sigma, 1.45 at sigma < 1
        u = uniform_open01(3 * batch, _subseed(seed, "dgauss", draw))
        draw += 1
        g1 = np.floor(-t * np.log(u[:batch]))
        g2 = np.floor(-t * np.log(u[batch : 2 * batch]))
        y = g1 - g2  # float64 holding integers |y| < 37.5 t: exact
        accept = u[2 * batch :] < np.exp(-((np.abs(y) - sigma_sq / t) ** 2) / (2.0 * sigma_sq))
        accepted = y[accept][:m].astype(np.int64)
        out[pending[: accepted.size]] = accepted
        pending = pending[accepted.size :]
    return out


# --------------------------------------------------------------------------- conditional rounding


def rounded_l2_bound(scaled_norm: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """D2 in grid units: the L2 bound that conditional rounding enforces on x~ (KLS21 Theorem 1).

    scaled_norm is c = C / gamma. D2 = min{ sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)),
    c + sqrt(d) }; beta = 0 gives the deterministic c + sqrt(d).
    """
    if not scaled_norm >= 0 or not math.isfinite(scaled_norm):
        raise ValueError(f"scaled_norm (clip_norm / gamma) must be a finite number >= 0, got {scaled_norm}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    deterministic = scaled_norm + math.sqrt(dim)
    if beta == 0:
        return deterministic
    root_d = math.sqrt(dim)
    squared = scaled_norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + root_d / 2)
    return min(math.sqrt(squared), deterministic)


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """D1 <= min(sqrt(d) D2, D2^2) for integer vectors (Cauchy-Schwarz; and |v| <= v^2 on Z)."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


def _check_gamma(gamma: float) -> None:
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma (the grid step) must be a finite number > 0, got {gamma}")


def conditional_stochastic_round(
    x: np.ndarray, gamma: float, norm_bound: float, seed: int | None = None
) -> np.ndarray:
    """Round x / gamma at random to the integers until ||x~||_2 * gamma <= norm_bound; int64 [d].

    Each coordinate v = x_i / gamma becomes floor(v) + 1 with probability v - floor(v), else
    floor(v), independently, so E[x~] = x / gamma (Kairouz et al. 2021, Sec. 4.1). The whole vector
    is redrawn while its norm exceeds the bound (conditional randomized rounding). Use
    `norm_bound = gamma * rounded_l2_bound(C / gamma, d, beta)` for an input clipped to C: then a
    redraw happens with probability <= beta, and the accountant's D2 is exactly what is enforced.
    Raises ValueError if the bound is below what rounding can reach (e.g. norm_bound < ||x||).
    """
    _check_gamma(gamma)
    if not norm_bound > 0:
        raise ValueError(f"norm_bound must be > 0, got {norm_bound}")
    v = np.asarray(x, dtype=np.float64).ravel() / gamma
    if not np.all(np.isfinite(v)):
        raise ValueError("x must be finite")
    bound_int = norm_bound / gamma
    if (np.abs(v).max(initial=0.0) + 1) ** 2 * max(v.size, 1) >= 2.0**62:
        raise ValueError(f"gamma {gamma} is too fine for this vector: the rounded entries' squared norm "
                         f"would overflow 64 bits; use a coarser gamma")
    floor = np.floor(v)
    frac = v - floor
    base = floor.astype(np.int64)
    for attempt in range(_MAX_ROUNDING_TRIES):
        u = uniform_open01(v.size, _subseed(seed, "round", attempt))
        rounded = base + (u < frac)
        # Exact integer squared norm (entries < 2^31 by the check above), compared with the bound.
        if int(np.dot(rounded, rounded)) <= bound_int**2:
            return rounded
    raise ValueError(f"no rounding of x / gamma met the norm bound {norm_bound} in {_MAX_ROUNDING_TRIES} "
                     f"draws: the bound must be rounded_l2_bound(||x|| / gamma, d, beta) * gamma or more")


# --------------------------------------------------------------------------- secure-aggregation encoding


def _dtype(bits: int) -> type[np.unsignedinteger]:
    # Same word sizes as pocketfed.privacy.secagg: uint32 up to 32 bits, uint64 above.
    return np.uint32 if bits <= 32 else np.uint64


def _check_bits(bits: int) -> None:
    if int(bits) != bits or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [2, {MAX_BITS}], got {bits!r}")


def quantize(x: np.ndarray, clip_norm: float, gamma: float, beta: float = DEFAULT_BETA,
             seed: int | None = None) -> np.ndarray:
    """Steps 1-2 on a device: clip to C, conditionally round x / gamma; int64 [d], ||.||_2 <= D2.

    With the same `seed` this is exactly the rounding inside `encode` (tests use that).
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    _check_gamma(gamma)
    clipped = clip_vector(np.asarray(x, dtype=np.float64).ravel(), clip_norm)
    bound = gamma * rounded_l2_bound(clip_norm / gamma, max(clipped.size, 1), beta)
    return conditional_stochastic_round(clipped, gamma, bound, seed)


def encode(x: np.ndarray, clip_norm: float, gamma: float, noise_sigma_int_sq: float, bits: int,
           seed: int | None = None, beta: float = DEFAULT_BETA) -> np.ndarray:
    """The device's whole pipeline: clip to C, conditionally round to the grid gamma Z, add
    N_Z(0, noise_sigma_int_sq)^d (grid units), reduce mod 2^k; unsigned words [d] (uint32 if k <= 32).

    The words go to secure aggregation as they are (secagg adds masks mod 2^k). Size k with
    `modulus_bits`. No random rotation is applied (see the module docstring).
    """
    _check_bits(bits)
    q = quantize(x, clip_norm, gamma, beta, seed)
    q = q + discrete_gaussian(q.size, noise_sigma_int_sq, _subseed(seed, "encode-noise", 0))
    # int64 -> uint64 is two's complement, i.e. already mod 2^64; masking keeps the low k bits.
    return (q.astype(np.uint64) & np.uint64(2**bits - 1)).astype(_dtype(bits))


def decode_int(total: np.ndarray, bits: int) -> np.ndarray:
    """The signed integer sum from its residue s mod 2^k: s - 2^k [s >= 2^(k-1)]; int64 [d]."""
    _check_bits(bits)
    s = np.asarray(total).astype(np.uint64) & np.uint64(2**bits - 1)
    if bits == 64:
        return s.view(np.int64).copy()  # two's complement is exactly the centred residue
    signed = s.astype(np.int64)
    signed[signed >= 2 ** (bits - 1)] -= 2**bits
    return signed


def decode(total: np.ndarray, gamma: float, bits: int) -> np.ndarray:
    """The server's float64 sum: gamma times the signed sum mod 2^k (exact below 2^53 in magnitude)."""
    _check_gamma(gamma)
    return decode_int(total, bits).astype(np.float64) * gamma


def noise_tail(num_devices: int, sigma_int_sq: float, dim: int, wrap_prob: float) -> float:
    """T with P[max_j |sum of n N_Z(0, sigma^2) in coordinate j| >= T] <= wrap_prob.

    N_Z(0, sigma^2) is sigma^2-sub-Gaussian, E[exp(l Y)] <= exp(l^2 sigma^2 / 2) (CKS20, Sec. 2:
    the discrete Gaussian's moment generating function is at most the continuous one's), so a sum of n
    is n sigma^2-sub-Gaussian: P[|S| >= T] <= 2 exp(-T^2 / (2 n sigma^2)). A union bound over d
    coordinates gives T = sqrt(2 n sigma^2 ln(2 d / wrap_prob)).
    """
    if not 0 < wrap_prob < 1:
        raise ValueError(f"wrap_prob must be in (0, 1), got {wrap_prob}")
    return math.sqrt(2 * num_devices * sigma_int_sq * math.log(2 * dim / wrap_prob))


def modulus_bits(n: int, clip_norm: float, gamma: float, d: int, sigma_int_sq: float,
                 beta: float = DEFAULT_BETA, wrap_prob: float = 1e-15) -> int:
    """k such that the signed sum of n encoded vectors wraps mod 2^k with probability <= wrap_prob.

    Per coordinate |sum_u x~_u,i| <= n floor(D2) (|x~_i| <= ||x~||_2 <= D2, enforced by conditional
    rounding) and the summed noise stays below T = `noise_tail(n, sigma^2, d, wrap_prob)` in every
    coordinate except with probability wrap_prob; k = bit_length(n floor(D2) + ceil(T)) + 1 then gives
    |sum| < 2^(k-1). Pass the largest cohort that can be summed. Raises ValueError above 64 bits.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n (devices summed) must be a positive integer, got {n!r}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    _check_gamma(gamma)
    if not sigma_int_sq >= 0:
        raise ValueError(f"sigma_int_sq must be >= 0, got {sigma_int_sq}")
    signal = n * math.floor(rounded_l2_bound(clip_norm / gamma, d, beta))
    noise = math.ceil(noise_tail(n, sigma_int_sq, d, wrap_prob)) if sigma_int_sq else 0
    bits = (signal + noise).bit_length() + 1
    if bits > MAX_BITS:
        raise ValueError(f"the sum needs {bits} bits, more than {MAX_BITS}: use a coarser gamma "
                         f"(now {gamma}), fewer devices (now {n}) or less noise")
    return max(bits, 2)


# --------------------------------------------------------------------------- accounting


def _check_noise(num_devices: int, sigma_int_sq: float) -> None:
    if int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    # KLS21's bound on the sum of discrete Gaussians assumes sigma >= 1/2; we ask sigma >= 1 so that
    # either reading of that condition (on sigma or sigma^2) holds. Real settings are far above it.
    if not sigma_int_sq >= 1 or not math.isfinite(sigma_int_sq):
        raise ValueError(f"sigma_int_sq (per-device noise variance in grid units) must be >= 1 for the "
                         f"distributed discrete Gaussian bound, got {sigma_int_sq}")


def tau(num_devices: int, sigma_int_sq: float) -> float:
    """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) (KLS21 Theorem 1); 0 for n = 1."""
    _check_noise(num_devices, sigma_int_sq)
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma_int_sq * k / (k + 1)) for k in range(1, num_devices))


def rdp_curve(orders: Sequence[float], *, num_devices: int, sigma_int_sq: float, l2_sens: float,
              l1_sens: float, dim: int) -> np.ndarray:
    """Per-round RDP eps(alpha) of the sum of n devices' N_Z(0, sigma^2) noise (KLS21 Prop. 14).

    Sensitivities are in grid units. eps(alpha) = min of the three terms in the module docstring,
    with s = sqrt(n) sigma and tau from `tau`. No sampling: every round releases the sum.
    """
    t = tau(num_devices, sigma_int_sq)
    s = math.sqrt(num_devices * sigma_int_sq)
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a <= 1):
        raise ValueError(f"RDP orders must be > 1, got {a[a <= 1].tolist()}")
    l2, l1 = l2_sens / s, l1_sens / s
    term_1 = a * l2**2 / 2 + t * dim
    term_2 = a / 2 * (l2**2 + 2 * t * l1 + t**2 * dim)
    term_3 = a / 2 * (l2 + math.sqrt(dim) * t) ** 2
    return np.minimum(np.minimum(term_1, term_2), term_3)


def subsampled_rdp(order: int, sampling_rate: float, base: Callable[[int], float]) -> float:
    """RDP at integer order alpha of a Poisson-subsampled mechanism whose RDP is `base`.

    Zhu and Wang, "Poisson Subsampled Renyi Differential Privacy", ICML 2019, their general upper
    bound (for any mechanism, add-or-remove neighbours; "Theorem 5" in the labelling of KLS21's
    accounting code), with q the sampling rate. At alpha = 2 it equals the exact subsampled Gaussian:
        eps'(alpha) <= 1/(alpha-1) log[ (1-q)^(alpha-1) (alpha q - q + 1)
                                        + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                                        + 3 sum_{l=3}^{alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} ],
    capped by the unsampled eps(alpha) (subsampling never hurts). Summed in log space.
    """
    if int(order) != order or order < 2:
        raise ValueError(f"the subsampled bound needs integer orders >= 2, got {order}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    alpha, q = int(order), sampling_rate
    if q == 1:
        return base(alpha)

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    log_q, log_1q = math.log(q), math.log1p(-q)
    logs = [(alpha - 1) * log_1q + math.log(alpha * q - q + 1),
            log_comb(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + base(2)]
    logs += [math.log(3) + log_comb(alpha, j) + j * log_q + (alpha - j) * log_1q + (j - 1) * base(j)
             for j in range(3, alpha + 1)]
    top = max(logs)
    total = top + math.log(sum(math.exp(v - top) for v in logs))
    return min(total / (alpha - 1), base(alpha))


def epsilon(*, rounds: int, delta: float, num_devices: int, sigma_int_sq: float, clip_norm: float,
            gamma: float, dim: int, beta: float = DEFAULT_BETA, sampling_rate: float = 1.0,
            orders: Sequence[float] | None = None) -> float:
    """(epsilon, delta) after `rounds` rounds of the distributed discrete Gaussian.

    Per round: D2 = `rounded_l2_bound(C / gamma, d, beta)`, D1 = `rounded_l1_bound(D2, d)`, the RDP
    curve of `rdp_curve`; with sampling_rate q < 1 (Poisson sampling of devices) each order is
    replaced by Zhu and Wang's general subsampled bound (`subsampled_rdp`, integer orders 2..256).
    Rounds compose by adding RDP; dp-accounting's `compute_epsilon` converts to (epsilon, delta)
    (CKS20 Prop. 12 conversion). Caveat for q < 1: the bound treats the n noise shares as present in
    both neighbouring worlds (KLS21's model); n must be the number of devices whose noise is surely
    in the sum, whoever was sampled.
    """
    if int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    _check_gamma(gamma)
    if rounds == 0:
        return 0.0
    # Imported here: devices import this module to encode, and dp-accounting (+ scipy) is ~70 MB.
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

    l2 = rounded_l2_bound(clip_norm / gamma, dim, beta)
    l1 = rounded_l1_bound(l2, dim)

    def base_many(alphas: Sequence[float]) -> np.ndarray:
        return rdp_curve(alphas, num_devices=num_devices, sigma_int_sq=sigma_int_sq, l2_sens=l2,
                         l1_sens=l1, dim=dim)

    if sampling_rate == 1:
        chosen = list(orders if orders is not None else DEFAULT_RDP_ORDERS)
        rdp = base_many(chosen)
    else:
        chosen = list(orders if orders is not None else SUBSAMPLED_ORDERS)
        table = base_many(range(2, int(max(chosen)) + 1))  # eps(l) for l = 2..max order

        def base(alpha: int) -> float:
            return float(table[alpha - 2])

        rdp = np.array([subsampled_rdp(a, sampling_rate, base) for a in chosen])
    eps, _ = compute_epsilon(chosen, rounds * rdp, delta)
    return float(eps)


def effective_noise_multiplier(num_devices: int, sigma_int_sq: float, l2_sens: float) -> float:
    """z = sqrt(n sigma^2) / D2: the noise multiplier of the continuous Gaussian whose RDP
    alpha / (2 z^2) the sum's first RDP term equals, up to its additive tau d (KLS21 Prop. 14).

    For dp-accounting's `GaussianDpEvent(z)` when `tau_is_negligible`. Without sampling that is a
    bound up to + rounds * tau * d in epsilon; with Poisson sampling it is an approximation (the
    subsampled Gaussian's tight RDP is not proven for the discrete sum): use `epsilon` for a bound.
    """
    _check_noise(num_devices, sigma_int_sq)
    if not l2_sens > 0:
        raise ValueError(f"l2_sens must be > 0, got {l2_sens}")
    return math.sqrt(num_devices * sigma_int_sq) / l2_sens


def tau_is_negligible(num_devices: int, sigma_int_sq: float, dim: int, rounds: int,
                      tolerance: float = 1e-10) -> bool:
    """Whether rounds * tau * d <= tolerance: then the Gaussian stand-in changes epsilon by at most
    `tolerance` (tau enters the RDP as the additive tau d, an epsilon-like term, not a delta-like one:
    comparing it with epsilon, not delta, is what the first term of KLS21 Prop. 14 supports)."""
    return rounds * tau(num_devices, sigma_int_sq) * dim <= tolerance
