"""The side-by-side's Flower app: pocketfed's workload on Flower's simulation engine.

Run only inside bench/.flwr-venv (bench/setup_flower.sh), by bench/bench_scale.py:
    bench/.flwr-venv/bin/python bench/flower_app.py '{"overrides": {...}, "cpus": 2, "device_cpus": 1}'
(`cpus`: Ray's CPUs; `device_cpus`: what each actor declares and its torch threads, so 2 / 1 runs
two actors of one thread, 2 / 2 one actor of two.) It prints one JSON line: per-round wall times,
per-round train loss, the final held-out perplexity.

Same workload as `pocketfed simulate`: the same model, devices (the same population and held-out
split, one Flower SuperNode per training device), devices per round, local steps (the ClientApp
trains with pocketfed.device.trainer.run_task, seeded as pocketfed seeds a device), and FedAvg
weighted by training tokens. What differs is the engine: Flower's stock FedAvg strategy samples
nodes with its own generator (seeded here), its Ray actors each load their own copy of the base
model (once per actor, cached), and adapters travel as Flower ArrayRecords.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

ENV = "POCKETFED_FLOWER_WORKLOAD"
_CACHE: dict[str, Any] = {}  # per process: the model, the dataset, the population


def workload() -> dict[str, Any]:
    """The run config and everything derived from it, built once per process."""
    if not _CACHE:
        from pocketfed.config import load_config
        from pocketfed.data.federated import load_dataset
        from pocketfed.model import lora
        from pocketfed.model.zoo import load_base
        from pocketfed.server.sampling import split_population

        spec = json.loads(os.environ[ENV])
        cfg = load_config(None, spec["overrides"])
        base = load_base(cfg.model.name, cfg.model.cache_dir)
        model = lora.attach(base.model, cfg.lora, seed=cfg.sim.seed)
        dataset = load_dataset(cfg.data, base.tokenizer)
        pool, heldout = split_population(dataset.device_ids, cfg.sim.devices, cfg.sim.heldout, cfg.sim.seed)
        _CACHE.update(cfg=cfg, model=model, dataset=dataset, pool=pool, heldout=heldout, spec=spec)
    return _CACHE


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from pocketfed.device.task import run_task, wrap_peft
    from pocketfed.model import lora
    from pocketfed.server.sampling import device_seed
    from pocketfed.protocol.messages import TrainTask

    import torch

    w = workload()
    torch.set_num_threads(w["spec"]["device_cpus"])  # what the actor declared, as pocketfed's Ray workers do
    device = w["pool"][int(context.node_config["partition-id"])]
    round_ = int(msg.content["config"]["server-round"]) - 1
    global_adapter = msg.content["arrays"].to_torch_state_dict()
    # whole batches, as a plain PEFT loop (Flower's LLM examples) runs them; pocketfed's devices run
    # train.micro_tokens at a time (the same gradient to float32 rounding)
    whole = dataclasses.replace(w["cfg"].train, micro_tokens=0)
    task = TrainTask(round_, device, global_adapter, whole, device_seed(w["cfg"].sim.seed, round_, device))
    result = run_task(wrap_peft(w["model"]), w["dataset"].device(device).train, task)
    trained = lora.add(global_adapter, result.update)  # Flower's FedAvg averages models, not updates
    metrics = MetricRecord({"num-examples": result.num_tokens, "train_loss": result.metrics["train_loss"]})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from pocketfed.device.task import wrap_peft
    from pocketfed.evaluation import evaluate
    from pocketfed.model import lora

    w = workload()
    cfg = w["cfg"]
    random.seed(cfg.sim.seed)  # Flower samples nodes with the `random` module
    n = len(w["pool"])
    strategy = FedAvg(fraction_train=cfg.sim.per_round / n, min_train_nodes=cfg.sim.per_round,
                      min_available_nodes=n, fraction_evaluate=0.0, weighted_by_key="num-examples")
    marks: list[float] = []
    heldout = [w["dataset"].device(d).test for d in w["heldout"]]
    ppl: list[float] = []

    def held_out(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called before round 1 and after each round: held-out perplexity, as pocketfed's
        eval.every_round does; the calls also time the rounds."""
        marks.append(time.perf_counter())
        if server_round == 0 or not heldout or not cfg.eval.every_round:
            return None
        lora.set_state(w["model"], arrays.to_torch_state_dict())
        ppl.append(evaluate(wrap_peft(w["model"]), heldout, max_tokens=cfg.data.max_eval_tokens).perplexity)
        return MetricRecord({"heldout_perplexity": ppl[-1]})

    result = strategy.start(grid, ArrayRecord(lora.get_state(w["model"])), num_rounds=cfg.sim.rounds,
                            evaluate_fn=held_out)
    train_metrics = getattr(result, "train_metrics_clientapp", {}) or {}
    # marks[r] is the end of round r's training (marks[0]: the start); round r >= 2 then counts the
    # evaluation after round r - 1 and round r's training: one evaluation and one training a round.
    print("FLOWER_RESULT " + json.dumps({
        "round_seconds": [b - a for a, b in zip(marks, marks[1:])],
        "heldout_perplexity": ppl[-1] if ppl else None,
        # per round, the token-weighted mean of the devices' losses (FedAvg's weighted_by_key), as pocketfed's
        "train_loss": [float(train_metrics[r]["train_loss"]) for r in sorted(train_metrics)],
    }), flush=True)


def run(spec: dict[str, Any]) -> None:
    from flwr.simulation import run_simulation

    os.environ[ENV] = json.dumps(spec)
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = bench_dir + os.pathsep + os.environ.get("PYTHONPATH", "")  # workers import this module
    cfg = workload()["cfg"]
    run_simulation(
        server_app=server, client_app=client, num_supernodes=len(workload()["pool"]),
        backend_config={
            "client_resources": {"num_cpus": spec["device_cpus"], "num_gpus": 0.0},
            "init_args": {"num_cpus": spec["cpus"], "include_dashboard": False, "log_to_driver": False,
                          "object_store_memory": 256 << 20, "logging_level": "WARNING"},
        },
    )
    del cfg


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flower_app  # the module by its importable name, so Ray workers load it, not a pickled __main__

    flower_app.run(json.loads(sys.argv[1]))
