"""The on-device trainer: local LoRA fine-tuning from a global adapter, in small pure steps.

    init_from_global -> train_steps -> finalize (update = trained - global)

Local objective (FedProx, Li et al. 2020, "Federated Optimization in Heterogeneous Networks"):
    min_w  L_k(w) + (mu / 2) * ||w - w_global||^2      (mu = 0 is plain FedAvg local SGD)
optimized with AdamW and gradient-norm clipping. The same code runs in the simulator, on a Ray
worker and in the real device process. Deterministic under a seed: the seed fixes the data order
(and LoRA dropout, if any); on CPU the same seed gives the same bits.
"""

from __future__ import annotations

import math
import time

import torch
from peft import PeftModel

from pocketfed.config import TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.model import lora
from pocketfed.protocol.messages import TrainResult, TrainTask


def num_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.steps > 0:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))


def batches(n_rows: int, batch_size: int, steps: int, generator: torch.Generator):
    """Row indices for each step: shuffled epochs, reshuffled when one runs out."""
    order = torch.randperm(n_rows, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n_rows and pos > 0:
            order, pos = torch.randperm(n_rows, generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        yield idx


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (unmasked) tokens. ids, mask: [B, T]."""
    if bool(mask.all()):  # full rows (the common case): no mask lets attention take its fast causal path
        return model(input_ids=ids, labels=ids).loss
    labels = ids.masked_fill(~mask, -100)
    return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss


def train_steps(
    model: PeftModel,
    global_state: lora.AdapterState,
    data: Blocks,
    cfg: TrainConfig,
    seed: int,
    steps: int | None = None,
) -> tuple[int, dict[str, float]]:
    """Run local steps in place on `model` (already holding `global_state`). -> (tokens, metrics)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchors = [global_state_param(global_state, n) for n in params] if cfg.prox_mu > 0 else []
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_steps = steps if steps is not None else num_steps(cfg, len(data))
    tokens, loss_sum = 0, 0.0
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # LoRA dropout, when configured
        for idx in batches(len(data), cfg.batch_size, n_steps, gen):
            ids, mask = data.input_ids[idx], data.mask[idx]
            loss = lm_loss(model, ids, mask)
            loss_sum += loss.item()
            if cfg.prox_mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params.values(), anchors))
                loss = loss + 0.5 * cfg.prox_mu * prox
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
    model.eval()
    return tokens, {"train_loss": loss_sum / max(1, n_steps), "steps": float(n_steps)}


def global_state_param(global_state: lora.AdapterState, param_name: str) -> torch.Tensor:
    """The global value of a trainable parameter, matched by PEFT's naming.

    PEFT parameter names carry the adapter name ("...lora_A.default.weight") where the saved
    state does not ("...lora_A.weight")."""
    key = param_name.replace(".default", "")
    for k in (key, key.removeprefix("base_model.model.")):
        for cand in (k, "base_model.model." + k):
            if cand in global_state:
                return global_state[cand]
    raise KeyError(param_name)


def run_task(model: PeftModel, data: Blocks, task: TrainTask) -> TrainResult:
    """One device round: init from the global adapter, train, finalize to an update."""
    start = time.perf_counter()
    lora.set_state(model, task.global_adapter)
    tokens, metrics = train_steps(model, task.global_adapter, data, task.train, task.seed)
    update = lora.sub(lora.get_state(model), task.global_adapter)
    metrics["wall_seconds"] = time.perf_counter() - start
    return TrainResult(task.round, task.device_id, update, tokens, metrics)
