"""The round engine: one federated round's logic, written once. Pure: no I/O, time is passed in.

    cohort    `sample_cohort`: Poisson sampling over the round's frame (both drivers); `empty_round`
    plan      `round_plan`: the privacy plan (C, z, n, mode, codec) every task of the round carries
    collect   `decode_upload`: a device's upload checked against the adapter schema and the codec
    defend    `defend`: token weights bounded by the task's budget, updates norm-bounded (`pocketfed.server.robust`)
    decide    `decide`: wait, commit (goal reached, or the deadline with a quorum) or abort
    aggregate `aggregate`: the server half of the privacy pipeline over what was collected, or a
              robust aggregator (server.aggregator) where every update is in the clear
    commit    `commit`: the strategy's step, the accountant's step, the round's metrics; a result
              that is not finite raises `RoundFailed` and the driver commits nothing
    stop      `stop_reason`: the planned rounds are done, or one more would overspend the budget

Two drivers run it. The simulator (`pocketfed.simulate`) samples a cohort, runs the device tasks
through a backend (in-process or Ray), collects their uploads (`collect_in_memory`) and commits.
The coordinator (`pocketfed.server.lifecycle`) collects uploads from HTTP requests, decides on
each tick and persists each transition in one store transaction. Both feed the same functions the
same inputs in device-id order, so a deployment replayed through the simulator gives the same
adapter (tests/integration/test_engine_equality.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as st_load

from pocketfed import codec
from pocketfed.config import Aggregator, Codec, RunConfig, ServerConfig, TrainConfig
from pocketfed.model import rank as rank_ops
from pocketfed.privacy import accountant, pipeline, secagg
from pocketfed.privacy.budget import PrivacyRun
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import hetero, robust, sampling, strategies
from pocketfed.server.strategies import ServerState

AdapterState = dict[str, torch.Tensor]
CODEC_DTYPES = {Codec.float32: {"float32"}, Codec.float16: {"float16"}, Codec.int8: {"int8", "float32"}}


class InvalidUpload(ValueError):
    """An upload that is not an update of the round's schema under its codec."""


class RoundFailed(RuntimeError):
    """A round whose result is not finite: the driver commits nothing and releases nothing."""


@dataclass(frozen=True)
class Refusal:
    """An upload the round did not aggregate, and why."""

    device_id: str
    reason: str


@dataclass(frozen=True)
class Contribution:
    """One device's collected upload: decoded (None when it went into a secure sum), its training
    tokens, the bytes it sent, its released centred adaptive-clipping bit (None when it went into
    the secure sum or none was asked for) and its scalar metrics."""

    device_id: str
    update: AdapterState | None
    num_tokens: int
    bytes_sent: int
    clip_bit: float | None = None
    train_loss: float | None = None
    rank: int = 0  # LoRA rank the device trained (HetLoRA); 0 = the global rank


@dataclass(frozen=True)
class Outcome:
    state: ServerState
    privacy: PrivacyRun | None
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- plan ----------------------------------------------------------------------------------------
def round_plan(cfg: RunConfig, privacy: PrivacyRun | None, expected_devices: int) -> PrivacyPlan:
    """The privacy plan of a round whose expected cohort is `expected_devices` (the simulator's
    sample size, the deployment's goal): the fixed DP denominator and the noise split."""
    return pipeline.plan_for(cfg.privacy, privacy, expected_devices)


# ---- cohort ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cohort:
    """A round's Poisson-sampled cohort (`pocketfed.server.sampling`): the devices drawn, sorted,
    the rate q each device of the frame was drawn at, and the frame's size."""

    devices: list[str]
    sample_rate: float
    frame: int


def sample_cohort(frame: list[str], expected: float, key: bytes) -> Cohort:
    """Poisson sampling of `frame` (the devices that may take part in the round) at
    q = min(1, expected / |frame|), under `key` (`sampling.fresh_key()` in a deployment,
    `sampling.simulation_key(seed, round)` in a simulation). Arrival order plays no part."""
    q = sampling.sample_rate(expected, len(frame))
    return Cohort(sampling.poisson_sample(frame, q, key), q, len(frame))


def cohort_target(goal: int, overselect: float) -> int:
    """A deployment round's expected sampled cohort: ceil(goal * overselect), so that dropouts
    still leave the goal on average. It is what q is computed from (q = min(1, target / frame)):
    over-selection raises every device's rate, and the accountant is given that raised q."""
    return math.ceil(goal * overselect - 1e-9)


def min_cohort(quorum: int, secure: bool) -> int:
    """The fewest devices a round can commit with: the quorum, and 2 under secure aggregation (a
    secure sum of one device is that device's update)."""
    return max(quorum, 2) if secure else quorum


def sampling_frame(devices: list[str], participants_by_round: dict[int, list[str]], round_idx: int,
                   max_participations: int, window: int) -> list[str]:
    """The devices that may be sampled in training round `round_idx`: those below the cap of
    `max_participations` in the window (`sampling.cap_window`; 0 = no cap), given the earlier
    rounds' participants by round index. Leaving a device out only lowers its rate."""
    recent = [participants_by_round.get(i, []) for i in sampling.cap_window(round_idx, window)]
    return sampling.below_cap(devices, recent, max_participations)


def planned_sample_rate(expected: float, population: int) -> float:
    """The sample rate planned before the first round, which calibrates z for
    privacy.target_epsilon: min(1, expected / population), 1 when the population is unknown (0).
    Each round is then accounted at the q it actually had."""
    return sampling.sample_rate(expected, population) if population else 1.0


def participation_bound(cfg: RunConfig) -> int | None:
    """The most rounds one device takes part in under deploy.max_participations per
    deploy.participation_window rounds over sim.rounds (None: no cap), for the accountant."""
    d = cfg.deploy
    return sampling.max_participations(cfg.sim.rounds, d.max_participations, d.participation_window)


def empty_round(state: ServerState, privacy: PrivacyRun | None, plan: PrivacyPlan, sample_rate: float) -> Outcome:
    """A round whose sampled cohort cannot commit (empty, below the quorum, or nobody finished):
    the adapter stays and the round counts as run. The accountant still steps, at the round's q
    and the nominal z (the plan's n noised): the draw happened, and leaving such rounds out would
    condition the released rounds on their cohorts' sizes. An empty frame (q = 0) costs nothing."""
    out = skip(state)
    if privacy is None or sample_rate == 0:
        return out
    privacy = privacy.after_round(plan, plan.expected_devices, None, sample_rate,
                                  dim=sum(t.numel() for t in state.params.values()))
    return Outcome(out.state, privacy, {**out.metrics, "sample_rate": sample_rate, "clip_norm": privacy.clip.clip_norm,
                                        "unclipped_fraction": None, **privacy.epsilons()})


# ---- collect -------------------------------------------------------------------------------------
def decode_upload(payload: bytes, like: AdapterState, plan: PrivacyPlan) -> AdapterState:
    """The update in `payload`, checked: exactly the adapter's names (and, under int8 only, one
    `<name>.__scale` per tensor) and shapes, finite values (`codec.decode`), and only the dtypes of
    the round's codec."""
    try:
        update = codec.decode(payload, like)
        tensors = st_load(payload)
    except codec.PayloadError as e:
        raise InvalidUpload(str(e)) from None
    names = set(like) | ({k + codec.SCALE for k in like} if plan.codec is Codec.int8 else set())
    if not set(tensors) <= names:
        raise InvalidUpload(f"update holds tensors outside the adapter schema under the codec {plan.codec.value}: "
                            f"{sorted(set(tensors) - names)[:3]}")
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    allowed = CODEC_DTYPES[plan.codec]
    if not dtypes <= allowed:
        raise InvalidUpload(f"update dtypes {sorted(dtypes)} do not match the codec {plan.codec.value} ({sorted(allowed)})")
    return update


def collect_in_memory(results: list[TrainResult], plan: PrivacyPlan, like: AdapterState, round_id: int,
                      ranks: dict[str, int] | None = None
                      ) -> tuple[list[Contribution], np.ndarray | None, list[Refusal]]:
    """The simulator's collection: each device's upload decoded as the coordinator decodes it (one
    that does not decode is refused, as the coordinator refuses it on upload), or, under secure
    aggregation, every party of the protocol run in this process (`secagg.simulate_round`) with the
    sum as the only server-side output. -> (contributions in device-id order, secure sum, refusals)."""
    results = sorted(results, key=lambda x: x.device_id)
    total, sent = None, {}
    if plan.secagg:
        vectors = [x.upload.vector for x in results if x.upload is not None and x.upload.vector is not None]
        if len(vectors) != len(results):
            raise ValueError("under secure aggregation every result must carry its pipeline's vector")
        dim = sum(v.numel() for v in like.values())  # the vectors are [dim] or [dim + 1] (the centred bit)
        if any(len(v) != pipeline.secure_length(plan, dim) for v in vectors):
            raise ValueError(f"under this plan every secure vector has {pipeline.secure_length(plan, dim)} values")
        outcome = secagg.simulate_round(vectors, clip_norm=pipeline.secure_bound(plan, dim), frac_bits=plan.frac_bits,
                                        round_id=round_id, neighbours=plan.secagg_degree or None)
        total, sent = outcome.total, outcome.device_bytes_sent
    contributions, refused = [], []
    for i, x in enumerate(results):
        assert x.upload is not None, "the device task runs the privacy pipeline"
        update = None
        if not plan.secagg:
            try:
                update = decode_upload(x.upload.payload or b"", like, plan)
            except InvalidUpload as e:
                refused.append(Refusal(x.device_id, str(e)))
                continue
            if x.num_tokens < 1:  # as the coordinator's commit refuses it
                refused.append(Refusal(x.device_id, f"num_tokens is {x.num_tokens}: an update must report at least 1"))
                continue
        contributions.append(Contribution(
            x.device_id, update, x.num_tokens, sent[i] if plan.secagg else len(x.upload.payload or b""),
            x.upload.clip_bit, x.metrics.get("train_loss"), (ranks or {}).get(x.device_id, 0)))
    return contributions, total, refused


# ---- defend --------------------------------------------------------------------------------------
def token_budget(train: TrainConfig, seq_len: int) -> int | None:
    """The most tokens a task lets a device train on: steps x batch_size x seq_len (every step's
    rows full); None when the task runs epochs, whose length only the device's data fixes."""
    return train.steps * train.batch_size * seq_len if train.steps > 0 else None


@dataclass(frozen=True)
class Defended:
    """The round's contributions after `defend`, and what it did: how many updates it clipped, how
    many token claims it cut, and the norm bound M (None when nothing bounded the norms)."""

    contributions: list[Contribution]
    clipped: int
    tokens_bounded: int
    norm_bound: float | None


def defend(contributions: list[Contribution], server: ServerConfig, plan: PrivacyPlan,
           budgets: dict[str, int | None]) -> Defended:
    """Bound what one device can do to the round, whatever it sent.

    Tokens: a device's weight is at most the budget its task assigned (`token_budget`); under
    epochs (budget None), at most the round's (lower) median claim. Norms (updates in the clear only):
    each update clipped to M = min(server.max_update_norm, server.median_norm_bound x the lower median
    norm) (`robust.norm_bound`; Sun et al. 2019). Under DP the server clips to C anyway and a bound
    read from other devices' updates would change the sensitivity, so only the fixed bound applies."""
    claims = sorted(c.num_tokens for c in contributions)
    median_claim = claims[(len(claims) - 1) // 2] if claims else 0  # the lower one: two devices, one inflating
    out, cut = [], 0
    for c in contributions:
        cap = budgets.get(c.device_id)
        cap = median_claim if cap is None else cap
        if c.num_tokens > cap:
            c, cut = replace(c, num_tokens=cap), cut + 1
        out.append(c)
    if plan.secagg or not out:
        return Defended(out, 0, cut, None)
    norms = [robust.l2_norm(c.update) for c in out]  # type: ignore[arg-type]
    bound = robust.norm_bound(norms, server.max_update_norm, 0.0 if plan.private else server.median_norm_bound)
    if math.isinf(bound):
        return Defended(out, 0, cut, None)
    clipped = sum(n > bound for n in norms)
    out = [replace(c, update=robust.clip(c.update, n, bound)) for c, n in zip(out, norms)]  # type: ignore[arg-type]
    return Defended(out, clipped, cut, bound)


# ---- decide --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "commit", "abort", "fail"]  # fail: a secure-aggregation stage fell short
    reason: str = ""


def decide(received: int, goal: int, quorum: int, deadline: float, now: float) -> Decision:
    """Commit at the goal, or at the deadline with at least `quorum` uploads; abort below it."""
    if received >= goal:
        return Decision("commit", "goal reached")
    if now < deadline:
        return Decision("wait")
    if received >= quorum:
        return Decision("commit", f"deadline with {received} updates (quorum {quorum})")
    return Decision("abort", f"deadline with {received} updates, below quorum {quorum}")


# ---- aggregate -----------------------------------------------------------------------------------
def aggregate(contributions: list[Contribution], plan: PrivacyPlan, like: AdapterState,
              secure_total: np.ndarray | None = None, rule: Aggregator = Aggregator.mean,
              server: ServerConfig | None = None) -> AdapterState:
    """The round's mean update Delta: the server half of the privacy pipeline over the decoded
    uploads (or over the secure sum), zero-padded ranks renormalized per slot when nothing private
    forbids it (`pocketfed.server.hetero`); or, with `rule` other than mean (updates in the clear,
    no DP: the config refuses the rest), the robust aggregate of `pocketfed.server.robust` with
    `server`'s trim fraction and f."""
    n = len(contributions)
    if n == 0:
        raise ValueError("cannot aggregate a round without contributions")
    if secure_total is not None:  # the centred bits' sum, if it is there, is the count's (`commit`)
        return pipeline.finish(pipeline.split_secure(secure_total, plan)[0], plan, n, like)
    updates = [c.update for c in contributions]
    if any(u is None for u in updates):
        raise ValueError("a contribution without its decoded update needs the secure sum")
    if rule is not Aggregator.mean:
        if plan.private:
            raise ValueError(f"server.aggregator={rule.value} cannot run under DP or secure aggregation")
        server = server or ServerConfig()
        return robust.aggregate(updates, rule, server.trim_fraction, server.krum_byzantine)[0]  # type: ignore[arg-type]
    if plan.private:
        return pipeline.finish(pipeline.server_sum(updates, plan), plan, n, like)  # type: ignore[arg-type]
    weights = [float(c.num_tokens) for c in contributions]
    mean = pipeline.plain_mean(updates, weights)  # type: ignore[arg-type]
    if any(c.rank for c in contributions):  # some device trained fewer slots than the global rank R
        rank = rank_ops.rank_of(like)
        ranks = [c.rank or rank for c in contributions]  # 0: the global rank
        if any(r != rank for r in ranks):
            mean = hetero.renormalize(mean, list(zip(ranks, weights)), rank)
    return mean


# ---- commit --------------------------------------------------------------------------------------
def commit(state: ServerState, privacy: PrivacyRun | None, contributions: list[Contribution], mean: AdapterState,
           cfg: RunConfig, *, plan: PrivacyPlan | None = None, secure_total: np.ndarray | None = None,
           sample_rate: float | None = None) -> Outcome:
    """Apply Delta through the strategy, step the accountant and report the round.

    The accountant steps one Poisson-sampled Gaussian mechanism at `sample_rate` (None: the
    ledger's) with the noise that reached the sum: under distributed DP the shares of the
    contributions only (z sqrt(m / n) for m of the plan's n). Adaptive clipping moves C by the
    noised estimate b~ (`pipeline.clip_estimate`) from the released bits or, under secure
    aggregation, the last coordinate of `secure_total`. Only b~ is reported, never the count.
    Under DP `plan` is the round's plan (the one its tasks carried). Raises RoundFailed when the
    mean or the new server state holds NaN or Inf: such a round must not commit (audit finding 1:
    a released Inf adapter stopped every honest device)."""
    new_state, diag = strategies.apply_mean(state, mean, cfg.server)
    bad = not_finite({"mean": mean, "adapter": new_state.params, "first moment": new_state.m or {},
                      "second moment": new_state.v or {}})
    if bad:
        raise RoundFailed(f"the round's {bad} is not finite: nothing is committed and the adapter stays")
    tokens = sum(c.num_tokens for c in contributions)
    losses = [c.train_loss for c in contributions]
    metrics: dict[str, Any] = {
        "devices": len(contributions), "tokens": tokens,
        "bytes_up_per_device": max((c.bytes_sent for c in contributions), default=0),
        "train_loss": (sum(l * c.num_tokens for l, c in zip(losses, contributions)) / tokens  # type: ignore[operator]
                       if tokens and all(l is not None for l in losses) else None),
        **diag,
    }
    if privacy is not None:
        if plan is None:
            raise ValueError("commit under DP needs the round's privacy plan (plan=...)")
        estimate = None
        if plan.adaptive_clip:
            bits = pipeline.split_secure(secure_total, plan)[1] if secure_total is not None else None
            centred = bits if bits is not None else pipeline.bit_sum([c.clip_bit for c in contributions], plan)
            estimate = pipeline.clip_estimate(centred, plan)
        metrics.update({"clip_norm": privacy.clip.clip_norm, "unclipped_fraction": estimate})
        privacy = privacy.after_round(plan, len(contributions), estimate, sample_rate,
                                      dim=sum(t.numel() for t in mean.values()))
        metrics.update(privacy.epsilons())  # an unbounded epsilon is None
    return Outcome(new_state, privacy, metrics)


def not_finite(parts: dict[str, AdapterState]) -> str | None:
    """The first part (by name) holding NaN or Inf, e.g. "adapter (tensor 'x')", else None."""
    for name, tensors in parts.items():
        for k, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                return f"{name} (tensor {k!r})"
    return None


def failed(state: ServerState, reason: str) -> Outcome:
    """A simulated round that failed (`RoundFailed`): the adapter stays and the round counts as
    run, as one nobody finished; nothing is released, so the accountant does not step."""
    return Outcome(replace(state, round=state.round + 1), None, {"skipped": True, "failed": reason})


def skip(state: ServerState) -> Outcome:
    """A round nobody finished: the global adapter stays, the round counts as run."""
    return Outcome(replace(state, round=state.round + 1), None, {"skipped": True})


# ---- stop ----------------------------------------------------------------------------------------
def budget_stop(privacy: PrivacyRun | None) -> str | None:
    """Why no further round may run under the privacy budget, or None: one more round at the nominal
    z and q would spend more of the recipients' epsilon than privacy.target_epsilon."""
    if privacy is None or accountant.preview(privacy.ledger) < privacy.ledger.epsilon_budget:
        return None
    led = privacy.ledger
    return (f"the privacy budget is spent: epsilon (against the model's recipients) {led.epsilon_spent:.3f} "
            f"after {led.rounds_done} rounds; "
            f"one more round would pass privacy.target_epsilon={led.epsilon_budget:g} at delta={led.delta:g}")


def stop_reason(rounds_applied: int, cfg: RunConfig, privacy: PrivacyRun | None) -> str | None:
    if rounds_applied >= cfg.sim.rounds:
        return f"training is finished ({cfg.sim.rounds} rounds)"
    return budget_stop(privacy)
