"""`pocketfed simulate`: federated LoRA fine-tuning of N virtual devices, end to end.

One readable flow: set-up -> rounds (sample -> tasks -> backend -> aggregate -> evaluate ->
checkpoint) -> final evaluation of the five variants -> outputs (adapter/, metrics.jsonl,
summary.json, report.png).

Variants (all scored on the training devices' own test splits; those with one global model also
on held-out devices that were never sampled for training):
    base          no fine-tuning
    federated     the final global adapter
    personalized  the global adapter + up to eval.personalize_steps local steps on the device's train
                  split, kept only if it beats the global adapter on a local validation split (as a
                  real device decides: `pocketfed.per_device`); summary.json's `per_device` holds
                  base / federated / personalized per trained device, `personalization` the share made worse
    local_only    the same local steps from the base model alone (what a device gets without us)
    centralized   all training devices' train splits pooled, trained as one (the upper bound)
"""

from __future__ import annotations

import math
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from pocketfed import attack as attack_mod
from pocketfed.files import write_atomic
from pocketfed.memory import allocator, release_free_memory
from pocketfed.config import RunConfig, to_dict
from pocketfed.data.federated import Blocks, load_dataset
from pocketfed.device import fleet as fleet_mod
from pocketfed.device.trainer import train_steps
from pocketfed.errors import UserError
from pocketfed.evaluation import Metrics, evaluate
from pocketfed.model import lora
from pocketfed.per_device import personalization_summary, personalize_or_keep
from pocketfed.privacy.budget import PrivacyRun, init_privacy
from pocketfed.server import checkpoint, strategies
from pocketfed.server import round as engine
from pocketfed.server.availability import DroppingBackend
from pocketfed.server import sampling
from pocketfed.server.sampling import device_seed, split_population
from pocketfed.transport import make_backend
from pocketfed.transport.shared import load_simulator
from pocketfed.protocol.messages import TrainResult

CHECKPOINT = "checkpoint.safetensors"


def pooled(blocks: list[Blocks]) -> Blocks:
    return Blocks(torch.cat([b.input_ids for b in blocks]), torch.cat([b.mask for b in blocks]))


@dataclass
class RunResult:
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def simulate(
    cfg: RunConfig,
    out: Path,
    resume: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    participants: list[list[str]] | None = None,
) -> RunResult:
    """`participants[r]`, when given, are round r's devices instead of `engine.sample_cohort`'s draw
    (to replay a deployment's recorded rounds through the same code)."""
    emit = on_event or (lambda kind, info: None)
    t_start = time.perf_counter()

    # ---- set-up -------------------------------------------------------------------------------
    if cfg.sim.threads:
        torch.set_num_threads(cfg.sim.threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise UserError(f"--resume: {out} holds no {CHECKPOINT} to continue from")
    if not resume and ckpt_path.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    emit("stage", {"name": "loading model"})
    # the lean Llama where it supports the model (no transformers, no PEFT), else transformers + PEFT
    sim = load_simulator(cfg.model.name, cfg.model.cache_dir, cfg.lora, cfg.sim.seed)
    model = sim.model
    init_params = model.get_state()  # the round-0 global adapter (B = 0: equals the base model)
    dataset = load_dataset(cfg.data, sim.tokenizer)
    pool, heldout = split_population(dataset.device_ids, cfg.sim.devices, cfg.sim.heldout, cfg.sim.seed)
    heldout_blocks = [dataset.device(d).test for d in heldout]
    ev = lambda blocks: evaluate(model, blocks, max_tokens=cfg.data.max_eval_tokens)  # noqa: E731

    # the expected cohort: every round samples each device independently at q = expected / population
    expected = min(cfg.sim.per_round or len(pool), len(pool))
    privacy = init_privacy(cfg, expected / len(pool), max_participations=engine.participation_bound(cfg))
    history: list[dict[str, Any]] = []
    if resume:
        state, extra = checkpoint.load(ckpt_path)
        history = extra["history"]
        if extra.get("config") != to_dict(cfg):
            raise UserError(f"--resume: the config differs from the one {out} was started with")
        privacy = PrivacyRun.from_json(extra["privacy"]) if extra.get("privacy") else privacy
    else:
        state = strategies.init(init_params, cfg.server)
        (out / "metrics.jsonl").write_text("")
    release_free_memory()  # tokenizing left free heap pages: ~95 MB for Shakespeare under SmolLM2's tokenizer
    backend = make_backend(cfg, sim, dataset, on_done=lambda d: emit("device_done", {"device": d}))
    # malicious devices (attack.kind): their tasks run `pocketfed.attack` instead of the honest task
    malicious = attack_mod.attackers(cfg.attack, pool)
    bd = attack_mod.backdoor(cfg.attack, sim.tokenizer) if malicious else None
    if malicious:
        backend = attack_mod.AttackingBackend(backend, cfg.attack, malicious, bd, expected)
        trigger_prompts = attack_mod.prompts(heldout_blocks or [dataset.device(d).test for d in pool], bd)  # type: ignore[arg-type]
    if cfg.device.dropout:
        backend = DroppingBackend(backend, cfg.device.dropout, cfg.sim.seed)
    fleet = fleet_mod.build(cfg, sim.shape, pool)  # profiles, plans (ranks); no budgets by default
    emit("setup", {"pool": len(pool), "heldout": len(heldout), "rounds": cfg.sim.rounds, "start_round": state.round})

    # ---- rounds ---------------------------------------------------------------------------------
    train_seconds = 0.0
    bytes_up = lora.num_bytes(init_params)
    for r in range(state.round, cfg.sim.rounds):
        stop = engine.budget_stop(privacy)
        if stop:
            emit("budget_spent", {"round": r, "epsilon_recipients": privacy.ledger.epsilon_spent if privacy else 0.0,
                                  "reason": stop})
            break
        t_round = time.perf_counter()
        # Poisson sampling over the devices below deploy.max_participations, keyed by (seed, round)
        frame = engine.sampling_frame(pool, {row["round"]: row["devices"] for row in history}, r,
                                      cfg.deploy.max_participations, cfg.deploy.participation_window)
        cohort = engine.sample_cohort(frame, expected, sampling.simulation_key(cfg.sim.seed, r))
        sampled = participants[r] if participants is not None else cohort.devices
        emit("round_start", {"round": r, "devices": len(sampled)})
        plan = engine.round_plan(cfg, privacy, expected)  # the fixed denominator: the expected cohort
        # eligibility filter, rank truncation, energy/time caps (all no-ops under the default device config)
        tasks, left_out = fleet_mod.prepare(fleet, cfg, r, sampled, state.params, lambda d: len(dataset.device(d).train),
                                            lambda d: device_seed(cfg.sim.seed, r, d))
        tasks = [replace(t, privacy=plan) for t in tasks]
        t_train = time.perf_counter()
        results = backend.run(tasks)  # each device: train -> privatize -> encode (the device task)
        train_seconds += time.perf_counter() - t_train
        done = [x for x in results if isinstance(x, TrainResult)]
        ranks = {d: dev.rank for d, dev in fleet.devices.items()}
        contributions, secure_total, refused = (engine.collect_in_memory(done, plan, state.params, r, ranks)
                                                if done else ([], None, []))
        defended = engine.defend(contributions, cfg.server, plan,
                                 {t.device_id: engine.token_budget(t.train, cfg.data.seq_len) for t in tasks})
        if defended.contributions:
            try:
                mean = engine.aggregate(defended.contributions, plan, state.params, secure_total,
                                        cfg.server.aggregator, cfg.server)
                outcome = engine.commit(state, privacy, defended.contributions, mean, cfg, plan=plan,
                                        secure_total=secure_total, sample_rate=cohort.sample_rate)
            except engine.RoundFailed as e:  # nothing is committed; the adapter stays
                outcome = engine.failed(state, str(e))
                emit("round_failed", {"round": r, "reason": str(e)})
        else:  # nobody sampled, eligible, left or valid: the adapter stays; the accountant counts the round
            outcome = engine.empty_round(state, privacy, plan, cohort.sample_rate)
        state, metrics = outcome.state, outcome.metrics
        bytes_up = metrics.get("bytes_up_per_device", bytes_up)
        row: dict[str, Any] = {
            "round": r,
            "devices": [x.device_id for x in done],
            "dropouts": len(results) - len(done),
            "tokens": sum(x.num_tokens for x in done),
            "local_steps": int(sum(x.metrics["steps"] for x in done)),
            "train_loss": metrics.get("train_loss"),
            "bytes_up_per_device": bytes_up,
            **{k: v for k, v in metrics.items() if k in ("update_norm", "skipped", "failed")},
            **fleet_mod.round_report(fleet, cfg, sampled, left_out, results),
        }
        row["sample_rate"] = cohort.sample_rate
        if refused or defended.clipped or defended.tokens_bounded:  # the server's defenses at work
            row["defense"] = {"refused": [{"device": x.device_id, "reason": x.reason} for x in refused],
                              "clipped": defended.clipped, "tokens_bounded": defended.tokens_bounded,
                              "norm_bound": defended.norm_bound}
        if privacy and outcome.privacy is not None:
            privacy = outcome.privacy
            row["privacy"] = {k: metrics[k] for k in ("epsilon_recipients", "epsilon_coordinator", "clip_norm",
                                                      "unclipped_fraction")}
        if cfg.eval.every_round and heldout_blocks:
            model.set_state(state.params)
            row["heldout"] = ev(heldout_blocks).as_dict()
        if malicious:
            model.set_state(state.params)
            row["attack"] = {"devices": sorted(set(malicious) & set(sampled)),
                             "backdoor_success": attack_mod.backdoor_success(model, trigger_prompts, bd)}  # type: ignore[arg-type]
        row["seconds"] = time.perf_counter() - t_round
        history.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        checkpoint.save(ckpt_path, state, {"history": history, "config": to_dict(cfg),
                                           "privacy": privacy.to_json() if privacy else None})
        emit("round_end", row)
    backend.close()

    # ---- final evaluation -----------------------------------------------------------------------
    trained = sorted({d for row in history for d in row["devices"]})
    own_test = {d: dataset.device(d).test for d in trained}
    summary: dict[str, Any] = {}
    variants = cfg.eval.variants
    steps_per_device = cfg.eval.personalize_steps

    def record(name: str, own: Metrics, held: Metrics | None) -> None:
        summary[name] = {**own.as_dict(), "heldout": held.as_dict() if held else None}
        emit("variant", {"name": name, **summary[name]})

    per_device: dict[str, dict[str, Any]] = {d: {} for d in trained}

    def each(name: str) -> Metrics:
        """The model as it stands, on each trained device's own test split (kept per device, pooled)."""
        scores = [ev([own_test[d]]) for d in trained]
        for d, m in zip(trained, scores):
            per_device[d][name] = m.as_dict()
        return _pool_metrics(scores)

    def personalized() -> Metrics:
        """Each trained device personalizes from the global adapter, or keeps it (`per_device`)."""
        scores = []
        for d in trained:
            kept, info = personalize_or_keep(model, state.params, dataset.device(d).train, cfg.train,
                                             device_seed(cfg.sim.seed, -1, f"personalized/{d}"), steps_per_device)
            model.set_state(kept)
            scores.append(ev([own_test[d]]))
            per_device[d]["personalized"] = {**scores[-1].as_dict(), **info}
            emit("device_done", {"device": d})
        return _pool_metrics(scores)

    def local_from(start: lora.AdapterState, seed_tag: str) -> Metrics:
        """Each trained device: `steps_per_device` local steps from `start`, scored on its own test split."""
        per_device: list[Metrics] = []
        for d in trained:
            model.set_state(start)
            if steps_per_device:
                train_steps(model, start, dataset.device(d).train, cfg.train,
                            device_seed(cfg.sim.seed, -1, f"{seed_tag}/{d}"), steps=steps_per_device)
            per_device.append(ev([own_test[d]]))
            emit("device_done", {"device": d})
        return _pool_metrics(per_device)

    if "base" in variants:
        emit("stage", {"name": "evaluating base"})
        model.set_state(init_params)  # B = 0: the LoRA branch adds exactly zero
        record("base", each("base"), ev(heldout_blocks) if heldout_blocks else None)
    if "federated" in variants:
        emit("stage", {"name": "evaluating federated"})
        model.set_state(state.params)
        record("federated", each("federated"), ev(heldout_blocks) if heldout_blocks else None)
    if "personalized" in variants:
        emit("stage", {"name": "personalizing", "total": len(trained)})
        record("personalized", personalized(), None)
    if "local_only" in variants:
        emit("stage", {"name": "local only", "total": len(trained)})
        record("local_only", local_from(init_params, "local_only"), None)
    if "centralized" in variants:
        steps = cfg.eval.centralized_steps or sum(row["local_steps"] for row in history)
        emit("stage", {"name": f"centralized ({steps} steps)"})
        train_steps(model, init_params, pooled([dataset.device(d).train for d in trained]), cfg.train,
                    device_seed(cfg.sim.seed, -1, "centralized"), steps=steps)
        record("centralized", ev(list(own_test.values())), ev(heldout_blocks) if heldout_blocks else None)

    # ---- outputs --------------------------------------------------------------------------------
    lora.save_folder(state.params, out / "adapter", cfg.lora, sim.model_id)
    summary.update(
        {
            "model": sim.model_id,
            "dataset": dataset.name,
            "devices": {"population": len(pool), "heldout": len(heldout), "trained": len(trained)},
            "rounds": len(history),  # run (a spent privacy budget stops early)
            "rounds_planned": cfg.sim.rounds,
            "bytes_up_per_device_round": bytes_up,
            "privacy": privacy.summary() if privacy else None,
            "per_device": per_device,  # each trained device's base / federated / personalized on its own test split
            "personalization": personalization_summary(per_device),
            "attack": ({"kind": cfg.attack.kind.value, "devices": malicious,
                        "backdoor_success": [row["attack"]["backdoor_success"] for row in history if "attack" in row]}
                       if malicious else None),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.module.parameters()),
            "wall_seconds": time.perf_counter() - t_start,
            "train_seconds": train_seconds,
            "allocator": allocator(),  # jemalloc under `pocketfed simulate` where installed (pocketfed.memory)
        }
    )
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    from pocketfed.report import plot_report  # matplotlib is imported only when a report is drawn

    plot_report(history, summary, out / "report.png")
    return RunResult(summary, history)


def _pool_metrics(per_device: list[Metrics]) -> Metrics:
    """Token-weighted pooling of per-device metrics (perplexity pooled in log space)."""
    per_device = [m for m in per_device if m.tokens]  # an empty split scores nan; it weighs nothing
    n = sum(m.tokens for m in per_device)
    if n == 0:
        return Metrics(float("nan"), float("nan"), float("nan"), 0)
    nll = sum(math.log(m.perplexity) * m.tokens for m in per_device)
    return Metrics(
        math.exp(nll / n),
        sum(m.top1 * m.tokens for m in per_device) / n,
        sum(m.top3 * m.tokens for m in per_device) / n,
        n,
    )

