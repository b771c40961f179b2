"""The simulator's local steps (`trainer.train_steps`) and the device task on its PEFT model: only adapter
weights change, FedProx pulls toward the global model, seeds fix bits."""

import torch

from pocketfed.config import TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device.task import batches, micro_rows, run_task, wrap_peft
from pocketfed.device.trainer import train_steps
from pocketfed.model import lora
from pocketfed.protocol.messages import TrainTask
from tests.conftest import tiny_config


def _setup(tiny_base):
    cfg = tiny_config()
    model = lora.attach(tiny_base.model, cfg.lora, seed=0)
    ids = list(range(100, 100 + 32 * 10))  # ten full rows of 32 tokens
    return wrap_peft(model), lora.get_state(model), to_blocks(ids, 32, 0)


def test_update_is_adapter_only_and_deterministic(tiny_base):
    model, g, data = _setup(tiny_base)
    base_before = {n: p.clone() for n, p in model.module.named_parameters() if not p.requires_grad}
    task = TrainTask(0, "dev", g, TrainConfig(steps=3, batch_size=2, lr=1e-2), seed=7)
    r1 = run_task(model, data, task)
    r2 = run_task(model, data, task)
    assert set(r1.update) == set(g)
    assert all(torch.equal(r1.update[k], r2.update[k]) for k in g)  # same seed, same bits
    assert any(r1.update[k].abs().sum() > 0 for k in g)
    assert r1.num_tokens == 3 * 2 * 32
    r3 = run_task(model, data, TrainTask(0, "dev", g, TrainConfig(steps=3, batch_size=2, lr=1e-2), seed=8))
    assert any(not torch.equal(r1.update[k], r3.update[k]) for k in g)  # another seed, another order
    for n, p in model.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n])  # the frozen base never moves


def test_fedprox_shrinks_the_update(tiny_base):
    model, g, data = _setup(tiny_base)
    plain = run_task(model, data, TrainTask(0, "d", g, TrainConfig(steps=4, batch_size=2, lr=2e-2), seed=1))
    prox = run_task(model, data, TrainTask(0, "d", g, TrainConfig(steps=4, batch_size=2, lr=2e-2, prox_mu=50.0), seed=1))
    norm = lambda u: float(torch.sqrt(sum((v**2).sum() for v in u.values())))  # noqa: E731
    assert norm(prox.update) < norm(plain.update)


def test_batches_cover_an_epoch_before_repeating():
    gen = torch.Generator().manual_seed(0)
    idx = [b.tolist() for b in batches(6, 2, 3, gen)]
    assert sorted(sum(idx, [])) == [0, 1, 2, 3, 4, 5]


def test_train_steps_is_the_device_loop_from_the_given_state(tiny_base):
    model, g, data = _setup(tiny_base)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2)
    ref = run_task(model, data, TrainTask(0, "d", g, cfg, seed=3))
    model.set_state({k: v + 1.0 for k, v in g.items()})  # train_steps starts from the state it is given
    tokens, metrics = train_steps(model, g, data, cfg, seed=3)
    assert tokens == ref.num_tokens and metrics["steps"] == 2.0
    assert all(torch.equal(model.get_state()[k] - g[k], ref.update[k]) for k in g)


def test_micro_rows_by_hand():
    cfg = TrainConfig(batch_size=4, micro_tokens=128)
    assert [micro_rows(cfg, t) for t in (32, 64, 100, 128, 512)] == [4, 2, 1, 1, 1]  # never below one row
    assert micro_rows(TrainConfig(batch_size=4, micro_tokens=0), 64) == 4  # 0: the whole batch at once


def test_micro_batches_give_the_batch_gradient(tiny_base):
    """train.micro_tokens splits a step's rows (here 4 rows of 32 tokens into 4, 2 and 1 micro-batches);
    the token-weighted losses add up to the batch's, so the update is the same to float rounding (which
    Adam's first steps magnify where a gradient is near 0, as in test_task.py)."""
    model, g, data = _setup(tiny_base)
    updates = {}
    for tokens in (32, 64, 0):
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, micro_tokens=tokens)
        updates[tokens] = run_task(model, data, TrainTask(0, "d", g, cfg, seed=5)).update
    for tokens in (32, 64):
        for k in g:
            torch.testing.assert_close(updates[tokens][k], updates[0][k], rtol=0, atol=1e-5)
    assert any(updates[0][k].abs().sum() > 0 for k in g)
