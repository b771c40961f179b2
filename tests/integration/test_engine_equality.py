"""One round engine: a deployment and a simulation of the same cohorts give the same adapter.

Devices here talk to a real coordinator through its HTTP API (signed requests, chunked uploads,
the four secure-aggregation stages) and train with the simulator's own backend (the device task:
train -> privatize -> encode). The recorded cohorts are then replayed through `simulate`. Under
central DP the server's Gaussian noise is made reproducible (a fixed test seed) so that both drivers
draw the same noise: what is compared is the pipeline, not the randomness.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load as st_load

from pocketfed.config import load_config
from pocketfed.data.federated import load_dataset
from pocketfed.privacy import dp
from pocketfed.protocol.messages import TrainTask
from pocketfed.server import checkpoint
from pocketfed.server import coordinator as co
from pocketfed.simulate import simulate
from pocketfed.transport.inprocess import InProcessBackend
from pocketfed.transport.shared import load_simulator
from tests.unit.deploy.http_fixtures import OK, Clock, app_for, operator_token
from tests.unit.deploy.test_http_secagg import Party

pytestmark = pytest.mark.integration

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine on quiet hills "
         "and rivers run to the sea under old bridges where children sing of summer rain").split()
ROUNDS = 2


def write_data(root, n: int) -> None:
    for i in range(n):
        rng = random.Random(i)
        (root / f"dev{i}").mkdir(parents=True)
        (root / f"dev{i}" / "notes.txt").write_text("\n\n".join(
            " ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(8)))


def config(tmp_path, devices: int, **sections):
    raw = {
        "model": {"name": "tiny"},
        "data": {"dataset": "textdir", "path": str(tmp_path / "data"), "seq_len": 32, "min_train_tokens": 32,
                 "test_fraction": 0.2},
        "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
        "sim": {"rounds": ROUNDS, "seed": 0, "devices": 0, "heldout": 0},
        "deploy": {"goal": devices, "overselect": 1.0, "quorum": devices, "deadline_s": 600.0, "retry_s": 1.0,
                   "secagg_stage_s": 30.0},
        "eval": {"every_round": False, "variants": ["federated"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return load_config(None, raw)


class Fleet:
    """Devices of a deployment: each trains with the simulator's device task on its own data."""

    def __init__(self, tmp_path, cfg, n: int, clock: Clock):
        sim = load_simulator("tiny", "", cfg.lora, cfg.sim.seed)  # the simulator's model, from the same seed
        init = sim.model.get_state()  # the simulator's round-0 adapter
        self.dataset = load_dataset(cfg.data, sim.tokenizer)
        self.coordinator = co.open_coordinator(tmp_path / "state", cfg, sim.model_id, lambda: init)
        app = app_for(self.coordinator, clock)
        self.parties = [Party(app, f"dev{i}") for i in range(n)]  # registered as dev0..dev{n-1}
        self.backend = InProcessBackend(sim.model, self.dataset)
        self.cfg = cfg

    def train(self, p: Party):
        """Check in, fetch the release the task names, run the device task under the round's plan."""
        p.task = p.client.checkin(OK).task
        assert p.task is not None
        rid, sha = p.task.round_id, p.task.release.manifest["sha256"]
        task = TrainTask(p.task.round_index, p.name, st_load(p.client.adapter(sha)), self.cfg.train, p.task.seed,
                         privacy=self.coordinator.plan)
        (result,) = self.backend.run([task])
        assert result.upload is not None
        return rid, result

    def upload(self, p: Party, rid: int, result) -> None:
        payload = result.upload.payload
        p.client.upload(rid, payload, chunk_bytes=4096)
        p.client.commit(rid, payload, result.num_tokens, {"train_loss": result.metrics["train_loss"],
                                                          "unclipped": float(result.upload.unclipped)})

    def cohorts(self) -> list[list[str]]:
        rounds = [r for r in reversed(self.coordinator.store.rounds(limit=100)) if r.status == "committed"]
        assert len(rounds) == ROUNDS, [(r.status, r.reason) for r in rounds]
        return [list(r.participants or []) for r in rounds]

    def final(self) -> dict[str, torch.Tensor]:
        v = self.coordinator.store.latest_version()
        assert v is not None and v.rounds_applied == ROUNDS
        return st_load(self.coordinator.store.get_blob(v.adapter_sha))


def replay_equals(tmp_path, fleet: Fleet) -> None:
    cohorts = fleet.cohorts()
    simulate(fleet.cfg, tmp_path / "sim", participants=cohorts)
    state, _ = checkpoint.load(tmp_path / "sim" / "checkpoint.safetensors")
    final = fleet.final()
    assert set(state.params) == set(final)
    worst = max(float((state.params[k] - final[k]).abs().max()) for k in final)
    assert worst <= 1e-6, worst
    assert any(float(v.abs().sum()) > 0 for k, v in final.items() if "lora_B" in k)  # it trained
    metrics = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert metrics["rounds"] == ROUNDS


@pytest.fixture
def seeded_noise(monkeypatch):
    """The server's central noise from a fixed test seed, so both drivers draw the same N(0, s^2)."""
    draws = []
    real = dp.add_gaussian_noise

    def noise(x, std, seed=None):
        draws.append(std)  # the deployment's rounds 0, 1, ..., then the simulation's: seed by round
        return real(x, std, seed=1234 + (len(draws) - 1) % ROUNDS)

    monkeypatch.setattr(dp, "add_gaussian_noise", noise)
    return draws


@pytest.mark.parametrize("sections", [
    {"server": {"strategy": "fedavg"}},
    {"server": {"strategy": "fedadam", "lr": 0.01}},
    {"privacy": {"dp": "central", "noise_multiplier": 0.5, "clip_norm": 0.05}},
], ids=["fedavg", "fedadam", "central-dp"])
def test_deployment_equals_simulation(tmp_path, sections, seeded_noise):
    n = 4
    write_data(tmp_path / "data", n)
    cfg = config(tmp_path, n, **sections)
    fleet = Fleet(tmp_path, cfg, n, Clock())
    for _ in range(ROUNDS):
        for p in fleet.parties:
            rid, result = fleet.train(p)
            fleet.upload(p, rid, result)
    replay_equals(tmp_path, fleet)
    if cfg.privacy.dp.value == "central":
        # each round's noise was drawn once per driver, at std z C
        assert len(seeded_noise) == 2 * ROUNDS and seeded_noise[0] == pytest.approx(0.5 * 0.05)


def test_secure_aggregation_with_two_dropouts_equals_simulation(tmp_path):
    """6 devices advertise keys; dev4 drops before masking, dev5 after masking (still in the sum)."""
    n = 6
    write_data(tmp_path / "data", n)
    cfg = config(tmp_path, n, privacy={"secagg": True, "clip_norm": 0.5})
    clock = Clock()
    fleet = Fleet(tmp_path, cfg, n, clock)
    stage_s = cfg.deploy.secagg_stage_s
    for _ in range(ROUNDS):
        trained = [fleet.train(p) for p in fleet.parties]
        for p in fleet.parties:
            p.advertise()
        for p in fleet.parties:
            p.share()
        for p, (_, result) in zip(fleet.parties[:4] + fleet.parties[5:], trained[:4] + trained[5:]):
            p.mask(result.upload.vector)
        clock.offset += stage_s + 1  # the masked stage passes without dev4
        for p in fleet.parties[:4]:
            p.sign()
        clock.offset += stage_s + 1  # the consistency stage passes without dev5
        for p in fleet.parties[:4]:
            p.unmask()
        clock.offset += stage_s + 1  # the unmasking passes without dev5
        fleet.parties[0].client.status(operator_token(tmp_path / "state"))
    assert fleet.cohorts() == [["dev0", "dev1", "dev2", "dev3", "dev5"]] * ROUNDS
    replay_equals(tmp_path, fleet)
