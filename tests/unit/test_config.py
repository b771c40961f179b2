import pytest

from pocketfed.config import Strategy, load_config, parse_overrides, to_dict, from_dict
from pocketfed.errors import UserError


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\nserver:\n  strategy: fedadam\n")
    cfg = load_config(f, parse_overrides(["train.lr=3e-4", "sim.rounds=5", "lora.target_modules=q_proj,k_proj"]))
    assert cfg.train.lr == 3e-4 and cfg.sim.rounds == 5 and cfg.server.strategy is Strategy.fedadam
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.train.batch_size == 4  # untouched default
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["nope.x=1"], "unknown config key 'nope'"),
        (["server.strategy=fedsgd"], "must be one of fedavg, fedadam, fedyogi"),
        (["sim.rounds=two"], "'sim.rounds' must be an integer"),
        (["sim.rounds=0"], "sim.rounds must be at least 1"),
        (["train.lr"], "--set takes key=value"),
        (["train.micro_tokens=-1"], "train.micro_tokens must be 0 (the whole batch at once) or positive"),
    ],
)
def test_bad_config_is_one_clear_sentence(overrides, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, parse_overrides(overrides))


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(bad)
