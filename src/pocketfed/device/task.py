"""The device task: one round on one device, written once for the simulator's virtual devices, the
Ray workers and the real device process (`pocketfed.device.agent`).

    model  = load_model(folder, plan, alpha, seed)      once; the caller keeps it across rounds
             or wrap_peft(peft_model)                   the simulator's shared in-memory model
    result = run_task(model, data, task)
             adapter <- task.global_adapter
             train (the one loop, below)
             update = adapter - global                                 (result.update, kept on the device)
             upload = device_privatize(pad(update, task.upload_rank), task.privacy)   (result.upload)

The loop (`train`). Local objective (FedProx, Li et al. 2020, "Federated Optimization in
Heterogeneous Networks"), w the adapter, w_0 the adapter it starts from (the global one):
    min_w  L_k(w) + (mu / 2) ||w - w_0||^2          (mu = 0: plain FedAvg local training)
Each step takes a batch of rows in an order fixed by the seed (shuffled epochs, reshuffled when
one runs out) and splits it into micro-batches: the plan's, or train.micro_tokens' worth of rows
where the model has no plan (`micro_rows`). Micro-batch j's mean loss L_j over
its n_j target tokens is weighted by n_j / n (n: the batch's target tokens) and backpropagated;
the gradients accumulate to those of the batch's mean loss sum_j (n_j / n) L_j. The proximal
term's gradient is added once, the gradient norm clipped to max_grad_norm, then one AdamW step
(Loshchilov & Hutter 2019; `leanmodel.AdamW`, torch's update without torch.optim's imports).
Deterministic under a seed: the seed fixes the data order (and LoRA dropout, if any); on CPU the
same seed gives the same bits.

Backends (`planner.Backend`; the planner picks one from the device's profile): the lean Llama
(torch only; fp32, bf16 or int8 base, checkpointing) or transformers + PEFT. Both key the
adapter as `pocketfed.model.lora.get_state` does, so their updates aggregate together. This
module imports neither transformers nor PEFT unless the PEFT backend is asked for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import Blocks
from pocketfed.device import leanmodel
from pocketfed.device.lowmem import Precision
from pocketfed.device.planner import Backend, Plan
from pocketfed.model import rank as rank_ops
from pocketfed.privacy.pipeline import device_privatize
from pocketfed.protocol.messages import TrainResult, TrainTask

AdapterState = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) [B, T] -> mean loss over targets


@dataclass
class DeviceModel:
    """A frozen base with LoRA, as the loop sees it: the trainable adapter tensors keyed as the
    adapter state, a loss, and the micro-batch its plan allows (0 = the whole batch at once)."""

    module: nn.Module
    backend: Backend
    params: dict[str, nn.Parameter]  # float32 LoRA weights, keyed like `lora.get_state`
    loss: LossFn
    micro_batch: int = 0

    def get_state(self) -> AdapterState:
        """A detached float32 copy of the adapter."""
        return {k: p.detach().float().clone() for k, p in self.params.items()}

    def set_state(self, state: AdapterState) -> None:
        """Load an adapter state in place; the key sets must match exactly."""
        if set(state) != set(self.params):
            raise ValueError(f"adapter keys do not match the model (missing {sorted(set(self.params) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(self.params))[:3]})")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])

    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, V] of rows ids [B, T]; mask [B, T] (True = real token), None = all real."""
        if self.backend is Backend.lean:
            return self.module(ids, mask)
        return self.module(input_ids=ids, attention_mask=None if mask is None else mask.long()).logits


# ---- the backends -------------------------------------------------------------------------------


def peft_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (unmasked) targets of a transformers model. ids, mask: [B, T]."""
    if bool(mask.all()):  # full rows (the common case): no mask lets attention take its fast causal path
        return model(input_ids=ids, labels=ids).loss
    labels = ids.masked_fill(~mask, -100)
    return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss


def wrap_peft(model: nn.Module, micro_batch: int = 0) -> DeviceModel:
    """A PEFT-wrapped transformers model (e.g. the simulator's shared one) as a DeviceModel."""
    from peft import get_peft_model_state_dict

    # PEFT names parameters with the adapter ("...lora_A.default.weight"); its state does not
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    expected = set(get_peft_model_state_dict(model))
    if set(params) != expected:
        raise ValueError(f"trainable parameters of the PEFT model are not its adapter state: "
                         f"{sorted(set(params) ^ expected)[:3]}")
    return DeviceModel(model, Backend.peft, params, lambda ids, mask: peft_loss(model, ids, mask), micro_batch)


def wrap_lean(model: leanmodel.LeanLlama, micro_batch: int = 0) -> DeviceModel:
    """A lean Llama with LoRA attached (`leanmodel.attach_lora`) as a DeviceModel."""
    params = {leanmodel.PEFT_PREFIX + n: p for n, p in model.named_parameters() if p.requires_grad}
    return DeviceModel(model, Backend.lean, params, model.loss, micro_batch)


def load_model(folder: Path, plan: Plan, alpha: float, seed: int, dropout: float = 0.0) -> DeviceModel:
    """The base of `folder` under `plan` (backend, precision, checkpointing) with LoRA at the plan's
    rank and targets on its top `plan.layers` layers (0 = all); A drawn under `seed` (as `lora.attach` draws it; the global adapter overwrites it)."""
    if plan.backend is Backend.peft:
        from pocketfed.device.lowmem import load_frozen
        from pocketfed.model import lora

        base = load_frozen(folder, plan.precision)
        if plan.checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = LoraConfig(rank=plan.rank, alpha=alpha, dropout=dropout, target_modules=list(plan.target_modules),
                          layers=plan.layers)
        return wrap_peft(lora.attach(base, lcfg, seed), plan.micro_batch)
    lean = leanmodel.load(folder, plan.precision)
    lean.checkpointing, lean.keep_rebuilt = plan.checkpointing, plan.keep_rebuilt
    leanmodel.attach_lora(lean, plan.rank, alpha, plan.target_modules, seed, dropout, plan.layers)
    return wrap_lean(lean, plan.micro_batch)


def warm_up(targets: tuple[str, ...]) -> None:
    """One training step of the lean loop on a one-layer random model of a few kB (int8 base,
    checkpointing: the smallest plans'), so that the torch code a round runs is resident. A device process
    that released torch's code pages (fault-around had mapped whatever the page cache held) calls this
    before measuring the runtime its plan sits on: the measurement then holds the code training needs
    and no more, whatever other processes keep cached."""
    import json
    import tempfile

    from safetensors.torch import save_file

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": True,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu"}
    with tempfile.TemporaryDirectory(prefix="pocketfed-warm-up-") as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config))
        with torch.device("meta"):  # shapes only: no initializer's code is faulted in for nothing
            shapes = leanmodel.LeanLlama(leanmodel.LeanConfig.from_folder(folder)).state_dict()
        g = torch.Generator().manual_seed(0)
        save_file({k: torch.rand(tuple(v.shape), generator=g) * 0.1 for k, v in shapes.items()}, folder / "model.safetensors")
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))  # [B=2, T=8]
        plan = Plan("warm-up", Precision.int8, 2, targets, 1, 2, 8, True, {}, math.inf, Backend.lean, keep_rebuilt=True)
        train(load_model(folder, plan, 4.0, seed=0), Blocks(ids, torch.ones_like(ids, dtype=torch.bool)),
              TrainConfig(steps=1, batch_size=2), seed=0)


def reference_plan(lora: LoraConfig, train: TrainConfig, seq_len: int, backend: Backend = Backend.lean) -> Plan:
    """No budget: fp32 base, the configured rank, the whole batch at once, no checkpointing."""
    return Plan("none", Precision.fp32, lora.rank, tuple(lora.target_modules), train.batch_size, 1, seq_len,
                False, {}, float("inf"), backend, layers=lora.layers)


# ---- the loop -----------------------------------------------------------------------------------


def num_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.steps > 0:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))


def batches(n_rows: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices for each step: shuffled epochs, reshuffled when one runs out."""
    order = torch.randperm(n_rows, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n_rows and pos > 0:
            order, pos = torch.randperm(n_rows, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def micro_rows(cfg: TrainConfig, seq_len: int) -> int:
    """Rows per micro-batch where the model's plan sets none: cfg.micro_tokens' worth (at least one
    row), or the whole batch (micro_tokens 0)."""
    return max(1, cfg.micro_tokens // seq_len) if cfg.micro_tokens else cfg.batch_size


def train(model: DeviceModel, data: Blocks, cfg: TrainConfig, seed: int,
          steps: int | None = None) -> tuple[int, dict[str, float]]:
    """Local steps in place on `model`, from the adapter it holds (w_0). -> (tokens trained on, metrics)."""
    params = list(model.params.values())
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    opt = leanmodel.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_steps = steps if steps is not None else num_steps(cfg, len(data))
    micro = model.micro_batch or micro_rows(cfg, data.input_ids.shape[1])
    tokens, loss_sum = 0, 0.0
    model.module.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # LoRA dropout, when configured
        for idx in batches(len(data), cfg.batch_size, n_steps, gen):
            n = int(data.mask[idx, 1:].sum())  # the batch's target tokens
            for rows in idx.split(micro):  # [micro] row indices
                ids, mask = data.input_ids[rows], data.mask[rows]
                n_j = int(mask[:, 1:].sum())
                if n_j == 0:  # no target in these rows: nothing to learn (and a 0 / 0 loss)
                    continue
                loss = model.loss(ids, mask)
                if n_j != n:
                    loss = loss * (n_j / n)
                loss.backward()
                loss_sum += loss.item()
                tokens += int(mask.sum())
            if cfg.prox_mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                (0.5 * cfg.prox_mu * prox).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad()
    model.module.eval()
    return tokens, {"train_loss": loss_sum / max(1, n_steps), "steps": float(n_steps)}


def run_task(model: DeviceModel, data: Blocks, task: TrainTask) -> TrainResult:
    """One device round: init from the global adapter, train, finalize to an update, privatize and encode."""
    start = time.perf_counter()
    model.set_state(task.global_adapter)
    tokens, metrics = train(model, data, task.train, task.seed)
    update = {k: v - task.global_adapter[k] for k, v in model.get_state().items()}
    sent = rank_ops.pad(update, task.upload_rank) if task.upload_rank else update  # HetLoRA: the global rank
    upload = device_privatize(sent, task.privacy)
    metrics["wall_seconds"] = time.perf_counter() - start
    return TrainResult(task.round, task.device_id, update, tokens, metrics, upload)
