"""Language-model metrics: token perplexity and next-token top-1 / top-3 accuracy.

Over all real next-token positions t (both token t and t+1 unmasked):
    perplexity = exp( sum_t -log p(x_{t+1} | x_<=t) / N )
    top-k      = (1/N) * #{t : x_{t+1} is among the k most likely tokens}   (k = 3: a keyboard's row)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pocketfed.data.federated import Blocks

if TYPE_CHECKING:
    from pocketfed.device.task import DeviceModel


@dataclass(frozen=True)
class Metrics:
    perplexity: float
    top1: float
    top3: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Totals:
    nll: float = 0.0
    hit1: int = 0
    hit3: int = 0
    n: int = 0

    def add(self, other: "Totals") -> None:
        self.nll += other.nll
        self.hit1 += other.hit1
        self.hit3 += other.hit3
        self.n += other.n

    def metrics(self) -> Metrics:
        if self.n == 0:
            return Metrics(float("nan"), float("nan"), float("nan"), 0)
        return Metrics(math.exp(self.nll / self.n), self.hit1 / self.n, self.hit3 / self.n, self.n)


def score_logits(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, nll_cap: float = math.inf,
                 max_positions: int | None = None) -> Totals:
    """logits: [B, T, V]; ids, mask: [B, T]. Scores predictions of positions 1..T-1: each token's
    -log p capped at `nll_cap`, and only the first `max_positions` valid ones in row order (None:
    all); federated evaluation uses both so that a device's report has a bound."""
    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    valid = mask[:, 1:] & mask[:, :-1]
    if max_positions is not None:  # keep the first max_positions valid positions, rows in order
        valid = valid & (valid.reshape(-1).cumsum(0) <= max_positions).reshape(valid.shape)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").clamp(max=nll_cap)
    top3 = pred.topk(3, dim=-1).indices  # [B, T-1, 3]
    hits = top3 == target.unsqueeze(-1)
    v = valid.reshape(-1)
    return Totals(
        nll=float(nll[v].double().sum()),
        hit1=int(hits[..., 0][valid].sum()),
        hit3=int(hits.any(-1)[valid].sum()),
        n=int(v.sum()),
    )


@torch.inference_mode()
def evaluate(model: DeviceModel, blocks: list[Blocks], batch_size: int = 8, max_tokens: int = 0) -> Metrics:
    """Metrics pooled over every token of every split in `blocks` (each capped at `max_tokens`)."""
    totals = Totals()
    for b in blocks:
        rows = len(b)
        if max_tokens:
            rows = min(rows, math.ceil(max_tokens / b.input_ids.shape[1]))
        for i in range(0, rows, batch_size):
            ids, mask = b.input_ids[i : min(i + batch_size, rows)], b.mask[i : min(i + batch_size, rows)]
            logits = model.logits(ids, None if bool(mask.all()) else mask)
            totals.add(score_logits(logits, ids, mask))
    return totals.metrics()
