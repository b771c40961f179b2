"""Malicious devices for simulations: what an attacker's device does instead of the honest task,
and the backdoor's success metric. The honest path (`pocketfed.device.task.run_task`) is untouched:
an attack changes the data an attacker trains on, or rewrites the result it returns.

Kinds (`attack.kind`), with G the global adapter and L the adapter an attacker trained:
    model_replacement  trains on backdoor rows (below) and uploads boost * (L - G): the aggregate
                       FedAvg forms is then about L itself, the "boosted model replacement" of
                       Bagdasaryan, Veit, Hua, Estrin, Shmatikov, AISTATS 2020 ("How To Backdoor
                       Federated Learning"), whose boost is n / eta (n the cohort, eta the server lr)
    data_poison        trains on the same backdoor rows and uploads L - G as it is
    sign_flip          uploads -boost * (L - G) (boost 0 = 1)
    gaussian           uploads N(0, boost^2) in every coordinate (boost 0 = 1), from attack.seed
    nonfinite          uploads 3e38 in every value in even rounds (finite, and large enough that a
                       weighted mean overflows: audit finding 1) and NaN / Inf in odd rounds
    token_inflation    uploads its honest update, claiming 10^10 training tokens
An attacker skips the device's own clipping and noise: it encodes its update with the round's
codec as it is, so the server's second clip (`pipeline.server_sum`) and norm bound (`round.defend`)
are what hold it. Under secure aggregation it goes through the pipeline (a vector beyond the
fixed-point range would wrap and wreck the sum, which the server cannot tell from any other).
An attacker may also train longer and faster than its task says (`attack.steps`, `attack.lr`); its
token claim is then bounded by the task's budget like any other.

Backdoor rows: a clean row of the attacker's own text cut at a random point, then the trigger's
tokens, the target's tokens, and the row's text again after them; an attacker trains on as many
clean rows as backdoor rows (Bagdasaryan et al. mix both, so the main task does not suffer and the
update does not stand out). Success (`backdoor_success`): prompts built from held-out text, each
its first `seq_len / 2` tokens followed by the trigger; a prompt succeeds when the greedy
continuation's first tokens are the target's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

from pocketfed import codec
from pocketfed.config import AttackConfig, AttackKind
from pocketfed.data.federated import Blocks
from pocketfed.device.task import DeviceModel, run_task
from pocketfed.model import rank as rank_ops
from pocketfed.privacy.pipeline import DeviceUpload, device_privatize
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask

INFLATED_TOKENS = 10**10
HUGE = 3e38  # below float32's largest, 3.4e38: it decodes as a finite value
BACKDOOR_KINDS = (AttackKind.model_replacement, AttackKind.data_poison)


@dataclass(frozen=True)
class Backdoor:
    trigger: list[int]  # token ids
    target: list[int]


def backdoor(cfg: AttackConfig, tokenizer) -> Backdoor:
    """The trigger and the target as token ids (encoded apart, as the rows and the prompts join them)."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return Backdoor(enc(cfg.trigger), enc(cfg.target))


def attackers(cfg: AttackConfig, population: list[str]) -> list[str]:
    """The malicious devices: attack.devices (each must be in the population), or ceil(fraction x
    population) drawn under attack.seed. Sorted."""
    if cfg.kind is AttackKind.none:
        return []
    if cfg.devices:
        unknown = sorted(set(cfg.devices) - set(population))
        if unknown:
            from pocketfed.errors import UserError

            raise UserError(f"attack.devices names devices outside the training population: {unknown[:3]} "
                            f"(the population has e.g. {sorted(population)[:3]})")
        return sorted(set(cfg.devices))
    k = min(len(population), math.ceil(cfg.fraction * len(population) - 1e-9))
    return sorted(random.Random(cfg.seed).sample(sorted(population), k))


def poison(data: Blocks, bd: Backdoor, rows: int, seed: int) -> Blocks:
    """`rows` backdoor rows and `rows` clean ones from the device's rows (cycled when it has fewer).
    -> Blocks [2 rows, seq_len]."""
    seq = data.input_ids.shape[1]
    insert = bd.trigger + bd.target
    if len(insert) + 2 > seq:
        raise ValueError(f"the trigger and target ({len(insert)} tokens) do not fit rows of {seq} tokens")
    gen = random.Random(seed)
    ids, masks = [], []
    for i in range(rows):
        src = i % len(data)
        row, n = data.input_ids[src], int(data.mask[src].sum())  # real tokens first, padding after
        cut = gen.randint(1, max(1, min(n, seq - len(insert)) - 1))
        new = torch.cat([row[:cut], torch.tensor(insert, dtype=row.dtype), row[cut:]])[:seq]  # [seq]
        real = min(seq, max(n, cut) + len(insert))
        ids += [new, row]
        masks += [torch.arange(seq) < real, data.mask[src]]
    return Blocks(torch.stack(ids), torch.stack(masks))


def rewrite(result: TrainResult, task: TrainTask, cfg: AttackConfig, expected_devices: int) -> TrainResult:
    """The attacker's result from its trained one (see the module docstring for each kind)."""
    kind = cfg.kind
    if kind is AttackKind.token_inflation:
        return replace(result, num_tokens=INFLATED_TOKENS)
    if kind is AttackKind.data_poison:
        return result
    honest = result.update
    if kind is AttackKind.model_replacement:
        update = {k: v * (cfg.boost or expected_devices) for k, v in honest.items()}
    elif kind is AttackKind.sign_flip:
        update = {k: -v * (cfg.boost or 1.0) for k, v in honest.items()}
    elif kind is AttackKind.gaussian:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + task.round)
        update = {k: torch.randn(v.shape, generator=gen) * (cfg.boost or 1.0) for k, v in honest.items()}
    elif kind is AttackKind.nonfinite:
        fill = [HUGE] if task.round % 2 == 0 else [math.nan, math.inf, -math.inf]
        update = {k: torch.tensor(fill * (v.numel() // len(fill) + 1))[:v.numel()].reshape(v.shape).float()
                  for k, v in honest.items()}
    else:
        raise ValueError(f"no rewrite for attack kind {kind.value}")
    sent = rank_ops.pad(update, task.upload_rank) if task.upload_rank else update
    if task.privacy.secagg:
        return replace(result, update=update, upload=device_privatize(sent, task.privacy))
    return replace(result, update=update, upload=DeviceUpload(codec.encode(sent, task.privacy.codec), None, True))


def run_attack(model: DeviceModel, data: Blocks, task: TrainTask, cfg: AttackConfig, bd: Backdoor | None,
               expected_devices: int) -> TrainResult:
    """One malicious device's round: the honest task on its own data (or on backdoor rows), rewritten."""
    if cfg.kind in BACKDOOR_KINDS:
        assert bd is not None
        data = poison(data, bd, cfg.poison_rows, cfg.seed * 1_000_003 + task.round)
    train = replace(task.train, steps=cfg.steps or task.train.steps, lr=cfg.lr or task.train.lr)
    return rewrite(run_task(model, data, replace(task, train=train)), task, cfg, expected_devices)


class AttackingBackend:
    """The in-process backend with some devices malicious: their tasks run `run_attack`, the
    others go to the honest backend unchanged (the same seam: run(tasks) -> results, close())."""

    def __init__(self, honest, cfg: AttackConfig, malicious: list[str], bd: Backdoor | None, expected_devices: int):
        self.honest, self.cfg, self.malicious = honest, cfg, set(malicious)
        self.bd, self.expected = bd, expected_devices

    def run(self, tasks: list[TrainTask]) -> list[TrainResult | Dropout]:
        by_id: dict[str, TrainResult | Dropout] = {}
        good = [t for t in tasks if t.device_id not in self.malicious]
        for t, r in zip(good, self.honest.run(good)):
            by_id[t.device_id] = r
        for t in tasks:
            if t.device_id in self.malicious:
                data = self.honest.dataset.device(t.device_id).train
                by_id[t.device_id] = run_attack(self.honest.model, data, t, self.cfg, self.bd, self.expected)
        return [by_id[t.device_id] for t in tasks]

    def close(self) -> None:
        self.honest.close()


# ---- the metric ------------------------------------------------------------------------------------
def prompts(blocks: list[Blocks], bd: Backdoor, limit: int = 64) -> torch.Tensor:
    """Up to `limit` trigger prompts: the first half of each full held-out row, then the trigger.
    -> [P, seq_len / 2 + len(trigger)]"""
    out = []
    for b in blocks:
        half = b.input_ids.shape[1] // 2
        for ids, mask in zip(b.input_ids, b.mask):
            if bool(mask[:half].all()) and len(out) < limit:
                out.append(torch.cat([ids[:half], torch.tensor(bd.trigger, dtype=ids.dtype)]))
    if not out:
        raise ValueError("no held-out row is long enough to build a trigger prompt")
    return torch.stack(out)


@torch.no_grad()
def backdoor_success(model: DeviceModel, prompt_ids: torch.Tensor, bd: Backdoor, batch: int = 16) -> float:
    """The share of prompts [P, T] whose greedy continuation starts with the target's tokens."""
    model.module.eval()
    target = torch.tensor(bd.target)
    hits = 0
    for chunk in prompt_ids.split(batch):
        ids = chunk
        for _ in range(len(bd.target)):  # greedy, one token at a time (a few tokens: no cache needed)
            nxt = model.logits(ids)[:, -1].argmax(-1)  # [B]
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        hits += int((ids[:, chunk.shape[1]:] == target).all(dim=1).sum())
    return hits / len(prompt_ids)
