"""The round engine: one federated round's logic, written once. Pure: no I/O, time is passed in.

    cohort    `sample_cohort` (simulation), `cohort_target` + `admits` (deployment check-ins)
    plan      `round_plan`: the privacy plan (C, z, n, mode, codec) every task of the round carries
    collect   `decode_upload`: a device's upload checked against the adapter schema and the codec
    decide    `decide`: wait, commit (goal reached, or the deadline with a quorum) or abort
    aggregate `aggregate`: the server half of the privacy pipeline over what was collected
    commit    `commit`: the strategy's step, the accountant's step, the round's metrics
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
from pocketfed.config import Codec, RunConfig
from pocketfed.model import rank as rank_ops
from pocketfed.privacy import accountant, pipeline, secagg
from pocketfed.privacy.budget import PrivacyRun
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import hetero, sampling, strategies
from pocketfed.server.strategies import ServerState

AdapterState = dict[str, torch.Tensor]
CODEC_DTYPES = {Codec.float32: {"float32"}, Codec.float16: {"float16"}, Codec.int8: {"int8", "float32"}}


class InvalidUpload(ValueError):
    """An upload that is not an update of the round's schema under its codec."""


@dataclass(frozen=True)
class Contribution:
    """One device's collected upload: decoded (None when it went into a secure sum), its training
    tokens, the bytes it sent, its adaptive-clipping bit and its scalar metrics."""

    device_id: str
    update: AdapterState | None
    num_tokens: int
    bytes_sent: int
    unclipped: bool = True
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


# ---- cohort --------------------------------------------------------------------------------------
def sample_cohort(pool: list[str], per_round: int, seed: int, round_idx: int) -> list[str]:
    """The simulator's cohort: a uniform sample without replacement, reproducible per (seed, round)."""
    return sampling.sample_round(pool, per_round, seed, round_idx)


def cohort_target(goal: int, overselect: float) -> int:
    """How many devices a deployment round assigns: ceil(goal * overselect), so that dropouts
    still leave the goal."""
    return math.ceil(goal * overselect - 1e-9)


def admits(assigned: int, target: int) -> bool:
    """Whether a deployment round takes one more eligible device that checks in (first come)."""
    return assigned < target


# ---- collect -------------------------------------------------------------------------------------
def decode_upload(payload: bytes, like: AdapterState, plan: PrivacyPlan) -> AdapterState:
    """The update in `payload`, checked: exactly the adapter's names and shapes, finite values
    (`codec.decode`), and only the dtypes of the round's codec."""
    try:
        update = codec.decode(payload, like)
        dtypes = {str(t.dtype).removeprefix("torch.") for t in st_load(payload).values()}
    except codec.PayloadError as e:
        raise InvalidUpload(str(e)) from None
    allowed = CODEC_DTYPES[plan.codec]
    if not dtypes <= allowed:
        raise InvalidUpload(f"update dtypes {sorted(dtypes)} do not match the codec {plan.codec.value} ({sorted(allowed)})")
    return update


def collect_in_memory(results: list[TrainResult], plan: PrivacyPlan, like: AdapterState, round_id: int,
                      ranks: dict[str, int] | None = None) -> tuple[list[Contribution], np.ndarray | None]:
    """The simulator's collection: each device's upload decoded as the coordinator decodes it, or,
    under secure aggregation, every party of the protocol run in this process (`secagg.simulate_round`)
    with the sum as the only server-side output. -> (contributions in device-id order, secure sum)."""
    results = sorted(results, key=lambda x: x.device_id)
    total, sent = None, {}
    if plan.secagg:
        vectors = [x.upload.vector for x in results if x.upload is not None and x.upload.vector is not None]
        if len(vectors) != len(results):
            raise ValueError("under secure aggregation every result must carry its pipeline's vector")
        outcome = secagg.simulate_round(vectors, clip_norm=plan.upload_bound(len(vectors[0])), frac_bits=plan.frac_bits,
                                        round_id=round_id, neighbours=plan.secagg_degree or None)
        total, sent = outcome.total, outcome.device_bytes_sent
    contributions = []
    for i, x in enumerate(results):
        assert x.upload is not None, "the device task runs the privacy pipeline"
        update = None if plan.secagg else decode_upload(x.upload.payload or b"", like, plan)
        contributions.append(Contribution(
            x.device_id, update, x.num_tokens, sent[i] if plan.secagg else len(x.upload.payload or b""),
            x.upload.unclipped, x.metrics.get("train_loss"), (ranks or {}).get(x.device_id, 0)))
    return contributions, total


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
              secure_total: np.ndarray | None = None) -> AdapterState:
    """The round's mean update Delta: the server half of the privacy pipeline over the decoded
    uploads (or over the secure sum), zero-padded ranks renormalized per slot when nothing private
    forbids it (`pocketfed.server.hetero`)."""
    n = len(contributions)
    if n == 0:
        raise ValueError("cannot aggregate a round without contributions")
    if secure_total is not None:
        return pipeline.finish(secure_total, plan, n, like)
    updates = [c.update for c in contributions]
    if any(u is None for u in updates):
        raise ValueError("a contribution without its decoded update needs the secure sum")
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
           cfg: RunConfig) -> Outcome:
    """Apply Delta through the strategy, step the accountant (one round of Poisson-sampled Gaussian
    mechanism; adaptive clipping moves C), and report the round."""
    new_state, diag = strategies.apply_mean(state, mean, cfg.server)
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
        unclipped = sum(1 for c in contributions if c.unclipped)
        metrics.update({"clip_norm": privacy.clip.clip_norm, "unclipped": unclipped})
        privacy = privacy.after_round(unclipped, len(contributions), cfg.privacy.adaptive_clip)
        metrics.update({"epsilon": privacy.ledger.epsilon_spent, "delta": privacy.ledger.delta})
    return Outcome(new_state, privacy, metrics)


def skip(state: ServerState) -> Outcome:
    """A round nobody finished: the global adapter stays, the round counts as run."""
    return Outcome(replace(state, round=state.round + 1), None, {"skipped": True})


# ---- stop ----------------------------------------------------------------------------------------
def budget_stop(privacy: PrivacyRun | None) -> str | None:
    """Why no further round may run under the privacy budget, or None: one more round would
    spend more than privacy.target_epsilon."""
    if privacy is None or not accountant.budget_exhausted(accountant.step(privacy.ledger)):
        return None
    led = privacy.ledger
    return (f"the privacy budget is spent: epsilon {led.epsilon_spent:.3f} after {led.rounds_done} rounds; "
            f"one more round would pass privacy.target_epsilon={led.epsilon_budget:g} at delta={led.delta:g}")


def stop_reason(rounds_applied: int, cfg: RunConfig, privacy: PrivacyRun | None) -> str | None:
    if rounds_applied >= cfg.sim.rounds:
        return f"training is finished ({cfg.sim.rounds} rounds)"
    return budget_stop(privacy)
