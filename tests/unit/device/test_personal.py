"""The personal adapter: trained on the device's own data, saved in the device home, never sent."""

import pytest
import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device import ledger, personal
from pocketfed.model import lora


def test_personal_adapter_is_saved_and_refused_at_the_door(tiny_base, tmp_path):
    model = lora.attach(tiny_base.model, LoraConfig(rank=2), seed=0)
    global_state = lora.get_state(model)
    data = to_blocks(list(range(3, 600)), 32, 2)
    mine = personal.train_personal(model, global_state, data, TrainConfig(steps=2, batch_size=2, lr=1e-2), seed=0, steps=2)
    assert any(not torch.equal(mine[k], global_state[k]) for k in mine)  # it learned something local
    home = tmp_path / "home"
    folder = personal.save_personal(model, mine, home)
    assert (folder / "adapter_config.json").is_file()
    back = personal.load_personal(home)
    assert set(back) == set(mine) and all(torch.equal(back[k], mine[k]) for k in mine)
    with pytest.raises(ledger.EgressRefused, match="never leaves"):
        personal.send_personal(home, "server", mine)
    s = ledger.summarize(home)
    assert s.messages == 0 and s.bytes == 0 and s.refusals == 1 and "personal_adapter" not in s.by_kind
