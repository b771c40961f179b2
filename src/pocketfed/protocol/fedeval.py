"""Federated evaluation's report: what one device says about a global model on its own test split,
and what the coordinator makes of the totals. Both sides import it (the device computes `Sums`,
the coordinator checks and adds them).

A device scores at most T = deploy.eval_max_tokens predicted positions of its test split (rows
in order, positions in order) under the global adapter and reports four sums

    r_i = (L_i, n_i, h1_i, h3_i)
    L_i  = sum_t min(-log p(x_{t+1} | x_<=t), NLL_CAP)      (the capped token loss, nats)
    n_i  = the positions scored (<= T)
    h1_i, h3_i = positions whose next token is the model's top-1 / among its top-3

The coordinator learns only R = sum_i r_i over the devices that reported (through the secure sum
under secure aggregation: no device's r_i in the clear) and publishes

    loss = R_L / R_n = sum_i n_i loss_i / sum_i n_i   (the token-weighted mean of the devices' losses)
    top1 = R_h1 / R_n,  top3 = R_h3 / R_n,  perplexity = exp(loss)

as `pocketfed.evaluation` computes them in simulation (there pooled over the held-out devices).

Why the caps: a report must have a known bound. Under secure aggregation the device sends r_i / T,
every coordinate in [0, NLL_CAP] or [0, 1], so ||r_i / T||_2 <= sqrt(NLL_CAP^2 + 3) = BOUND, which
sizes the fixed-point encoding (Bonawitz et al., CCS 2017, as `pocketfed.privacy.secagg` runs it).
The cap of 30 nats (p < 1e-13) binds only on tokens the model all but rules out. The decoded sum
of m reports is off by at most m 2^-(f+1) per coordinate (`secagg.error_bound`), T times that after
the rescaling; `loss_error_bound` carries it to the loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

NLL_CAP = 30.0  # nats; -log p is capped here so that a report has a bound
BOUND = math.sqrt(NLL_CAP**2 + 3)  # ||r / T||_2 of any honest report
MAX_TOKENS = 2**20  # the largest deploy.eval_max_tokens (and the wire's bound on a report's counts)


class InvalidReport(ValueError):
    """A report no honest device could send (negative, more hits than tokens, over the caps)."""


@dataclass(frozen=True)
class Sums:
    """One device's report, or the total of several (then the counts may be fractional under
    secure aggregation: the decoded sum carries its fixed-point error)."""

    loss_sum: float
    tokens: float
    top1_hits: float
    top3_hits: float

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.loss_sum + other.loss_sum, self.tokens + other.tokens,
                    self.top1_hits + other.top1_hits, self.top3_hits + other.top3_hits)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


ZERO = Sums(0.0, 0.0, 0.0, 0.0)


def check(s: Sums, max_tokens: int) -> Sums:
    """`s` if an honest device with the cap `max_tokens` could have sent it, else InvalidReport
    naming the field: 0 <= top1 <= top3 <= tokens <= T, tokens whole, 0 <= loss_sum <= NLL_CAP tokens."""
    values = s.as_dict()
    bad = [k for k, v in values.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise InvalidReport(f"{bad[0]} is {values[bad[0]]}; every field must be a finite number >= 0")
    if not float(s.tokens).is_integer() or s.tokens > max_tokens:
        raise InvalidReport(f"tokens is {s.tokens}; it must be a whole number of at most {max_tokens} (deploy.eval_max_tokens)")
    if not (float(s.top1_hits).is_integer() and float(s.top3_hits).is_integer()):
        raise InvalidReport("top1_hits and top3_hits must be whole numbers")
    if not s.top1_hits <= s.top3_hits <= s.tokens:
        raise InvalidReport(f"hits must satisfy top1_hits ({s.top1_hits:g}) <= top3_hits ({s.top3_hits:g}) "
                            f"<= tokens ({s.tokens:g})")
    if s.loss_sum > NLL_CAP * s.tokens + 1e-6 * max(1.0, s.tokens):  # float sums of capped terms
        raise InvalidReport(f"loss_sum is {s.loss_sum:g}, above {NLL_CAP:g} nats x {s.tokens:g} tokens")
    return s


def secure_vector(s: Sums, max_tokens: int) -> np.ndarray:
    """The vector a device puts into the secure sum: r / T, float64 [4], norm <= BOUND."""
    return np.array([s.loss_sum, s.tokens, s.top1_hits, s.top3_hits], dtype=np.float64) / max_tokens


def from_secure_total(total: np.ndarray, max_tokens: int) -> Sums:
    """The totals R from the decoded secure sum of r_i / T ([4])."""
    if total.shape != (4,):
        raise ValueError(f"an evaluation's secure sum has 4 values, not shape {tuple(total.shape)}")
    loss, tokens, h1, h3 = (float(x) * max_tokens for x in total)
    return Sums(loss, tokens, h1, h3)


def metrics(total: Sums) -> dict[str, float | None]:
    """loss (token-weighted mean), perplexity, top1, top3, tokens of the totals (None without tokens)."""
    if total.tokens <= 0:
        return {"loss": None, "perplexity": None, "top1": None, "top3": None, "tokens": 0.0}
    loss = total.loss_sum / total.tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "top1": total.top1_hits / total.tokens,
            "top3": total.top3_hits / total.tokens, "tokens": total.tokens}


def coordinate_error(devices: int, frac_bits: int, max_tokens: int) -> float:
    """The most a total's coordinate decoded from the secure sum of `devices` reports can be off:
    T m 2^-(f+1)."""
    return max_tokens * devices * 2.0 ** -(frac_bits + 1)


def loss_error_bound(total: Sums, devices: int, frac_bits: int, max_tokens: int) -> float:
    """How far the loss from decoded totals (L + e1) / (n + e2) can be from the exact L / n, with
    |e1|, |e2| <= e = `coordinate_error`: |e1 - loss e2| / (n + e2) <= e (1 + loss) / (n - e)."""
    e = coordinate_error(devices, frac_bits, max_tokens)
    if total.tokens <= e:
        return math.inf
    loss = total.loss_sum / total.tokens
    return e * (1 + abs(loss)) / (total.tokens - e)
