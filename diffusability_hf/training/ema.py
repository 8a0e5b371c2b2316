"""Exponential moving average of weights with a half-life in optimizer steps (paper Appendix B).

The paper keeps an EMA "having a half life of 5,000 steps" (Karras et al., 2024). A half-life ``h`` means the
weight of an update halves every ``h`` steps: ``beta = 0.5 ** (1 / h)``. The authors' code also ramps the
half-life up EDM2-style, ``h_eff = min(h, ramp_ratio * step)``, so that a short run is not stuck near its
initial weights; we expose that as ``ramp_ratio`` (0.05 in their code, ``None`` to disable).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn


def ema_beta(step: int, half_life: float, ramp_ratio: Optional[float] = None) -> float:
    """EMA decay for the update made after optimizer step ``step`` (1-based).

    ``beta = 0.5 ** (1 / h_eff)`` with ``h_eff = half_life`` or, with a ramp, ``min(half_life, ramp_ratio * step)``.
    ``half_life <= 0`` (or an effective half-life of 0) gives ``beta = 0``: the EMA follows the weights.
    """
    h = float(half_life)
    if ramp_ratio is not None:
        h = min(h, float(ramp_ratio) * max(int(step), 0))
    if h <= 0:
        return 0.0
    return 0.5 ** (1.0 / h)


class EMA:
    """Float32 shadow copy of a module's trainable parameters, updated with :func:`ema_beta`.

    The training scripts save it into every checkpoint with :func:`save_ema_files` (safetensors + JSON, no pickle)
    and restore it on resume (``fsdp.save_ema_state`` / ``fsdp.load_ema_state``).
    """

    def __init__(
        self, parameters: Iterable[nn.Parameter], half_life: float = 5000.0, ramp_ratio: Optional[float] = None
    ):
        self.half_life = float(half_life)
        self.ramp_ratio = ramp_ratio
        self.shadow = [p.detach().float().clone() for p in parameters]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter], step: Optional[int] = None) -> float:
        """Blend the current parameters in; returns the beta used. ``step`` defaults to the update count."""
        self.num_updates += 1
        beta = ema_beta(self.num_updates if step is None else step, self.half_life, self.ramp_ratio)
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors but got {len(params)}.")
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - beta)
        return beta

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Write the EMA weights into ``parameters`` (in their dtype)."""
        for s, p in zip(self.shadow, list(parameters)):
            p.copy_(s.to(p.device, p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, parameters: Iterable[nn.Parameter]):
        """``with ema.swapped_in(params):`` the EMA weights in ``params`` inside the block (e.g. to validate the model
        that will be saved), the training weights back after it, exactly (also on an exception)."""
        params = list(parameters)
        backup = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> Dict:
        return {
            "half_life": self.half_life,
            "ramp_ratio": self.ramp_ratio,
            "num_updates": self.num_updates,
            "shadow": [s.clone() for s in self.shadow],
        }

    def load_state_dict(self, state: Dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}.")
        self.half_life = float(state["half_life"])
        self.ramp_ratio = state["ramp_ratio"]
        self.num_updates = int(state["num_updates"])
        self.shadow = [t.to(s.device, torch.float32).clone() for s, t in zip(self.shadow, state["shadow"])]


EMA_WEIGHTS = "ema{suffix}.safetensors"
EMA_COUNTERS = "ema{suffix}.json"


def save_ema_files(state: Dict, folder: str, suffix: str = "", **extra) -> None:
    """Write an :meth:`EMA.state_dict` into a checkpoint ``folder`` without pickle: the shadow tensors as
    ``ema{suffix}.safetensors``, the counters (and ``extra``) as ``ema{suffix}.json``. Loading a checkpoint must not
    run code, and a pickle can (a checkpoint folder may come from anywhere)."""
    import json

    from safetensors.torch import save_file

    tensors = {f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(state["shadow"])}
    save_file(tensors, os.path.join(folder, EMA_WEIGHTS.format(suffix=suffix)))
    counters = {k: state[k] for k in ("half_life", "ramp_ratio", "num_updates")}
    with open(os.path.join(folder, EMA_COUNTERS.format(suffix=suffix)), "w") as fh:
        json.dump({**counters, "num_tensors": len(tensors), **extra}, fh)


def load_ema_files(folder: str, suffix: str = "") -> Dict:
    """The state written by :func:`save_ema_files` (``shadow`` as a list of tensors, the counters, the extras)."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(folder, EMA_COUNTERS.format(suffix=suffix))) as fh:
        state = json.load(fh)
    tensors = load_file(os.path.join(folder, EMA_WEIGHTS.format(suffix=suffix)))
    if sorted(tensors) != sorted(f"shadow.{i}" for i in range(state["num_tensors"])):
        raise ValueError(f"{folder}'s EMA weights do not match its {EMA_COUNTERS.format(suffix=suffix)}.")
    state["shadow"] = [tensors[f"shadow.{i}"] for i in range(state.pop("num_tensors"))]
    return state
