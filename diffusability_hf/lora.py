"""LoRA adapters (peft) on an autoencoder's trainable convolutions, merged back into plain weights at save time."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

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
