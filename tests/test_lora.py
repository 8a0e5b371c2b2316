"""LoRA adapters on an autoencoder: targets, the adapter saved apart, and the merge into plain weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusability_hf.training.lora import add_lora, lora_adapter, lora_target_names, merge_lora, save_lora_adapter

from testing_utils import tiny_autoencoder_kl

pytest.importorskip("peft")


def tiny():
    return tiny_autoencoder_kl()


def test_adapter_is_saved_apart_and_merges_into_the_plain_model(tmp_path):
    vae = tiny()
    plain_keys = set(vae.state_dict())
    targets = lora_target_names(vae, ["conv1", "conv2"], ["encoder"])
    assert targets and all(n.startswith("decoder.") and n.endswith(("conv1", "conv2")) for n in targets)
    add_lora(vae, targets, rank=2)
    with torch.no_grad():  # non-zero B, so that the adapter changes the output
        for name, p in vae.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        adapted = vae.decode(vae.encode(x).latent_dist.mode()).sample
    weights, config = lora_adapter(vae, 2)
    assert config == {"r": 2, "lora_alpha": 2, "target_modules": sorted(targets)}
    assert weights and all("lora" in k and v.is_contiguous() for k, v in weights.items())
    merge_lora(vae)
    assert set(vae.state_dict()) == plain_keys
    with torch.no_grad():
        merged = vae.decode(vae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)

    save_lora_adapter(str(tmp_path / "lora"), weights, config)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text()) == config
    assert load_file(tmp_path / "lora" / "adapter_model.safetensors").keys() == weights.keys()
    with pytest.raises(FileExistsError):  # a new folder only
        save_lora_adapter(str(tmp_path / "lora"), weights, config)
