"""LoRA adapters (peft) on an autoencoder's trainable convolutions, merged back into plain weights at save time."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn

LORA_LAYER_TYPES = (nn.Conv2d, nn.Conv3d, nn.Linear)


def lora_target_names(
    model: nn.Module, suffixes: Optional[Sequence[str]], frozen_prefixes: Iterable[str]
) -> List[str]:
    """Full names of the conv/linear layers to adapt: every such layer outside ``frozen_prefixes`` whose name ends
    with one of ``suffixes`` (all of them when ``suffixes`` is empty or ``None``)."""
    frozen = tuple(f"{p}." for p in frozen_prefixes) + tuple(frozen_prefixes)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, LORA_LAYER_TYPES) or name.startswith(frozen):
            continue
        if suffixes and not any(name == s or name.endswith(f".{s}") for s in suffixes):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"No convolution or linear layer matches --lora_target_modules {list(suffixes or [])}.")
    return names


def add_lora(model: nn.Module, target_names: List[str], rank: int, alpha: Optional[float] = None) -> None:
    """Freeze ``model`` and inject LoRA adapters (``r = rank``, ``lora_alpha = alpha or rank``) on ``target_names``."""
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_names)
    model.add_adapter(config)


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights alone (peft naming), for ``safetensors``."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def lora_adapter(model: nn.Module, rank: int, alpha: Optional[float] = None) -> Tuple[Dict, Dict]:
    """The adapter of a model that :func:`add_lora` adapted, taken before :func:`merge_lora`: its weights
    (contiguous, peft naming) and its ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``)."""
    weights = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    config = {
        "r": rank,
        "lora_alpha": alpha or rank,
        "target_modules": sorted(model.peft_config["default"].target_modules),
    }
    return weights, config


def save_lora_adapter(save_directory: str, weights: Dict, config: Dict) -> None:
    """Write a :func:`lora_adapter` into a new folder: ``adapter_model.safetensors`` and ``adapter_config.json``."""
    from safetensors.torch import save_file

    os.makedirs(save_directory)
    save_file(weights, os.path.join(save_directory, "adapter_model.safetensors"))
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight and put the plain base layer back, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
