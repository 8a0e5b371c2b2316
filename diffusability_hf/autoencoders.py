"""One adapter table over diffusers autoencoder classes.

Scripts never call ``vae.encode`` / ``vae.decode`` directly: they call :func:`encode` and :func:`decode` here,
which hide each class's quirks (deterministic encoders, image AEs that want 5D input, ...). Pixels are
``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos in ``[-1, 1]``.

Latent normalisation (what a diffusion model sees) per class:

* ``AutoencoderKL`` (FLUX, SD, SDXL, SD3): ``(z - shift_factor) * scaling_factor``, or per-channel
  ``(z - latents_mean) * scaling_factor / latents_std`` when the config has ``latents_mean`` / ``latents_std``.
* ``AutoencoderDC``: ``z * scaling_factor``.
* ``AutoencoderKLQwenImage``: ``(z - latents_mean) / latents_std`` (per channel, from the config).
* ``AutoencoderKLFlux2``: batch-norm running statistics of the 2x2-patchified latent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class AERow:
    """What the toolkit needs to know about one diffusers autoencoder class."""

    class_name: str
    # Input layout the class expects: "image" = (B, C, H, W); "video" = (B, C, T, H, W) (images as 1 frame).
    layout: str
    # Deterministic encoder (no posterior variance, no KL).
    deterministic: bool
    # Decoder attribute names: the up-block list and the last output layers frozen by default (paper App. B).
    up_blocks: str
    output_layers: tuple
    # True when `decoder.up_blocks[0]` runs last (AutoencoderDC); otherwise `up_blocks[-1]` runs last.
    up_blocks_reversed: bool = False


AE_TABLE = {
    "AutoencoderKL": AERow("AutoencoderKL", "image", False, "up_blocks", ("conv_norm_out", "conv_out")),
    "AutoencoderKLFlux2": AERow("AutoencoderKLFlux2", "image", False, "up_blocks", ("conv_norm_out", "conv_out")),
    "AutoencoderDC": AERow("AutoencoderDC", "image", True, "up_blocks", ("norm_out", "conv_out"), True),
    "AutoencoderKLQwenImage": AERow("AutoencoderKLQwenImage", "video", False, "up_blocks", ("norm_out", "conv_out")),
}


def supported_classes() -> List[str]:
    return sorted(AE_TABLE)


def get_row(vae_or_class_name) -> AERow:
    """The :class:`AERow` of a model instance or class name; a ``ValueError`` listing the supported ones."""
    name = vae_or_class_name if isinstance(vae_or_class_name, str) else type(vae_or_class_name).__name__
    if name not in AE_TABLE:
        raise ValueError(
            f"Unsupported autoencoder class {name!r}. Supported classes: {', '.join(supported_classes())}."
        )
    return AE_TABLE[name]


def _cfg(vae):
    return vae.config if hasattr(vae, "config") else vae


def spatial_compression(vae) -> int:
    """Pixels per latent position along H and W (8 for FLUX's AE), from the config."""
    cfg, name = _cfg(vae), _class_name(vae)
    if name == "AutoencoderDC":
        return 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
    if name == "AutoencoderKLQwenImage":
        return 2 ** (len(cfg["dim_mult"]) - 1)
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def latent_channels(vae) -> int:
    cfg = _cfg(vae)
    return int(cfg["z_dim"] if "z_dim" in cfg else cfg["latent_channels"])


def _class_name(vae) -> str:
    if isinstance(vae, dict):
        return vae.get("_class_name", "")
    return type(vae).__name__


@dataclass
class Posterior:
    """An encoder output: ``mean`` and ``logvar`` (``None`` for deterministic encoders), same shape."""

    mean: torch.Tensor
    logvar: Optional[torch.Tensor] = None

    @property
    def std(self) -> Optional[torch.Tensor]:
        return None if self.logvar is None else torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _to_layout(x: torch.Tensor, row: AERow) -> torch.Tensor:
    if row.layout == "video" and x.ndim == 4:
        return x.unsqueeze(2)  # (B, C, 1, H, W): an image is a 1-frame video
    if row.layout == "image" and x.ndim != 4:
        raise ValueError(f"{row.class_name} is an image autoencoder; expected (B, C, H, W), got {tuple(x.shape)}.")
    return x


def encode(vae: nn.Module, x: torch.Tensor) -> Posterior:
    """Encode pixels to a :class:`Posterior` with the layout of ``x`` (images stay 4D)."""
    row = get_row(vae)
    out = vae.encode(_to_layout(x, row))
    if row.deterministic:
        mean, logvar = out.latent, None
    else:
        dist = out.latent_dist
        mean, logvar = dist.mean, dist.logvar
    if row.layout == "video" and x.ndim == 4:
        mean = mean.squeeze(2)
        logvar = None if logvar is None else logvar.squeeze(2)
    return Posterior(mean, logvar)


def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode latents to pixels with the layout of ``z``."""
    row = get_row(vae)
    out = vae.decode(_to_layout(z, row)).sample
    if row.layout == "video" and z.ndim == 4:
        out = out.squeeze(2)
    return out


def _per_channel(values, z: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=z.dtype, device=z.device)
    return t.reshape(1, -1, *([1] * (z.ndim - 2)))


def _flux2_patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return z.reshape(b, c * 4, h // 2, w // 2)


def _flux2_unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
    return z.reshape(b, c4 // 4, h * 2, w * 2)


def _latent_affine(vae: nn.Module, z: torch.Tensor):
    """``(shift, scale)`` with ``normalized = (z - shift) * scale``, broadcastable to ``z`` (not for Flux2)."""
    cfg, name = vae.config, _class_name(vae)
    if name == "AutoencoderKLQwenImage":
        return _per_channel(cfg.latents_mean, z), 1.0 / _per_channel(cfg.latents_std, z)
    scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        return _per_channel(cfg.latents_mean, z), scaling / _per_channel(cfg.latents_std, z)
    return float(getattr(cfg, "shift_factor", None) or 0.0), scaling


def _flux2_stats(vae: nn.Module, z: torch.Tensor):
    """Batch-norm mean and std of the 2x2-patchified Flux2 latent, ``(1, 4C, 1, 1)`` each."""
    bn = vae.bn
    mean = bn.running_mean.to(z).reshape(1, -1, 1, 1)
    return mean, torch.sqrt(bn.running_var.to(z).reshape(1, -1, 1, 1) + vae.config.batch_norm_eps)


def normalize_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Map raw AE latents to the normalised space a diffusion model is trained in (see the module docstring)."""
    if _class_name(vae) == "AutoencoderKLFlux2":
        mean, std = _flux2_stats(vae, z)
        return _flux2_unpatchify((_flux2_patchify(z) - mean) / std)
    shift, scale = _latent_affine(vae, z)
    return (z - shift) * scale


def denormalize_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`."""
    if _class_name(vae) == "AutoencoderKLFlux2":
        mean, std = _flux2_stats(vae, z)
        return _flux2_unpatchify(_flux2_patchify(z) * std + mean)
    shift, scale = _latent_affine(vae, z)
    return z / scale + shift


def frozen_module_names(vae: nn.Module, num_frozen_up_blocks: int = 0, freeze_output_layers: bool = True) -> List[str]:
    """Names (relative to the AE) of the decoder modules to freeze (paper Appendix B, Table 5).

    The last normalisation and output convolution, plus the ``num_frozen_up_blocks`` up-blocks nearest the output
    (Table 5: 1 for FluxAE, 3 for CMS-AE, 0 for the video AEs).
    """
    row = get_row(vae)
    names = [f"decoder.{n}" for n in row.output_layers] if freeze_output_layers else []
    ups = getattr(vae.decoder, row.up_blocks)
    if num_frozen_up_blocks > len(ups):
        raise ValueError(f"--num_frozen_up_blocks {num_frozen_up_blocks} exceeds the decoder's {len(ups)} up-blocks.")
    order = range(len(ups)) if row.up_blocks_reversed else range(len(ups) - 1, -1, -1)  # nearest output first
    names += [f"decoder.{row.up_blocks}.{i}" for i in list(order)[:num_frozen_up_blocks]]
    return names


def read_config(path_or_dir: str, subfolder: Optional[str] = None) -> dict:
    """Read a diffusers ``config.json`` from a file, a folder or a folder's ``subfolder`` (local only)."""
    path = path_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, subfolder or "", "config.json")
    with open(path) as f:
        return json.load(f)


def model_class(config: dict):
    """The diffusers class named by a config's ``_class_name``, checked against the table."""
    import diffusers

    name = config.get("_class_name")
    if name is None:
        raise ValueError("The config has no '_class_name': it is not a diffusers model config.")
    get_row(name)
    return getattr(diffusers, name)
