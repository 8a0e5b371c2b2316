"""Re-estimate an autoencoder's latent normalisation after fine-tuning, in its own class's convention.

A diffusion model does not see raw latents: diffusers' pipelines normalise them with the statistics stored with
the AE (``scaling_factor`` / ``shift_factor``, ``latents_mean`` / ``latents_std`` in the config, or as buffers for
LTX; see :mod:`diffusability_hf.autoencoders`). SE fine-tuning moves the latent statistics (embedded AE, 128 px
crops: latent std 0.764 -> 0.975), so a fine-tuned AE that keeps the base's values hands every trainer that
normalises with them mis-scaled latents. :func:`estimate_latent_normalization` computes new values from latents of
the training data, in the same form as the base's (global shift/scale stays global, per-channel stays per
channel), such that ``normalize_latents`` maps those latents to mean 0 and standard deviation 1 where the form
allows a shift (scale only: standard deviation 1).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.nn as nn

from diffusability_hf.autoencoders import encode, model_class_name, normalize_latents

logger = logging.getLogger(__name__)

SCALE_ONLY = ("AutoencoderDC", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLAllegro")
CONFIG_LISTS = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
BUFFERS = ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video")


def _channel_stats(z: torch.Tensor):
    """Per-channel mean and std (float64) of ``(N, C, ...)`` latents."""
    flat = z.double().transpose(0, 1).flatten(1)  # (C, N * positions)
    return flat.mean(1), flat.std(1, correction=0)


def _values(x) -> list:
    return [round(float(v), 6) for v in torch.as_tensor(x).flatten()]


def current_latent_normalization(vae: nn.Module) -> Dict:
    """The normalisation fields the AE holds now, as plain numbers (for ``metrics.json`` and the model card)."""
    cfg, name = vae.config, model_class_name(vae)
    out = {}
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "invert_scale_latents"):
        value = getattr(cfg, key, None)
        if value is not None:
            out[key] = value if isinstance(value, (bool, int, float)) else _values(value)
    if name in BUFFERS:
        out.update(latents_mean=_values(vae.latents_mean), latents_std=_values(vae.latents_std))
    if name == "AutoencoderKLFlux2":
        out.update(bn_running_mean=_values(vae.bn.running_mean), bn_running_var=_values(vae.bn.running_var))
    return out


@torch.no_grad()
def estimate_latent_normalization(vae: nn.Module, z: torch.Tensor) -> Optional[Dict]:
    """New normalisation fields for ``vae`` from raw latents ``z`` ``(N, C, H, W)`` or ``(N, C, T, H, W)``.

    Returns ``{"config": {...}, "buffers": {...}, "form": str}`` to pass to :func:`apply_latent_normalization`, or
    ``None`` for a class whose statistics this toolkit does not re-estimate (``AutoencoderKLCosmos``: per channel
    *and* latent frame). The form follows the base's: ``AutoencoderKL`` with a ``shift_factor`` (FLUX) gets the
    global mean as shift and ``1 / std`` as scale; without one (SD) only the scale; with per-channel
    ``latents_mean`` / ``latents_std`` (and a kept ``scaling_factor``) per-channel values; the scale-only classes
    (CogVideoX, DC, Hunyuan, Allegro) ``1 / std`` (CogVideoX with ``invert_scale_latents``: ``std``); Wan and Qwen
    per-channel config lists; LTX per-channel buffers (``latents_std`` absorbs ``scaling_factor``); Flux2 its
    batch-norm running statistics of the 2x2-patchified latent.
    """
    cfg, name = vae.config, model_class_name(vae)
    z = z.double()
    std = float(z.std(correction=0))
    mean = float(z.mean())
    scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    if name == "AutoencoderKLCosmos":
        return None
    if name == "AutoencoderKLFlux2":
        from diffusability_hf.autoencoders import flux2_patchify

        m, s = _channel_stats(flux2_patchify(z))
        var = (s.square() - cfg.batch_norm_eps).clamp_min(1e-12)
        return {"config": {}, "buffers": {"bn.running_mean": m, "bn.running_var": var}, "form": "batch-norm stats"}
    if name in BUFFERS:
        m, s = _channel_stats(z)
        return {"config": {}, "buffers": {"latents_mean": m, "latents_std": s * scaling}, "form": "per channel"}
    if name in CONFIG_LISTS:
        m, s = _channel_stats(z)
        return {
            "config": {"latents_mean": _values(m), "latents_std": _values(s)},
            "buffers": {},
            "form": "per channel",
        }
    per_channel_config = (
        getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None
    )
    if name not in SCALE_ONLY and per_channel_config:  # AutoencoderKL with lists, Mochi
        m, s = _channel_stats(z)
        lists = {"latents_mean": _values(m), "latents_std": _values(s * scaling)}
        return {"config": lists, "buffers": {}, "form": "per channel"}
    if name == "AutoencoderKLCogVideoX" and getattr(cfg, "invert_scale_latents", False):
        return {"config": {"scaling_factor": round(std, 6)}, "buffers": {}, "form": "global scale (inverted)"}
    if name in SCALE_ONLY or getattr(cfg, "shift_factor", None) is None:
        return {"config": {"scaling_factor": round(1.0 / std, 6)}, "buffers": {}, "form": "global scale"}
    config = {"shift_factor": round(mean, 6), "scaling_factor": round(1.0 / std, 6)}
    return {"config": config, "buffers": {}, "form": "global shift and scale"}


@torch.no_grad()
def apply_latent_normalization(vae: nn.Module, estimate: Dict) -> None:
    """Write an :func:`estimate_latent_normalization` result into ``vae`` (config and buffers; saved with it)."""
    if estimate["config"]:
        vae.register_to_config(**estimate["config"])
    for path, value in estimate["buffers"].items():
        module_path, _, attr = path.rpartition(".")
        owner = vae.get_submodule(module_path) if module_path else vae
        getattr(owner, attr).copy_(value.to(getattr(owner, attr)))


@torch.no_grad()
def normalized_std(vae: nn.Module, z: torch.Tensor) -> float:
    """The standard deviation of ``normalize_latents(vae, z)``: 1 when the stored statistics fit these latents."""
    return float(normalize_latents(vae, z.float()).double().std(correction=0))


@torch.no_grad()
def training_latents(
    vae: nn.Module, dataset, num_samples: int, seed: int, device, batch_size: int = 8
) -> torch.Tensor:
    """Posterior samples (seeded by ``seed``) of the first ``num_samples`` items of a training ``dataset`` (items
    with ``"pixel_values"``); ``(N, C, h, w)`` or ``(N, C, t, h, w)`` float32 on the CPU."""
    n = min(len(dataset), num_samples)
    gen = torch.Generator(device).manual_seed(seed)
    was_training = vae.training
    vae.eval()
    out = []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(n, start + batch_size))]).to(device)
        out.append(encode(vae, x).sample(gen).float().cpu())
    vae.train(was_training)
    return torch.cat(out)


def reestimate_latent_normalization(vae: nn.Module, z: torch.Tensor, kind: str, keep_base: bool = False) -> Dict:
    """Re-estimate ``vae``'s latent normalisation on its training latents ``z`` and apply it (or, with ``keep_base``,
    only record what it would be); returns the record for ``metrics.json`` and the model card.

    The record: ``num_samples`` and ``kind`` ("images" or "clips") of ``z``, their raw mean and std, the normalised
    std with the base's and with the saved values (:func:`normalized_std`), ``reestimated`` with its ``form`` or the
    ``reason`` it was not (and ``would_be``), and the ``saved`` fields (:func:`current_latent_normalization`).
    """
    record = {
        "num_samples": int(z.shape[0]),
        "kind": kind,
        "latent_mean": float(z.double().mean()),
        "latent_std": float(z.double().std(correction=0)),
        "normalized_std_with_base_values": normalized_std(vae, z),
    }
    estimate = estimate_latent_normalization(vae, z)
    if estimate is None:
        record.update(reestimated=False, reason=f"{type(vae).__name__}'s statistics are not re-estimated")
        logger.warning(f"{type(vae).__name__}: latent normalisation kept as the base's (not re-estimated here).")
    elif keep_base:
        record.update(reestimated=False, reason="--keep_base_latent_scaling", would_be=estimate["config"])
    else:
        apply_latent_normalization(vae, estimate)
        record.update(reestimated=True, form=estimate["form"])
    record["normalized_std_with_saved_values"] = normalized_std(vae, z)
    record["saved"] = current_latent_normalization(vae)
    logger.info(
        f"Latent normalisation ({'re-estimated' if record['reestimated'] else 'kept'}): normalised latent std "
        f"{record['normalized_std_with_base_values']:.3f} with the base's values, "
        f"{record['normalized_std_with_saved_values']:.3f} with the saved ones"
    )
    return record
