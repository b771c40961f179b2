"""A device's side of federated evaluation (`pocketfed.server.evaluations`): score the release it
was sent on its own test split and report four sums, through the egress ledger first.

    sums   = score(model, test, T)       the first T predicted positions of the test split, in row
                                         order: capped -log p, count, top-1 and top-3 hits
                                         (`pocketfed.protocol.fedeval`, `evaluation.score_logits`)
    report in the clear: ledger kind "eval_report" -> POST /v1/evaluations/{id}/report
           under secure aggregation: r / T as a 4-value vector through the five stages
           (`secure_upload`, ledger kind "masked_eval_report"): the server learns only the sum

Nothing else leaves: no per-token values, no text, no counts of the training split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from pocketfed.data.federated import Blocks
from pocketfed.device import http_client as http
from pocketfed.device import ledger
from pocketfed.device.floors import PrivacyFloors
from pocketfed.device.planner import Backend
from pocketfed.device.secure_upload import secure_upload
from pocketfed.device.task import DeviceModel
from pocketfed.evaluation import Totals, score_logits
from pocketfed.protocol import fedeval, wire

Emit = Callable[[str, dict[str, Any]], None]


def _logits(model: DeviceModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of either backend (full rows take the causal fast path: no mask)."""
    full = bool(mask.all())
    if model.backend is Backend.lean:
        return model.module(ids, None if full else mask)
    return model.module(input_ids=ids, attention_mask=None if full else mask.long()).logits


@torch.inference_mode()
def score(model: DeviceModel, data: Blocks, max_tokens: int) -> fedeval.Sums:
    """The report of `model` (holding the release's adapter) on `data`: at most `max_tokens`
    positions. One row at a time: the [T, V] logits of one row are all a small device holds."""
    model.module.eval()
    totals = Totals()
    for i in range(len(data)):
        if totals.n >= max_tokens:
            break
        ids, mask = data.input_ids[i : i + 1], data.mask[i : i + 1]  # [1, T]
        totals.add(score_logits(_logits(model, ids, mask), ids, mask, nll_cap=fedeval.NLL_CAP,
                                max_positions=max_tokens - totals.n))
    return fedeval.Sums(totals.nll, totals.n, totals.hit1, totals.hit3)


def refusal(floors: PrivacyFloors) -> str | None:
    """Why this device refuses an evaluation task, or None: a report carries no DP noise (its
    totals are released outside the accountant, docs/PRIVACY.md), so a device that requires DP
    (--require-dp) sends none."""
    if floors.require_dp:
        return "an evaluation report carries no differential-privacy noise and this device requires DP"
    return None


def run_evaluation(client: http.DeviceClient, call: Callable[..., Any], home: Path, server: str, task: wire.TaskSpec,
                   model: DeviceModel, test: Blocks, emit: Emit) -> fedeval.Sums:
    """Score the release `model` holds and send the report (raises what `secure_upload` or the
    client raises when the evaluation leaves this device behind or the server refuses)."""
    assert task.evaluate is not None
    cap = task.evaluate.max_tokens
    sums = fedeval.check(score(model, test, cap), cap)
    if task.privacy is not None and task.privacy.secagg:  # only the sum of r / T is ever unmasked
        secure_upload(client, call, home, server, task, fedeval.secure_vector(sums, cap), {}, 0, emit,
                      bound=fedeval.BOUND, kind=ledger.MASKED_EVAL_REPORT)
    else:
        body = ledger.check_and_record(home, server, ledger.EVAL_REPORT, {
            "loss_sum": sums.loss_sum, "tokens": int(sums.tokens), "top1_hits": int(sums.top1_hits),
            "top3_hits": int(sums.top3_hits)}, {})
        call(client.eval_report, task.round_id, body)
    emit("evaluated", {"round": task.round_index, "round_id": task.round_id, "tokens": int(sums.tokens)})
    return sums
