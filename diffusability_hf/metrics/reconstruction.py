"""An autoencoder's reconstruction and latent spectrum on fixed validation pixels, and the RGB reference spectrum.

What ``train_ae_se.py`` measures before and after SE fine-tuning: PSNR (:func:`~diffusability_hf.metrics.quality.psnr`)
of the posterior mean's reconstruction, the latents' frequency profile (paper eq. 1), energy profile and high-frequency
share, beside RGB's at the latent's spatial size (the paper's Fig. 2); cross-decoding, how far a fine-tuned latent
space moved from its base's; and :func:`before_after_record`, these numbers as ``metrics.json`` records them.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from .. import autoencoders as ae
from ..losses import downsample
from ..spectral import energy_profile, frequency_profile, high_frequency_share
from .quality import psnr


@torch.no_grad()
def reconstruction_metrics(
    vae: nn.Module,
    pixels: torch.Tensor,
    dct_block_size: int = 8,
    decode_timestep: float = 0.05,
    decode_noise_scale: float = 0.025,
    batch_size: int = 8,
    decoder: Optional[nn.Module] = None,
) -> Dict:
    """PSNR, latent profile (eq. 1), energy profile and high-frequency share of ``vae`` on fixed ``pixels``.

    Args:
        pixels: images ``(N, C, H, W)`` or clips ``(N, C, T, H, W)`` in ``[-1, 1]``; encoded to the posterior mean.
        decode_timestep, decode_noise_scale: for timestep-conditioned LTX decoders (:func:`autoencoders.decode`).
        batch_size: images per pass (clips: a quarter of it).
        decoder: decode with another AE's decoder (cross-decoding: base latents through a fine-tuned decoder).

    Returns:
        ``{"psnr", "hf_share", "profile", "energy", "recon"}`` (``recon``: the clamped reconstructions, float32, the
        shape of ``pixels``); clips also get ``"frame_profiles"``, one profile per latent frame. Decoder noise is
        seeded: every call gives the same numbers, and torch's global RNG is left as it was.
    """
    decoder = vae if decoder is None else decoder
    was_training = vae.training, decoder.training
    vae.eval()
    decoder.eval()
    recons, latents = [], []
    gen = torch.Generator(pixels.device).manual_seed(0)
    # Some decoders (LTX's noise injection) draw from torch's global RNG: seed it for this call only, so that
    # validation neither varies between calls nor shifts a training run's random stream (resume equivalence)
    with torch.random.fork_rng(devices=[pixels.device] if pixels.device.type == "cuda" else []):
        torch.manual_seed(0)
        for chunk in pixels.split(batch_size if pixels.ndim == 4 else max(1, batch_size // 4)):
            z = ae.encode(vae, chunk).mode()
            latents.append(z.float())
            recon = ae.decode(decoder, z, gen, decode_timestep, decode_noise_scale)
            recons.append(recon.float().clamp(-1, 1))
    vae.train(was_training[0])
    decoder.train(was_training[1])
    recon, z = torch.cat(recons), torch.cat(latents)
    b = dct_block_size
    result = {
        "psnr": psnr(recon, pixels).mean().item(),
        "hf_share": high_frequency_share(z, b).item(),
        "profile": frequency_profile(z, b).tolist(),
        "energy": energy_profile(z, b).tolist(),
        "recon": recon,
    }
    if z.ndim == 5:
        result["frame_profiles"] = [frequency_profile(z[:, :, k], b).tolist() for k in range(z.shape[2])]
    return result


def rgb_spectrum(pixels: torch.Tensor, compression: int, block_size: int = 8) -> Dict:
    """RGB's eq. 1 profile and energy profile at the latent's spatial size (``pixels`` area-downsampled by the AE's
    spatial ``compression``), as the paper's Fig. 2 ("RGB of the same spatial dimension")."""
    small = downsample(pixels, compression, "area")
    return {
        "profile": frequency_profile(small, block_size).tolist(),
        "energy": energy_profile(small, block_size).tolist(),
    }


def cross_decoding(
    base: nn.Module, final: nn.Module, val: Dict[str, torch.Tensor], before: Dict, after: Dict, **kwargs
) -> Dict:
    """PSNR of the base encoder's latents through the fine-tuned decoder and of the fine-tuned encoder's latents
    through the base decoder, beside base -> base and new -> new (``before`` / ``after``: the
    :func:`reconstruction_metrics` of each kind of ``val``), per kind of validation pixels. ``kwargs`` go to
    :func:`reconstruction_metrics`."""
    return {
        kind: {
            "base_encoder_base_decoder": before[kind]["psnr"],
            "base_encoder_new_decoder": reconstruction_metrics(base, pixels, decoder=final, **kwargs)["psnr"],
            "new_encoder_base_decoder": reconstruction_metrics(final, pixels, decoder=base, **kwargs)["psnr"],
            "new_encoder_new_decoder": after[kind]["psnr"],
        }
        for kind, pixels in val.items()
    }


RECORDED = ("psnr", "hf_share", "profile", "energy", "frame_profiles")  # what metrics.json keeps of a measurement


def before_after_record(
    before: Dict, after: Dict, rgb: Dict, val: Dict[str, torch.Tensor], validation: Dict, cross: Optional[Dict] = None
) -> Dict:
    """The reconstruction part of a fine-tuning run's ``metrics.json``: per kind of validation pixels ("image",
    "video"), the :func:`reconstruction_metrics` ``before`` and ``after`` (without the reconstructions), the
    :func:`rgb_spectrum`, the number of items, how they were held out (``validation[kind]``) and, with ``cross``
    (:func:`cross_decoding`), the cross-decoding PSNRs. Images at the top level, clips under ``"video"``."""
    record = {}
    for kind in val:
        entry = {
            "before": {k: before[kind][k] for k in RECORDED if k in before[kind]},
            "after": {k: after[kind][k] for k in RECORDED if k in after[kind]},
            "rgb_profile": rgb[kind]["profile"],
            "rgb_energy": rgb[kind]["energy"],
            f"num_validation_{kind}s": int(val[kind].shape[0]),
            "validation": validation.get(kind, {}),
        }
        if cross is not None:
            entry["cross_decoding_psnr"] = cross[kind]
        if kind == "image":
            record.update(entry)
        else:
            record["video"] = entry
    return record
