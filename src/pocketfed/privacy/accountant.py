"""Privacy accounting for DP-FedAvg rounds, on Google's `dp-accounting` library.

Round r samples each device with probability q_r (Poisson) and releases the sum of clipped updates
plus Gaussian noise of std z_r C: a Poisson-subsampled Gaussian mechanism with noise multiplier z_r.
The rounds compose heterogeneously (each round is accounted with the noise that reached its sum):

    event = Composed([SelfComposed(PoissonSampled(q, Gaussian(z)), count) for each distinct (q, z)])

Grouping identical (q, z) as one SelfComposed event is exact (composition is commutative) and keeps
a 1000-round run to a handful of events.

Two accountants bound the (epsilon, delta) of `event`:
- "rdp": Renyi DP of the subsampled Gaussian (Mironov, "Renyi Differential Privacy", CSF 2017;
  Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019),
  converted to (epsilon, delta) over a grid of orders. Fast, slightly loose.
- "pld": privacy loss distributions (Koskela, Jalko, Honkela, AISTATS 2020; Doroshenko, Ghazi,
  Kamath, Kumar, Manurangsi, "Connect the Dots", PETS 2022). Tighter, slower (~0.4 s for 200
  rounds at q = 0.01).
The neighbouring relation is add-or-remove one device (user-level DP for the device's data).

The noise that reached the sum (`effective_noise_multiplier`): under distributed DP each of the n
expected devices adds N(0, (z C)^2 / n); when only m of them reach the sum, it holds m shares,
std z C sqrt(m / n), and the fixed denominator n keeps the sensitivity at C, so the round's
multiplier is z_eff = z sqrt(m / n). Under central DP the server adds z C itself: z_eff = z.

Two epsilons, for two observers:
- the model's recipients (anyone who sees the released adapters): they do not know who took part,
  so each round is amplified by sampling at q_r. The budget stop uses this one.
- the coordinator: it sees who took part, so no amplification (q = 1), composed over the most
  rounds one device can take part in (`max_participations`, or every round), the rounds with the
  least noise first. What it sees per round (`coordinator_noise_multiplier`): under central DP each
  update in the clear (multiplier 0: epsilon inf); under distributed DP without secure aggregation
  each device's own noised update (z / sqrt(n)); with secure aggregation the noised sum (z_eff).

Bookkeeping is separate from the maths: `PrivacyLedgerState` is a plain, JSON-serializable record
that the server steps once per round and stores in its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # dp_accounting (with the scipy modules it loads: ~70 MB of a process) is imported
    # where epsilon is computed, so a run without differential privacy never loads it
    import dp_accounting

Method = Literal["rdp", "pld"]
_METHODS = ("rdp", "pld")
LEDGER_VERSION = 2
Group = tuple[float, float, int]  # (sample rate q, noise multiplier z, rounds): identical rounds, grouped


def _check(noise_multiplier: float | None, sample_rate: float, rounds: int, delta: float) -> None:
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _accountant(method: Method) -> dp_accounting.PrivacyAccountant:
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if method == "rdp":
        return RdpAccountant()
    if method == "pld":
        return PLDAccountant()
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def dp_event(noise_multiplier: float, sample_rate: float, rounds: int) -> dp_accounting.DpEvent:
    """SelfComposed(PoissonSampled(q, Gaussian(z)), rounds)."""
    import dp_accounting

    round_event = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(round_event, rounds)


def composed_event(groups: Sequence[Group]) -> dp_accounting.DpEvent:
    """Composed(SelfComposed(PoissonSampled(q, Gaussian(z)), count) for each (q, z, count) group)."""
    import dp_accounting

    return dp_accounting.ComposedDpEvent([dp_event(z, q, count) for q, z, count in groups if count])


def epsilon_of(groups: Sequence[Group], delta: float, method: Method = "rdp") -> float:
    """The epsilon at `delta` of heterogeneous rounds, given as (q, z, count) groups (inf if a
    round without noise is among them, 0 without rounds)."""
    for q, z, count in groups:
        _check(z, q, count, delta)
    groups = [g for g in groups if g[2]]
    if not groups:
        return 0.0
    if any(z == 0 for _, z, _ in groups):
        return math.inf
    accountant = _accountant(method)
    accountant.compose(composed_event(groups))
    return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
            method: Method = "rdp") -> float:
    """The epsilon spent after `rounds` identical rounds at `delta` (inf when noise_multiplier is 0)."""
    _check(noise_multiplier, sample_rate, rounds, delta)
    return epsilon_of([(sample_rate, noise_multiplier, rounds)], delta, method)


def calibrate(target_epsilon: float, delta: float, rounds: int, sample_rate: float,
              method: Method = "rdp", tol: float = 1e-5) -> float:
    """The smallest noise multiplier z (within tol) with epsilon(z, ...) <= target_epsilon.

    Uses dp_accounting's `calibrate_dp_mechanism` (Brent's method over z, falling back to a
    bisection that guarantees the returned z does not overspend).
    """
    _check(None, sample_rate, rounds, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if rounds == 0:
        return 0.0
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(method),
        lambda z: dp_event(z, sample_rate, rounds),
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
        tol=tol,
    ))


# --------------------------------------------------------------------------- the noise of one round


def effective_noise_multiplier(noise_multiplier: float, distributed: bool, noised: int, expected: int) -> float:
    """The multiplier of the noise that reached the sum: z sqrt(m / n) under distributed DP (m of
    the n expected devices' shares of std z C / sqrt(n) reached it), z under central DP."""
    if not distributed:
        return noise_multiplier
    if expected < 1 or noised < 0:
        raise ValueError(f"need expected devices >= 1 and noised devices >= 0, got {noised} of {expected}")
    return noise_multiplier * math.sqrt(noised / expected)


def coordinator_noise_multiplier(noise_multiplier: float, distributed: bool, secagg: bool,
                                 noised: int, expected: int) -> float:
    """The multiplier protecting a device against the coordinator, which sees who took part:
    0 under central DP (it sees each update, or the noiseless secure sum, before its own noise);
    z / sqrt(n) under distributed DP without secure aggregation (each device's own noised update);
    z_eff under distributed DP with secure aggregation (only the noised sum)."""
    if not distributed:
        return 0.0
    if secagg:
        return effective_noise_multiplier(noise_multiplier, True, noised, expected)
    return noise_multiplier / math.sqrt(expected)


def _add(groups: tuple[Group, ...], q: float, z: float) -> tuple[Group, ...]:
    """`groups` with one more (q, z) round: its group's count + 1, or a new group at the end."""
    for i, (gq, gz, count) in enumerate(groups):
        if gq == q and gz == z:
            return groups[:i] + ((gq, gz, count + 1),) + groups[i + 1:]
    return groups + ((q, z, 1),)


def coordinator_epsilon(noise_multipliers: Sequence[tuple[float, int]], max_participations: int | None,
                        delta: float, method: Method = "rdp") -> float:
    """The coordinator's epsilon: no amplification (q = 1), over the `max_participations` rounds
    (all if None) with the least noise, as (z, count) groups.

    Unsampled Gaussian mechanisms compose exactly into one Gaussian mechanism with
    z = (sum_i z_i^-2)^(-1/2) (their privacy losses are Gaussian and add; Dong, Roth, Su, "Gaussian
    Differential Privacy", JRSS B 2022, Corollary 3.3), so one event is accounted, not one per round.
    """
    left = math.inf if max_participations is None else max_participations
    precision, rounds = 0.0, 0  # sum_i z_i^-2 over the chosen rounds
    for z, count in sorted(noise_multipliers):
        take = int(min(count, left))
        if take <= 0:
            break
        if z == 0:
            return math.inf
        precision, rounds, left = precision + take / z**2, rounds + take, left - take
    if not rounds:
        return 0.0
    return epsilon_of([(1.0, precision**-0.5, 1)], delta, method)


# --------------------------------------------------------------------------- the ledger


@dataclasses.dataclass(frozen=True)
class PrivacyLedgerState:
    """What the server has spent: stepped once per round, stored in the checkpoint as JSON.

    noise_multiplier, sample_rate: the nominal z and q (a round's own come with `step`).
    rounds: the recipients' view, (q, z_eff, count) groups. coordinator: the coordinator's view,
    (z, count) groups. epsilon_spent: the recipients' epsilon (the budget's);
    epsilon_coordinator: the coordinator's. max_participations: the most rounds one device may take
    part in (None: every round).
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    epsilon_budget: float
    method: Method = "rdp"
    max_participations: int | None = None
    rounds: tuple[Group, ...] = ()
    coordinator: tuple[tuple[float, int], ...] = ()
    epsilon_spent: float = 0.0
    epsilon_coordinator: float = 0.0

    def __post_init__(self) -> None:
        _check(self.noise_multiplier, self.sample_rate, 0, self.delta)
        for q, z, count in self.rounds:
            _check(z, q, count, self.delta)
        if not self.epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be positive, got {self.epsilon_budget}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.max_participations is not None and self.max_participations < 1:
            raise ValueError(f"max_participations must be None (every round) or >= 1, got {self.max_participations}")

    @property
    def rounds_done(self) -> int:
        return sum(count for _, _, count in self.rounds)

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rounds"] = [list(g) for g in self.rounds]
        data["coordinator"] = [list(g) for g in self.coordinator]
        # JSON has no inf: a run without noise against the coordinator stores null
        data["epsilon_coordinator"] = None if math.isinf(self.epsilon_coordinator) else self.epsilon_coordinator
        data["epsilon_spent"] = None if math.isinf(self.epsilon_spent) else self.epsilon_spent
        return {"version": LEDGER_VERSION, **data}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> PrivacyLedgerState:
        version = data.get("version")
        if version == 1:
            return _from_version_1(data)
        if version != LEDGER_VERSION:
            raise ValueError(f"unknown privacy ledger version {version!r} (this pocketfed reads 1 and 2)")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"version"}
        if unknown:
            raise ValueError(f"unknown privacy ledger fields {sorted(unknown)}")
        values = {k: v for k, v in data.items() if k in fields}
        values["rounds"] = tuple((float(q), float(z), int(n)) for q, z, n in values.get("rounds", ()))
        values["coordinator"] = tuple((float(z), int(n)) for z, n in values.get("coordinator", ()))
        for key in ("epsilon_spent", "epsilon_coordinator"):
            if key in values and values[key] is None:
                values[key] = math.inf
        return cls(**values)


def _from_version_1(data: dict[str, Any]) -> PrivacyLedgerState:
    """A version-1 ledger: every round accounted at the nominal (q, z); it kept no coordinator view,
    so the coordinator's epsilon is unknown and reported as inf until the run is restarted."""
    known = {"version", "noise_multiplier", "sample_rate", "delta", "epsilon_budget", "rounds_done",
             "epsilon_spent", "method"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown privacy ledger fields {sorted(unknown)}")
    z, q, done = float(data["noise_multiplier"]), float(data["sample_rate"]), int(data.get("rounds_done", 0))
    return PrivacyLedgerState(
        noise_multiplier=z, sample_rate=q, delta=float(data["delta"]), epsilon_budget=float(data["epsilon_budget"]),
        method=data.get("method", "rdp"), rounds=((q, z, done),) if done else (),
        coordinator=((0.0, done),) if done else (), epsilon_spent=float(data.get("epsilon_spent", 0.0)),
        epsilon_coordinator=math.inf if done else 0.0,
    )


def step(state: PrivacyLedgerState, noise_multiplier: float | None = None, sample_rate: float | None = None,
         coordinator_noise_multiplier: float = 0.0) -> PrivacyLedgerState:
    """After one more round with the noise that reached its sum (z_eff; None: the nominal z) at its
    sample rate (None: the nominal q), and the coordinator's multiplier for it (0: it saw the
    updates). Both epsilons are recomputed over the whole composition.

    Pure, so `budget_exhausted(step(state))` previews whether a next round at the nominal z and q
    would overspend.
    """
    z = state.noise_multiplier if noise_multiplier is None else noise_multiplier
    q = state.sample_rate if sample_rate is None else sample_rate
    _check(z, q, 1, state.delta)
    _check(coordinator_noise_multiplier, 1.0, 1, state.delta)
    rounds = _add(state.rounds, q, z)
    coordinator = tuple((gz, n) for _, gz, n in _add(tuple((1.0, gz, n) for gz, n in state.coordinator),
                                                      1.0, coordinator_noise_multiplier))
    return dataclasses.replace(
        state, rounds=rounds, coordinator=coordinator,
        epsilon_spent=epsilon_of(rounds, state.delta, state.method),
        epsilon_coordinator=coordinator_epsilon(coordinator, state.max_participations, state.delta, state.method),
    )


def preview(state: PrivacyLedgerState) -> float:
    """The recipients' epsilon after one more round at the nominal z and q (what the budget stop checks)."""
    return epsilon_of(_add(state.rounds, state.sample_rate, state.noise_multiplier), state.delta, state.method)


def budget_exhausted(state: PrivacyLedgerState) -> bool:
    """True once the recipients' epsilon spent reaches the budget."""
    return state.epsilon_spent >= state.epsilon_budget
