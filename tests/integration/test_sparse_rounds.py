"""Sparse back-propagation through a whole run (`lora.layers`): the adapter carries the top layers
only, and every stage follows from its names: secure aggregation,
the saved PEFT folder, and loading it back onto the base for the release merge."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pocketfed.model.depth import layers_of
from pocketfed.release.merge import AdapterRef, merge
from pocketfed.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("privacy", [{}, {"secagg": True}])
def test_top_layer_run_trains_saves_and_merges(tmp_path, tiny_base, privacy):
    cfg = tiny_config(lora={"layers": 1}, privacy=privacy, sim={"rounds": 1}, eval={"variants": ["federated"]})
    result = simulate(cfg, tmp_path / "run")
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert layers_of(adapter) == [1]  # tiny has 2 layers: only the top one was adapted
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # and it trained
    assert result.history[0]["tokens"] > 0
    peft_model = PeftModel.from_pretrained(tiny_base.model, str(tmp_path / "run" / "adapter"))
    assert peft_model.peft_config["default"].layers_to_transform == [1]
    from pocketfed.model.zoo import load_base

    merged = merge(load_base("tiny").model, (AdapterRef("global", tmp_path / "run" / "adapter", ""),))
    base = load_base("tiny").model
    for name, w in merged.state_dict().items():  # the merge changed layer 1's q, v and nothing else
        changed = not torch.equal(w, base.state_dict()[name])
        assert changed == (".layers.1." in name and ("q_proj" in name or "v_proj" in name)), name
