"""The device task on `tiny`: the one loop on both backends (they agree), micro-batches, seeds,
HetLoRA padding, and the privacy pipeline's three exits (DP clip, secure-aggregation vector,
plain payload); the lean tokenizer; and a device session that imports neither transformers nor PEFT."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketfed import codec
from pocketfed.config import Codec, DPMode, LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device import task
from pocketfed.device.planner import Backend
from pocketfed.model import rank as rank_ops
from pocketfed.model.zoo import resolve
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.protocol.messages import TrainTask

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
TRAIN = TrainConfig(steps=3, batch_size=4, lr=1e-2)


def model(backend=Backend.lean, micro_batch=0, rank=4, seed=0):
    plan = dataclasses.replace(task.reference_plan(dataclasses.replace(LORA, rank=rank), TRAIN, 32, backend),
                               micro_batch=micro_batch or TRAIN.batch_size)
    return task.load_model(resolve("tiny")[0], plan, LORA.alpha, seed)


def data():
    """Nine rows of 32 tokens, the last one short (right-padded, as to_blocks pads)."""
    ids = torch.randint(3, 40000, (8 * 32 + 7,), generator=torch.Generator().manual_seed(0)).tolist()
    return to_blocks(ids, 32, 2)


def start_state(m):
    """The adapter every test starts from: A as drawn, B small and non-zero (so every LoRA path acts)."""
    g = torch.Generator().manual_seed(1)
    return {k: (torch.randn(v.shape, generator=g) * 0.02 if ".lora_B." in k else v) for k, v in m.get_state().items()}


def norm(u):
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in u.values())))


def test_lean_and_peft_backends_agree_on_the_same_seed_and_data():
    """fp32 base, whole batch, same init and order: the updates agree to float32 rounding. The lean
    loss's running log-sum-exp over vocabulary slices rounds otherwise than transformers' one softmax
    (~1e-7 in a gradient), which Adam's first steps magnify where a gradient is near zero: measured
    4.8e-6 on 1 of 1,792 entries, the largest update being 0.03."""
    lean, peft = model(Backend.lean), model(Backend.peft)
    assert lean.backend is Backend.lean and peft.backend is Backend.peft
    assert list(lean.params) == list(peft.params)  # PEFT's adapter keys, in the same order
    g = start_state(peft)
    assert all(torch.equal(g[k], v) for k, v in start_state(lean).items())  # same init draws
    t = TrainTask(0, "d", g, TRAIN, seed=5)
    a, b = task.run_task(lean, data(), t), task.run_task(peft, data(), t)
    assert a.num_tokens == b.num_tokens > 0
    assert max(float((a.update[k] - b.update[k]).abs().max()) for k in g) <= 1e-5
    assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) <= 1e-5
    assert norm(a.update) > 1e-3


def test_micro_batches_accumulate_to_the_whole_batch():
    """Micro-batches of 1 (one row short: its loss weighs by its targets) give the whole batch's step
    (to float32 rounding, which Adam magnifies where a gradient is near zero: see above)."""
    whole, micro = model(micro_batch=4), model(micro_batch=1)
    g = start_state(whole)
    t = TrainTask(0, "d", g, dataclasses.replace(TRAIN, steps=3), seed=2)  # 9 rows, batch 4: step 3 holds the short row
    a, b = task.run_task(whole, data(), t), task.run_task(micro, data(), t)
    assert a.num_tokens == b.num_tokens
    assert max(float((a.update[k] - b.update[k]).abs().max()) for k in g) <= 1e-5
    assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) <= 1e-5


def test_a_seed_fixes_the_bits_and_another_seed_changes_them():
    m = model()
    g = start_state(m)
    r1, r2 = (task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=7)) for _ in range(2))
    r3 = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=8))
    assert all(torch.equal(r1.update[k], r2.update[k]) for k in g)
    assert any(not torch.equal(r1.update[k], r3.update[k]) for k in g)
    assert r1.upload.payload == r2.upload.payload


def test_fedprox_pulls_toward_the_start():
    m = model()
    g = start_state(m)
    plain = task.run_task(m, data(), TrainTask(0, "d", g, dataclasses.replace(TRAIN, lr=2e-2), seed=1))
    prox = task.run_task(m, data(), TrainTask(0, "d", g, dataclasses.replace(TRAIN, lr=2e-2, prox_mu=50.0), seed=1))
    assert norm(prox.update) < norm(plain.update)


def test_batches_cover_an_epoch_before_repeating():
    idx = [b.tolist() for b in task.batches(6, 2, 3, torch.Generator().manual_seed(0))]
    assert sorted(sum(idx, [])) == [0, 1, 2, 3, 4, 5]
    assert [len(b) for b in task.batches(3, 4, 2, torch.Generator().manual_seed(0))] == [3, 3]


def test_upload_is_zero_padded_to_the_upload_rank():
    m = model(rank=2)
    g = start_state(m)
    r = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=0, upload_rank=4))
    assert rank_ops.rank_of(r.update) == 2  # the raw update stays as trained
    up = codec.decode(r.upload.payload, rank_ops.pad(g, 4))
    assert rank_ops.rank_of(up) == 4
    for k, v in up.items():
        kept = v[:2] if ".lora_A." in k else v[:, :2]
        pad = v[2:] if ".lora_A." in k else v[:, 2:]
        assert torch.equal(kept, r.update[k]) and not pad.any()


def test_plain_upload_decodes_to_the_update():
    m = model()
    g = start_state(m)
    for c, tol in ((Codec.float32, 0.0), (Codec.float16, 1e-3)):
        r = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=0, privacy=PrivacyPlan(codec=c)))
        assert r.upload.vector is None and r.upload.unclipped
        back = codec.decode(r.upload.payload, r.update)
        assert max(float((back[k] - r.update[k]).abs().max()) for k in g) <= tol * max(
            float(v.abs().max()) for v in r.update.values())


def test_dp_clip_reaches_the_upload_and_secagg_gives_a_vector():
    m = model()
    g = start_state(m)
    raw = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=0)).update
    clip = norm(raw) / 4
    dp = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=0, privacy=PrivacyPlan(dp=DPMode.central, clip_norm=clip)))
    assert not dp.upload.unclipped
    sent = codec.decode(dp.upload.payload, raw)
    assert norm(sent) == pytest.approx(clip, rel=1e-5)
    assert all(torch.allclose(sent[k], raw[k] * clip / norm(raw), atol=1e-7) for k in g)  # scaled, not changed
    sa = task.run_task(m, data(), TrainTask(0, "d", g, TRAIN, seed=0, privacy=PrivacyPlan(secagg=True, clip_norm=clip)))
    assert sa.upload.payload is None and sa.upload.vector.shape == (sum(v.numel() for v in g.values()),)
    assert float(np.linalg.norm(sa.upload.vector)) == pytest.approx(clip, rel=1e-6)
    assert all(torch.equal(dp.update[k], sa.update[k]) for k in g)  # the raw update stays on the device


def test_lean_tokenizer_gives_transformers_ids(tiny_base):
    from pocketfed.device.leanmodel import Tokenizer

    lean, ref = Tokenizer(resolve("tiny")[0]), tiny_base.tokenizer
    texts = ["Hello, world!  Two  spaces.\nNew line", "naïve café " + ref.eos_token + " after eos", ""]
    assert lean(texts[0])["input_ids"] == ref(texts[0], add_special_tokens=False)["input_ids"]
    assert lean(texts)["input_ids"] == ref(texts, add_special_tokens=False)["input_ids"]
    assert (lean.eos_token, lean.eos_token_id, lean.pad_token_id) == (ref.eos_token, ref.eos_token_id, ref.pad_token_id)


def test_a_watch_session_imports_neither_transformers_nor_peft(tmp_path):
    """The device process's session for a `tiny` task under the watch profile, in a fresh process:
    the lean backend, a plan, one round through the pipeline; then its sys.modules."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("\n\n".join(f"paragraph {i} " + "words go here " * 20 for i in range(12)))
    code = f"""
import json, sys
from pocketfed.device import agent, task
from pocketfed.device.profiles import get_profile
from pocketfed.protocol import wire
from pocketfed.protocol.messages import TrainTask
from pathlib import Path
spec = wire.TaskSpec(round_id=1, round_index=0, seed=3, deadline=0.0, model="tiny",
    release=wire.SignedManifest(manifest={{}}, signature="0" * 128),
    lora=wire.LoraSpec(rank=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    data=wire.DataSpec(seq_len=32, test_fraction=0.2, min_train_tokens=32),
    train=wire.TrainSpec(steps=2, epochs=0.0, batch_size=4, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, prox_mu=0.0),
    codec="float32", adapter_schema=[], max_upload_bytes=2**30, chunk_bytes=2**20,
    privacy=wire.PrivacySpec(dp="central", clip_norm=0.5, secagg=False, noise_multiplier=1.0, expected_devices=4,
                             frac_bits=16, secagg_degree=0))
s = agent.open_session(spec, Path({str(tmp_path / "data")!r}), "dev", get_profile("watch"))
g = s.model.get_state()
r = task.run_task(s.model, s.train, TrainTask(0, "dev", g, task.TrainConfig(steps=2, batch_size=4), 3,
                                              agent.privacy_plan(spec), upload_rank=8))
print(json.dumps({{"plan": agent.plan_summary(s), "tokens": r.num_tokens, "bytes": len(r.upload.payload),
                  "modules": sorted(m for m in ("transformers", "peft", "torch._dynamo") if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["modules"] == [], r
    assert r["plan"]["backend"] == "lean" and r["plan"]["rank"] == 2 and r["tokens"] > 0, r
    assert r["bytes"] > 0


def test_privacy_plan_from_the_wire():
    from pocketfed.device.agent import privacy_plan
    from pocketfed.protocol import wire

    base = dict(round_id=1, round_index=0, seed=0, deadline=0.0, model="tiny",
                release=wire.SignedManifest(manifest={}, signature="0" * 128),
                lora=wire.LoraSpec(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"]),
                data=wire.DataSpec(seq_len=32, test_fraction=0.2, min_train_tokens=0),
                train=wire.TrainSpec(steps=1, epochs=0.0, batch_size=1, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                                     prox_mu=0.0),
                codec="int8", adapter_schema=[], max_upload_bytes=1, chunk_bytes=1)
    assert privacy_plan(wire.TaskSpec(**base)) == PrivacyPlan(codec=Codec.int8)
    new = wire.PrivacySpec(dp="distributed", clip_norm=2.0, secagg=True, noise_multiplier=1.5, expected_devices=9,
                           frac_bits=20, secagg_degree=4)
    plan = privacy_plan(wire.TaskSpec(**base, privacy=new))
    assert plan == PrivacyPlan(DPMode.distributed, 2.0, 1.5, 9, True, Codec.int8, 20, 4)
    assert plan.device_noise_std == pytest.approx(1.5 * 2.0 / 3)
    assert wire.PrivacySpec.from_plan(plan) == new
