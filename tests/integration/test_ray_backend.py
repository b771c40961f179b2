"""The Ray backend on a local Ray (started once for this module): same global adapter as the
in-process backend, failures and memory overruns as dropouts, one shared base model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from pocketfed.data.federated import load_dataset
from pocketfed.model import lora
from pocketfed.model.zoo import load_base
from pocketfed.server.sampling import device_seed
from pocketfed.simulate import simulate
from pocketfed.transport.shared import load_simulator
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask
from tests.conftest import tiny_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

MB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One small local Ray for the whole module (start-up takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * MB, log_to_driver=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def test_ray_equals_inprocess(tmp_path):
    runs = {}
    for backend in ("inprocess", "ray"):
        cfg = tiny_config(sim={"rounds": 2, "devices": 5, "per_round": 3, "backend": backend},
                          eval={"variants": ["federated"], "every_round": False})
        result = simulate(cfg, tmp_path / backend)
        runs[backend] = (load_file(tmp_path / backend / "adapter" / "adapter_model.safetensors"), result)
    (a, ra), (b, rb) = runs["inprocess"], runs["ray"]
    assert set(a) == set(b)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    for k in a:  # both train the lean model on the same weights; a worker's torch threads may sum in
        # another order, which Adam magnifies where a gradient is near 0
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    assert [r["devices"] for r in ra.history] == [r["devices"] for r in rb.history]
    assert all(r["dropouts"] == 0 for r in rb.history)
    assert rb.summary["federated"]["perplexity"] == pytest.approx(ra.summary["federated"]["perplexity"], rel=1e-5)


def test_failures_and_memory_overruns_are_dropouts():
    """One round with a good device, a device whose code raises, and one that outgrows its memory."""
    from pocketfed.transport.ray_backend import RayBackend
    from pocketfed.transport.shared import build_base, share_base

    cfg = tiny_config(sim={"backend": "ray", "device_memory_mb": 900, "device_cpus": 2})  # one worker
    base = load_base("tiny")
    model = lora.attach(base.model, cfg.lora, seed=0)
    dataset = load_dataset(cfg.data, base.tokenizer)
    g = lora.get_state(model)

    # The shared copy rebuilds the same model, weights viewed in place (no copy).
    shared = share_base(model)
    rebuilt = build_base(shared)
    ids = dataset.device(dataset.device_ids[0]).train.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model.get_base_model()(input_ids=ids).logits)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight  # tied weights stay tied
    [emb] = [i for i, names in enumerate(shared.param_names) if "model.embed_tokens.weight" in names]
    assert rebuilt.model.embed_tokens.weight.data_ptr() == shared.arrays[emb].ctypes.data  # a view, not a copy

    d0, d1 = dataset.device_ids[:2]
    d2 = max(dataset.device_ids[:40], key=lambda d: len(dataset.device(d).train))
    rows = len(dataset.device(d2).train)
    huge = dataclasses.replace(cfg.train, steps=1, batch_size=rows, micro_tokens=0)  # at once: rows x 32 x 49k logits
    assert rows * 32 * len(base.tokenizer) * 4 > 900 * MB  # more than the device declared
    tasks = [
        TrainTask(0, d0, g, cfg.train, device_seed(0, 0, d0)),
        TrainTask(0, d1, {"not-an-adapter": torch.zeros(1)}, cfg.train, 1),
        TrainTask(0, d2, g, huge, device_seed(0, 0, d2)),
    ]
    backend = RayBackend(cfg, load_simulator("tiny", "", cfg.lora, seed=0), dataset)
    try:
        done: list[str] = []
        backend.on_done = done.append
        results = backend.run(tasks)
    finally:
        backend.close()
    assert isinstance(results[0], TrainResult) and results[0].device_id == d0
    assert isinstance(results[1], Dropout) and "adapter keys do not match" in results[1].reason
    assert isinstance(results[2], Dropout) and results[2].device_id == d2, results[2]
    assert "900 MB" in results[2].reason
    assert sorted(done) == sorted([d0, d1, d2])


def test_a_worker_is_lean_and_its_base_stays_in_the_object_store():
    """A Ray worker on a model the lean Llama supports: it never imports transformers, PEFT or scipy,
    and after training every frozen base tensor still lies in the object store's shared pages (no
    per-worker copy: a `.clone()`, `.float()` or `.contiguous()` on a base weight would move it)."""
    from pocketfed.transport.ray_backend import RayBackend, in_shared_memory
    from pocketfed.transport.shared import build_lean, share_base

    cfg = tiny_config(sim={"backend": "ray", "device_cpus": 2})  # one worker
    base = load_base("tiny")
    model = lora.attach(base.model, cfg.lora, seed=0)
    dataset = load_dataset(cfg.data, base.tokenizer)

    shared = share_base(model, base.path)
    assert shared.lean is not None
    lean = build_lean(shared)  # the worker's model: the same logits as transformers', on the shared arrays
    ids = dataset.device(dataset.device_ids[0]).train.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(lean(ids), model.get_base_model()(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert lean.lm_head.weight is lean.model.embed_tokens.weight
    assert not in_shared_memory([torch.zeros(4)])  # a private tensor is told apart

    d = dataset.device_ids[0]
    backend = RayBackend(cfg, load_simulator("tiny", "", cfg.lora, seed=0), dataset)
    try:
        [result] = backend.run([TrainTask(0, d, lora.get_state(model), cfg.train, device_seed(0, 0, d))])
        [stats] = backend.worker_stats()
    finally:
        backend.close()
    assert isinstance(result, TrainResult) and result.num_tokens > 0
    assert stats["backend"] == "lean"
    assert stats["imported"] == []
    assert stats["base_in_object_store"] is True
