"""FSDP2 in the training scripts: what changes when every parameter is a shard.

``accelerate_configs/fsdp.yaml`` (``fsdp_version: 2``; the paper trains with full sharding) has accelerate apply
``fully_shard`` to the prepared module: each process holds 1/N of every parameter, gradient and AdamW moment, as a
``DTensor``. The EMA is then kept over each process's shards (:func:`save_ema_state`, :func:`load_ema_state`), and
validation, snapshots and the final save run on the main process's unsharded :func:`plain_copy`, filled by the
collective :func:`gather_into`, so the saved model is the plain diffusers module DDP saves. Without FSDP
(:func:`fsdp_active` is False) these functions do nothing or the obvious thing, so the scripts run one code path.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..errors import error_summary
from .ema import EMA, EMA_WEIGHTS, load_ema_files, save_ema_files

LEGACY_EMA = "custom_checkpoint_0.pkl"  # the EMA as accelerate's register_for_checkpointing saved it (older versions)


class FSDPLaunchError(ValueError):
    """An FSDP launch the scripts cannot run (FSDP1, or --compile under FSDP)."""


def check_fsdp_launch(compile: bool = False) -> None:
    """Refuse FSDP1 before any weights load: the scripts' EMA and gathers are written for FSDP2's ``DTensor``
    shards (``accelerate launch`` exports the config's ``fsdp_version`` as ``FSDP_VERSION``). ``compile``: the
    script's ``--compile``, not run under FSDP (compiling through FSDP2's hooks is not tested here)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if compile:
        raise FSDPLaunchError("--compile is not supported under FSDP: drop --compile, or launch without FSDP.")
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise FSDPLaunchError(
            f"FSDP version {version} is not supported: set `fsdp_version: 2` in the accelerate config "
            "(accelerate_configs/fsdp.yaml has it), or launch with accelerate_configs/multi_gpu.yaml (DDP)."
        )


def fsdp_active(accelerator) -> bool:
    """True when ``accelerator.prepare`` shards the model (FSDP2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def block_classes(module: nn.Module) -> List[str]:
    """The class names of ``module``'s outermost repeated blocks: the modules held in an ``nn.ModuleList`` that have
    submodules and parameters of their own (DiT blocks; an AE's down and up stages), not looking inside one found
    (its resnets and layers gather with it), nor counting single layers or containers without a ``forward``."""
    names = set()

    def visit(m: nn.Module, in_list: bool) -> None:
        composite = next(m.children(), None) is not None and next(m.parameters(), None) is not None
        if in_list and composite and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            names.add(type(m).__name__)
            return
        for child in m.children():
            if child is not None:  # some diffusers AEs hold None placeholders in their lists
                visit(child, isinstance(m, nn.ModuleList))

    visit(module, False)
    return sorted(names)


def shard_blocks(accelerator, module: nn.Module) -> Optional[List[str]]:
    """Before ``accelerator.prepare(module)`` under FSDP with ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` and
    no ``fsdp_transformer_layer_cls_to_wrap`` in the config: shard each of :func:`block_classes` on its own (only the
    blocks of one stage are then gathered at a time). The configs stay model-agnostic; accelerate's own default,
    the root's ``_no_split_modules``, is absent on the scripts' loss modules and on most diffusers AEs, and its
    ``SIZE_BASED_WRAP`` shards ``nn.ModuleList`` containers, which ``fully_shard`` refuses. Returns the names set."""
    if not fsdp_active(accelerator):
        return None
    scalars = [name for name, p in module.named_parameters() if p.ndim == 0]
    if scalars:  # fully_shard splits dim 0 and refuses 0-d parameters
        raise FSDPLaunchError(
            f"FSDP2 cannot shard the scalar parameter {scalars[0]} (e.g. LTX-Video 0.9.1's timestep_scale_multiplier, "
            "with timestep_conditioning): launch with accelerate_configs/multi_gpu.yaml (DDP) instead."
        )
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap is not None:
        return None
    plugin.transformer_cls_names_to_wrap = block_classes(module)
    return plugin.transformer_cls_names_to_wrap


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def plain_copy(module: nn.Module, accelerator) -> Optional[nn.Module]:
    """Under FSDP, on the main process: a deep copy of ``module`` on its device (validation data and the frozen AE
    live there), made before ``accelerator.prepare`` shards it (``requires_grad`` flags, LoRA layers and frozen layers
    included); :func:`gather_into` fills it later. ``None`` on the other processes and without FSDP."""
    if not (fsdp_active(accelerator) and accelerator.is_main_process):
        return None
    return copy.deepcopy(module).to(accelerator.device)


@torch.no_grad()
def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with every ``DTensor`` gathered into a full tensor, on the CPU. Collective under
    FSDP: every process calls it (one tensor is gathered at a time, so the peak is one full tensor, not the model).
    """
    out = {}
    for name, t in module.state_dict().items():
        if _is_dtensor(t):
            t = t.full_tensor()
        out[name] = t.detach().cpu()
    return out


@torch.no_grad()
def gather_into(
    target: Optional[nn.Module], module: nn.Module, ema: Optional[EMA] = None, trainable_only: bool = False
) -> Optional[nn.Module]:
    """Fill ``target`` (a :func:`plain_copy`, or ``None`` on processes without one) with ``module``'s full weights and,
    with ``ema``, its full EMA weights in the parameters it tracks (all of them, or those with ``requires_grad`` when
    ``trainable_only``, in ``parameters()`` order as the scripts build the EMA). Collective: every process calls it.
    Returns ``target``."""
    state = full_state_dict(module)
    shadow = None
    if ema is not None:
        shadow = [s.full_tensor().cpu() if _is_dtensor(s) else s.detach().cpu() for s in ema.shadow]
    if target is None:
        return None
    target.load_state_dict(state)
    if shadow is not None:
        params = [p for p in target.parameters() if p.requires_grad or not trainable_only]
        if len(params) != len(shadow):
            raise ValueError(f"The EMA tracks {len(shadow)} tensors, the copy has {len(params)}.")
        for p, s in zip(params, shadow):
            p.copy_(s.to(p.dtype))
    return target


def save_ema_state(ema: Optional[EMA], folder: str, accelerator) -> None:
    """Save the EMA into the checkpoint ``folder`` (safetensors + JSON: :func:`~.ema.save_ema_files`): under FSDP each
    process its own shards (``ema_rank{r}.*``, with the process count), else the main process the whole EMA
    (``ema.*``). Call it on every process."""
    if ema is None:
        return
    if fsdp_active(accelerator):
        state = ema.state_dict()
        state["shadow"] = [s.to_local().cpu() if _is_dtensor(s) else s.cpu() for s in state["shadow"]]
        save_ema_files(state, folder, f"_rank{accelerator.process_index}", num_processes=accelerator.num_processes)
    elif accelerator.is_main_process:
        save_ema_files(ema.state_dict(), folder)


@torch.no_grad()
def load_ema_state(ema: Optional[EMA], folder: str, accelerator) -> None:
    """Load the EMA written by :func:`save_ema_state` on every process. An older checkpoint's
    ``custom_checkpoint_0.pkl`` is read with ``torch.load(weights_only=True)``: tensors and plain values only, so a
    crafted file cannot run code. A damaged, foreign or mismatched EMA raises a ``ValueError`` of one line; under
    FSDP the process count must be the one that saved the shards."""
    if ema is None:
        return
    fsdp = fsdp_active(accelerator)
    suffix = f"_rank{accelerator.process_index}" if fsdp else ""
    weights = os.path.join(folder, EMA_WEIGHTS.format(suffix=suffix))
    try:
        if os.path.isfile(weights):
            state = load_ema_files(folder, suffix)
        elif not fsdp and os.path.isfile(os.path.join(folder, LEGACY_EMA)):
            state = torch.load(os.path.join(folder, LEGACY_EMA), map_location="cpu", weights_only=True)
        else:
            launch = f"an FSDP run with {accelerator.num_processes} processes" if fsdp else "a run with an EMA"
            raise FileNotFoundError(f"no {os.path.basename(weights)}: it was not saved by {launch}")
    except Exception as err:
        raise ValueError(
            f"Checkpoint {folder} is damaged: its EMA cannot be loaded ({error_summary(err)}). Resume from another checkpoint "
            "(--resume_from_checkpoint latest takes the newest complete one), with the launch that wrote it."
        ) from None
    if fsdp and state.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"{folder} holds EMA shards of {state.get('num_processes')} processes and this launch has "
            f"{accelerator.num_processes}: resume with --num_processes {state.get('num_processes')}."
        )
    local = [s.to_local() if _is_dtensor(s) else s for s in ema.shadow]
    if [tuple(t.shape) for t in state["shadow"]] != [tuple(t.shape) for t in local]:
        raise ValueError(f"The EMA in {folder} does not match this model's {'shards' if fsdp else 'weights'}.")
    for s, t in zip(local, state["shadow"]):
        s.copy_(t)
    ema.half_life, ema.ramp_ratio, ema.num_updates = state["half_life"], state["ramp_ratio"], state["num_updates"]


def local_checksum(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of the parameters this process holds, in float64 (the local shards under FSDP), shape ``(1,)``."""
    parts = [(p.to_local() if _is_dtensor(p) else p).detach().double().sum() for p in parameters]
    return torch.stack(parts).sum().reshape(1)
