"""One adapter table over diffusers autoencoder classes, image and video.

Scripts never call ``vae.encode`` / ``vae.decode`` directly: they call :func:`encode` and :func:`decode` here,
which hide each class's quirks (deterministic encoders, image AEs that want 5D input, LTX's timestep-conditioned
decoder, Allegro's tiling-only code path, ...). Pixels are ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos in
``[-1, 1]``; an image given to a causal video AE is encoded as a 1-frame video and comes back 4D.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .flow import random_draw

# The toolkit's own small pretrained AutoencoderKL (trained on the scikit-image photographs), the scripts' default
EMBEDDED_AE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "embedded_ae")
COSMOS_SIGMA_DATA = 0.5  # EDMEulerScheduler's sigma_data in the Cosmos pipelines


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
    # Trains on clips (has a temporal axis); False for image AEs, including the 5D-layout QwenImage.
    video: bool = False
    # Causal video AEs encode frame 0 alone: they take 1 + m*k frames and an image is a 1-frame video. Non-causal
    # ones (Allegro) take m*k frames, k >= 1, and cannot encode a single image.
    causal: bool = True
    # Smallest latent side the decoder accepts (LTX-2's reflect padding needs 2).
    min_latent_size: int = 1
    # Note for the README's support table.
    note: str = ""


_NORM_CONV = ("norm_out", "conv_out")
AE_TABLE = {
    row.class_name: row
    for row in (
        AERow("AutoencoderKL", "image", False, "up_blocks", ("conv_norm_out", "conv_out")),
        AERow("AutoencoderKLFlux2", "image", False, "up_blocks", ("conv_norm_out", "conv_out")),
        AERow("AutoencoderDC", "image", True, "up_blocks", _NORM_CONV, True),
        AERow("AutoencoderKLQwenImage", "video", False, "up_blocks", _NORM_CONV),
        AERow("AutoencoderKLCogVideoX", "video", False, "up_blocks", _NORM_CONV, video=True),
        AERow("AutoencoderKLLTXVideo", "video", False, "up_blocks", _NORM_CONV, video=True),
        AERow("AutoencoderKLLTX2Video", "video", False, "up_blocks", _NORM_CONV, video=True, min_latent_size=2),
        AERow(
            "AutoencoderKLWan",
            "video",
            False,
            "up_blocks",
            _NORM_CONV,
            video=True,
            note="no gradient checkpointing in diffusers; its decode() clamps to [-1, 1], so saturated pixels get "
            "no gradient",
        ),
        AERow(
            "AutoencoderKLHunyuanVideo",
            "video",
            False,
            "up_blocks",
            ("conv_norm_out", "conv_out"),
            video=True,
            note="frame-wise (temporally tiled) encoding/decoding is switched off for training",
        ),
        AERow(
            "AutoencoderKLMochi",
            "video",
            False,
            "up_blocks",
            ("proj_out",),
            video=True,
            note="no decoder output norm: only `proj_out` is frozen; Mochi's pipeline never encodes, so check that "
            "your checkpoint ships encoder weights",
        ),
        AERow(
            "AutoencoderKLAllegro",
            "video",
            False,
            "up_blocks",
            ("conv_norm_out", "temp_conv_out", "conv_out"),
            video=True,
            causal=False,
            note="non-causal, 4k frames: no 1-frame images (use --image_batch_size 0); diffusers only implements "
            "its tiled path, so training calls encoder/decoder directly (same result)",
        ),
        AERow(
            "AutoencoderKLCosmos",
            "video",
            True,
            "up_blocks",
            _NORM_CONV,
            video=True,
            note="deterministic (no KL); bf16 autocast fails on CPU (avg_pool3d)",
        ),
    )
}


def supported_classes() -> List[str]:
    return sorted(AE_TABLE)


def get_row(vae_or_class_name) -> AERow:
    """The :class:`AERow` of a model, a config dict or a class name; a ``ValueError`` listing the supported ones."""
    name = vae_or_class_name if isinstance(vae_or_class_name, str) else model_class_name(vae_or_class_name)
    if name not in AE_TABLE:
        raise ValueError(
            f"Unsupported autoencoder class {name!r}. Supported classes: {', '.join(supported_classes())}."
        )
    return AE_TABLE[name]


def model_class_name(vae) -> str:
    if isinstance(vae, dict):
        return vae.get("_class_name", "")
    return type(vae).__name__


def _cfg(vae) -> dict:
    """The full config: a model's, or a config dict completed with its class's ``__init__`` defaults."""
    if not isinstance(vae, dict):
        return dict(vae.config)
    import diffusers

    cls = getattr(diffusers, vae.get("_class_name", ""), None)
    defaults = {}
    if cls is not None:
        params = inspect.signature(cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **vae}


def _log2(n: int) -> int:
    return int(round(math.log2(n)))


def _ltx_compression(cfg: dict) -> Tuple[int, int]:
    """(spatial, temporal) of LTX / LTX-2 from the encoder layout (the ``*_compression_ratio`` defaults overcount
    for 0.9.5+ and LTX-2 blocks, which downsample in space or time only)."""
    s = t = 1
    types, kinds = cfg["down_block_types"], cfg["downsample_type"]
    for i, scaled in enumerate(cfg["spatio_temporal_scaling"]):
        if not scaled:
            continue
        kind = kinds[i] if types[i] in ("LTXVideo095DownBlock3D", "LTX2VideoDownBlock3D") else "conv"
        s *= 2 if kind in ("conv", "spatial", "spatiotemporal") else 1
        t *= 2 if kind in ("conv", "temporal", "spatiotemporal") else 1
    return s * cfg["patch_size"], t * cfg["patch_size_t"]


def _cosmos_compression(cfg: dict) -> Tuple[int, int]:
    p, levels = cfg["patch_size"], len(cfg["encoder_block_out_channels"]) - 2
    s = p * 2 ** min(_log2(cfg["spatial_compression_ratio"] // p), levels)
    t = p * 2 ** min(_log2(cfg["temporal_compression_ratio"] // p), levels)
    return s, t


def compression(vae) -> Tuple[int, Optional[int]]:
    """``(spatial, temporal)`` compression from the config alone (``temporal`` is ``None`` for image AEs)."""
    cfg, name = _cfg(vae), model_class_name(vae)
    get_row(name)
    if name == "AutoencoderDC":
        return 2 ** (len(cfg["encoder_block_out_channels"]) - 1), None
    if name == "AutoencoderKLQwenImage":
        return 2 ** (len(cfg["dim_mult"]) - 1), None
    if name in ("AutoencoderKL", "AutoencoderKLFlux2"):
        return 2 ** (len(cfg["block_out_channels"]) - 1), None
    if name == "AutoencoderKLCogVideoX":
        return 2 ** (len(cfg["block_out_channels"]) - 1), int(cfg["temporal_compression_ratio"])
    if name in ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video"):
        return _ltx_compression(cfg)
    if name == "AutoencoderKLWan":
        return 2 ** (len(cfg["dim_mult"]) - 1) * (cfg["patch_size"] or 1), 2 ** sum(
            map(bool, cfg["temperal_downsample"])
        )
    if name == "AutoencoderKLHunyuanVideo":
        levels = min(_log2(cfg["spatial_compression_ratio"]), len(cfg["block_out_channels"]))
        return 2**levels, int(cfg["temporal_compression_ratio"])
    if name == "AutoencoderKLMochi":
        return math.prod(cfg["spatial_expansions"]), math.prod(cfg["temporal_expansions"])
    if name == "AutoencoderKLAllegro":
        return 2 ** (len(cfg["block_out_channels"]) - 1), 2 ** sum(map(bool, cfg["temporal_downsample_blocks"]))
    if name == "AutoencoderKLCosmos":
        return _cosmos_compression(cfg)
    raise AssertionError(name)


def spatial_compression(vae) -> int:
    """Pixels per latent position along H and W (8 for FLUX's AE), from the config."""
    return compression(vae)[0]


def temporal_compression(vae) -> Optional[int]:
    """Frames per latent frame, from the config; ``None`` for image autoencoders."""
    return compression(vae)[1] if get_row(model_class_name(vae)).video else None


def frame_multiple(vae) -> int:
    """``m`` of the frame rule: ``1 + m*k`` frames (causal) or ``m*k`` (non-causal). CogVideoX encodes in batches of
    8 frames (2 latent frames), hence ``2 * temporal`` there."""
    t = temporal_compression(vae)
    if t is None:
        raise ValueError(f"{model_class_name(vae)} is an image autoencoder: it takes no frame count.")
    return 2 * t if model_class_name(vae) == "AutoencoderKLCogVideoX" else t


def frame_rule(vae) -> str:
    """The valid frame counts in words, e.g. ``"1 + 8k"``."""
    m, causal = frame_multiple(vae), get_row(model_class_name(vae)).causal
    return f"1 + {m}k" if causal else f"{m}k (k >= 1)"


def valid_num_frames(vae, num_frames: int) -> bool:
    m, causal = frame_multiple(vae), get_row(model_class_name(vae)).causal
    return num_frames >= 1 and (num_frames - 1) % m == 0 if causal else num_frames >= m and num_frames % m == 0


def check_num_frames(vae, num_frames: int, flag: str = "--num_frames") -> None:
    """Raise a ``ValueError`` naming the valid frame counts nearest ``num_frames`` (diffusers would silently drop or
    add frames)."""
    if valid_num_frames(vae, num_frames):
        return
    m, causal = frame_multiple(vae), get_row(model_class_name(vae)).causal
    base = 1 if causal else 0
    lo = max(base + m * ((num_frames - base) // m), base + (0 if causal else m))
    near = sorted({lo, lo + m})
    raise ValueError(
        f"{flag} {num_frames} does not fit {model_class_name(vae)}: it takes {frame_rule(vae)} frames "
        f"(e.g. {' or '.join(map(str, near))})."
    )


def latent_num_frames(vae, num_frames: int) -> int:
    m = temporal_compression(vae)
    return 1 + (num_frames - 1) // m if get_row(model_class_name(vae)).causal else num_frames // m


def decoded_num_frames(vae, latent_frames: int) -> int:
    """Frames the decoder makes of ``latent_frames`` latent frames (the inverse of :func:`latent_num_frames` on
    valid frame counts): ``1 + t (T' - 1)`` for a causal autoencoder, ``t T'`` otherwise."""
    m = temporal_compression(vae)
    if m is None:
        raise ValueError(f"{model_class_name(vae)} is an image autoencoder: it decodes no frames.")
    return 1 + m * (latent_frames - 1) if get_row(model_class_name(vae)).causal else m * latent_frames


def latent_channels(vae) -> int:
    cfg = _cfg(vae)
    return int(cfg["z_dim"] if "z_dim" in cfg else cfg["latent_channels"])


@dataclass
class Posterior:
    """An encoder output: ``mean`` and ``logvar`` (``None`` for deterministic encoders), same shape."""

    mean: torch.Tensor
    logvar: Optional[torch.Tensor] = None

    @property
    def std(self) -> Optional[torch.Tensor]:
        return None if self.logvar is None else torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps``, ``eps`` drawn from ``generator`` wherever it lives (a CPU generator for CUDA latents
        draws on the CPU, as diffusers' ``randn_tensor`` does), in float32 (float64 means stay float64).

        A bf16 mean (the encoder's output under bf16 autocast) gives a float32 sample: in bf16 the noise would be
        rounded to 8 bits and the sum to the mean's spacing, which erases ``std * eps`` wherever ``|mean| >> std``
        (autocast casts the sample back for the decoder's matmuls)."""
        if self.logvar is None:
            return self.mean
        dtype = _noise_dtype(self.mean)
        noise = random_draw(torch.randn, self.mean.shape, generator, self.mean.device, dtype)
        return self.mean.to(dtype) + torch.exp(0.5 * self.logvar.to(dtype)) * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _noise_dtype(like: torch.Tensor) -> torch.dtype:
    """float32, or ``like``'s dtype where it is wider: Gaussian noise is never drawn in bf16 / fp16."""
    return torch.promote_types(like.dtype, torch.float32)


def _to_layout(x: torch.Tensor, row: AERow) -> torch.Tensor:
    if row.layout == "video" and x.ndim == 4:
        if not row.causal:
            raise ValueError(f"{row.class_name} is not causal: it cannot encode single images (1-frame videos).")
        return x.unsqueeze(2)  # (B, C, 1, H, W): an image is a 1-frame video
    if row.layout == "image" and x.ndim != 4:
        raise ValueError(f"{row.class_name} is an image autoencoder; expected (B, C, H, W), got {tuple(x.shape)}.")
    return x


def _frames_apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of ``(B, C, T, H, W)``."""
    b = x.shape[0]
    y = module(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
    return y.unflatten(0, (b, -1)).transpose(1, 2)  # (B, C', T, H, W)


def prepare_for_training(vae: nn.Module) -> nn.Module:
    """Switch off slicing, tiling and frame-wise (temporally tiled) processing: training sees whole clips."""
    for flag in ("use_slicing", "use_tiling", "use_framewise_encoding", "use_framewise_decoding"):
        if hasattr(vae, flag):
            setattr(vae, flag, False)
    return vae


def encode(vae: nn.Module, x: torch.Tensor) -> Posterior:
    """Encode pixels to a :class:`Posterior` with the layout of ``x`` (images stay 4D)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    row = get_row(vae)
    v = _to_layout(x, row)
    if row.class_name == "AutoencoderKLAllegro":  # diffusers implements only its tiled path; same maths untiled
        dist = DiagonalGaussianDistribution(_frames_apply(vae.quant_conv, vae.encoder(v)))
    else:
        dist = vae.encode(v)
        dist = dist.latent if hasattr(dist, "latent") else dist.latent_dist
    if row.deterministic:
        mean, logvar = (dist if torch.is_tensor(dist) else dist.mode()), None
    else:
        mean, logvar = dist.mean, dist.logvar
    if row.layout == "video" and x.ndim == 4:
        mean = mean.squeeze(2)
        logvar = None if logvar is None else logvar.squeeze(2)
    return Posterior(mean, logvar)


def decode(
    vae: nn.Module,
    z: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    decode_timestep: float = 0.05,
    decode_noise_scale: float = 0.025,
) -> torch.Tensor:
    """Decode latents to pixels with the layout of ``z``.

    LTX decoders with ``timestep_conditioning`` (0.9.1+) get what their pipelines give them: the latent mixed with
    ``decode_noise_scale`` of Gaussian noise (drawn from ``generator``; in raw latent space for LTX-Video, in
    normalised space for LTX-2) and ``temb = decode_timestep`` per sample. The defaults are diffusers' recommended
    0.05 / 0.025 for these models. The noise is drawn on the generator's device and mixed in float32 (bf16 noise
    of scale 0.025 would be rounded to 8 bits), then the mixture is cast back to ``z``'s dtype for the decoder.
    """
    row = get_row(vae)
    v = _to_layout(z, row)
    name = row.class_name
    if name == "AutoencoderKLAllegro":
        out = vae.decoder(_frames_apply(vae.post_quant_conv, v))
    elif name in ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video") and vae.config.timestep_conditioning:
        dtype = _noise_dtype(v)
        noise = random_draw(torch.randn, v.shape, generator, v.device, dtype)
        s, w = decode_noise_scale, v.to(dtype)
        if name == "AutoencoderKLLTX2Video":
            w = denormalize_latents(vae, (1 - s) * normalize_latents(vae, w) + s * noise)
        else:
            w = (1 - s) * w + s * noise
        v = w.to(v.dtype)
        temb = torch.full((v.shape[0],), float(decode_timestep), device=v.device, dtype=v.dtype)
        out = vae.decode(v, temb).sample
    else:
        out = vae.decode(v).sample
    if row.layout == "video" and z.ndim == 4:
        out = out.squeeze(2)
    return out


def _per_channel(values, z: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=z.dtype, device=z.device)
    return t.reshape(1, -1, *([1] * (z.ndim - 2)))


def flux2_patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return z.reshape(b, c * 4, h // 2, w // 2)


def _flux2_unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
    return z.reshape(b, c4 // 4, h * 2, w * 2)


def _cosmos_stats(values, z: torch.Tensor, channels: int) -> torch.Tensor:
    """Cosmos statistics are per (channel, latent frame): ``(1, C, T, 1, 1)`` for the first ``T`` latent frames."""
    t = torch.as_tensor(values, dtype=z.dtype, device=z.device).reshape(1, channels, -1, 1, 1)
    frames = z.shape[2] if z.ndim == 5 else 1
    t = t[:, :, :frames]
    return t if z.ndim == 5 else t[:, :, 0]


def _latent_affine(vae: nn.Module, z: torch.Tensor):
    """``(shift, scale)`` with ``normalized = (z - shift) * scale``, broadcastable to ``z`` (not for Flux2)."""
    cfg, name = vae.config, model_class_name(vae)
    scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    if name in ("AutoencoderKLQwenImage", "AutoencoderKLWan"):
        return _per_channel(cfg.latents_mean, z), 1.0 / _per_channel(cfg.latents_std, z)
    if name in ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video"):  # buffers, part of the weights
        return _per_channel(vae.latents_mean, z), scaling / _per_channel(vae.latents_std, z)
    if name == "AutoencoderKLCosmos":
        if cfg.latents_mean is None:
            return 0.0, COSMOS_SIGMA_DATA
        c = cfg.latent_channels
        return _cosmos_stats(cfg.latents_mean, z, c), COSMOS_SIGMA_DATA / _cosmos_stats(cfg.latents_std, z, c)
    if name == "AutoencoderKLCogVideoX" and cfg.invert_scale_latents:
        return 0.0, 1.0 / scaling
    if name in ("AutoencoderDC", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLAllegro"):
        return 0.0, scaling
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        return _per_channel(cfg.latents_mean, z), scaling / _per_channel(cfg.latents_std, z)
    return float(getattr(cfg, "shift_factor", None) or 0.0), scaling


def _flux2_stats(vae: nn.Module, z: torch.Tensor):
    """Batch-norm mean and std of the 2x2-patchified Flux2 latent, ``(1, 4C, 1, 1)`` each."""
    bn = vae.bn
    mean = bn.running_mean.to(z).reshape(1, -1, 1, 1)
    return mean, torch.sqrt(bn.running_var.to(z).reshape(1, -1, 1, 1) + vae.config.batch_norm_eps)


def normalize_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Map raw AE latents to the normalised space a diffusion model is trained in.

    Each class as its diffusers pipeline applies it:

    * ``AutoencoderKL`` (FLUX, SD, SDXL, SD3): ``(z - shift_factor) * scaling_factor``, or per channel
      ``(z - latents_mean) * scaling_factor / latents_std`` when the config has ``latents_mean`` / ``latents_std``.
    * ``AutoencoderDC``, ``AutoencoderKLCogVideoX``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLAllegro``:
      ``z * scaling_factor`` (CogVideoX with ``invert_scale_latents``: ``z / scaling_factor``).
    * ``AutoencoderKLLTXVideo``, ``AutoencoderKLLTX2Video``: ``(z - latents_mean) * scaling_factor / latents_std``,
      with mean and std stored as buffers in the weights, not in the config.
    * ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``: ``(z - latents_mean) / latents_std`` (config lists).
    * ``AutoencoderKLMochi``: ``(z - latents_mean) * scaling_factor / latents_std`` (config), else
      ``z * scaling_factor``.
    * ``AutoencoderKLCosmos``: ``(z - latents_mean) * 0.5 / latents_std`` with statistics per channel *and* latent
      frame (0.5 is the EDM ``sigma_data`` of its pipelines), else ``z * 0.5``.
    * ``AutoencoderKLFlux2``: batch-norm running statistics of the 2x2-patchified latent.
    """
    if model_class_name(vae) == "AutoencoderKLFlux2":
        mean, std = _flux2_stats(vae, z)
        return _flux2_unpatchify((flux2_patchify(z) - mean) / std)
    shift, scale = _latent_affine(vae, z)
    return (z - shift) * scale


def denormalize_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`."""
    if model_class_name(vae) == "AutoencoderKLFlux2":
        mean, std = _flux2_stats(vae, z)
        return _flux2_unpatchify(flux2_patchify(z) * std + mean)
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
    if not hasattr(diffusers, name):
        raise ValueError(f"diffusers {diffusers.__version__} has no {name}: upgrade it (`pip install -U diffusers`).")
    return getattr(diffusers, name)


def pretrained_config(path: str, subfolder: Optional[str] = None, revision=None, cache_dir=None) -> dict:
    """The ``config.json`` of a pretrained AE (local folder, or Hub id already in the cache), without weights.

    Raises ``FileNotFoundError`` saying what to download when it is in neither place (e.g. offline).
    """
    from diffusers import AutoencoderKL

    try:  # any ConfigMixin model class reads config.json
        config = AutoencoderKL.load_config(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        where = f"{path}" + (f" (subfolder '{subfolder}')" if subfolder else "")
        if os.path.isfile(path):
            raise FileNotFoundError(
                f"The autoencoder {path} is a file: give the diffusers model folder that holds its config.json and "
                "weights (for a single checkpoint file, convert it with diffusers' from_single_file first)."
            ) from err
        if looks_local(path) and not os.path.isdir(path):
            raise FileNotFoundError(
                f"The autoencoder folder {path} does not exist: check the path (a diffusers model folder holds a "
                "config.json and its weights)."
            ) from err
        if os.path.isdir(path):
            raise FileNotFoundError(
                f"{where} is not a diffusers model folder: it has no config.json"
                + (
                    f" (is the subfolder right? it holds: {', '.join(sorted(os.listdir(path))[:8])})"
                    if subfolder
                    else ""
                )
                + "."
            ) from err
        raise FileNotFoundError(
            f"Could not find the autoencoder {where}: it is not a local folder with a config.json and not in the "
            "Hugging Face cache. Download it where there is network access, e.g. "
            f"`hf download {path}{f' --include {subfolder}/*' if subfolder else ''} --local-dir LOCAL_DIR`, then "
            f"pass LOCAL_DIR{f' with the subfolder {subfolder}' if subfolder else ''}. ({err})"
        ) from err
    model_class(config)  # a supported class, or a ValueError listing them
    return dict(config)


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be a local path (not a Hub repo id such as ``black-forest-labs/FLUX.1-dev``)."""
    if path.startswith((".", "/", "~", "\\")) or os.path.isabs(path) or path.count("/") > 1 or "\\" in path:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(path)
    except Exception:  # not a valid repo id
        return True
    return False


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: every tensor of its ``state_dict`` (name, dtype, shape and bytes).

    Provenance of latents, pipelines and reports: a vanilla AE and its SE fine-tune share a config but not this.
    It hashes the weights as loaded (independent of the file layout: one safetensors file, shards or a variant
    loaded in the same dtype give the same hash); BLAKE2b runs at about 1 GB/s per core, so a 300 MB AE costs a
    fraction of a second.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:20]


def parse_model_spec(spec: str) -> Tuple[str, str, Optional[str]]:
    """``[LABEL=]PATH[:SUBFOLDER]`` -> ``(label, path, subfolder)``, e.g. ``flux=black-forest-labs/FLUX.1-dev:vae``.

    The label defaults to the last path component (plus the subfolder); ``:`` followed by a path separator (a Windows
    drive) is part of the path.
    """
    label, rest = "", spec
    head, sep, tail = spec.partition("=")
    if sep and not any(c in head for c in "/\\:"):
        label, rest = head, tail
    path, subfolder = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and not any(c in tail for c in "/\\"):
        path, subfolder = head, tail
    if not path:
        raise ValueError(f"Model spec {spec!r} has no path: use [LABEL=]PATH[:SUBFOLDER].")
    if not label:
        label = os.path.basename(os.path.normpath(path)) + (f"-{subfolder}" if subfolder else "")
    return label, path, subfolder


def check_model_specs(
    specs,
    resolution: int,
    num_frames: Optional[int] = None,
    revision=None,
    cache_dir=None,
    block_size=None,
    block_flag: str = "--block_size",
) -> List[tuple]:
    """Read the config of every ``[LABEL=]PATH[:SUBFOLDER]`` spec (no weights) and check that the samples fit it:
    ``resolution`` divisible by its compression, clips (``num_frames``) only for video AEs and with a valid frame
    count, images only for AEs that can encode one, and (``block_size``) latents that split into DCT blocks.

    Returns ``[(label, path, subfolder, config)]``; raises ``ValueError`` saying what to change.
    """
    models = []
    for spec in specs:
        label, path, sub = parse_model_spec(spec)
        config = pretrained_config(path, sub, revision, cache_dir)
        f = spatial_compression(config)
        if resolution % f:
            raise ValueError(
                f"--resolution {resolution} does not fit {label} (compression {f}): use a multiple of {f}."
            )
        row = get_row(config)
        if num_frames is not None:
            if not row.video:
                raise ValueError(f"{label} ({config['_class_name']}) is an image autoencoder: give it images.")
            check_num_frames(config, num_frames)
        elif row.video and not row.causal:
            raise ValueError(f"{label} ({config['_class_name']}) cannot encode single images: give it clips.")
        if block_size and (resolution // f) % block_size:
            raise ValueError(
                f"The latents of {label} are {resolution // f} px wide, not a multiple of {block_flag} {block_size}: "
                "change one of them."
            )
        models.append((label, path, sub, config))
    return models


def load_pretrained(path: str, subfolder: Optional[str] = None, revision=None, variant=None, cache_dir=None):
    """A pretrained AE of a supported class, tiling/slicing off (:func:`prepare_for_training`), in eval mode."""
    config = pretrained_config(path, subfolder, revision, cache_dir)
    vae = model_class(config).from_pretrained(
        path, subfolder=subfolder, revision=revision, variant=variant, cache_dir=cache_dir
    )
    return prepare_for_training(vae).eval().requires_grad_(False)


def load_autoencoder(
    config: dict,
    path: Optional[str] = None,
    subfolder: Optional[str] = None,
    revision=None,
    variant=None,
    cache_dir=None,
) -> nn.Module:
    """The pretrained weights at ``path``, or a random init of ``config`` when ``path`` is ``None`` (paper App. C.5:
    SE from scratch). ``config`` names the class (``_class_name``); no tiling, slicing or eval mode is set here."""
    cls = model_class(config)
    if path is None:
        return cls.from_config(config)
    return cls.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant, cache_dir=cache_dir)


def freeze_for_fine_tuning(
    vae: nn.Module, num_frozen_up_blocks: int = 0, freeze_output_layers: bool = True, freeze_encoder: bool = False
) -> List[str]:
    """Make ``vae`` trainable except what the paper freezes (App. B, Table 5: :func:`frozen_module_names`), plus the
    encoder (and ``quant_conv``) with ``freeze_encoder``; returns the frozen module names."""
    frozen = frozen_module_names(vae, num_frozen_up_blocks, freeze_output_layers)
    if freeze_encoder:
        frozen += [n for n in ("encoder", "quant_conv") if getattr(vae, n, None) is not None]
    vae.requires_grad_(True)
    for name in frozen:
        vae.get_submodule(name).requires_grad_(False)
    return frozen


def check_se_geometry(config: dict, resolution: int, scale_factors, dct_block_size: int) -> int:
    """Check that SE training crops fit the AE before any weights load (paper eq. 2: ``down(z)`` must be a whole
    latent the decoder takes): ``resolution`` divisible by the spatial compression, every scale factor dividing the
    latent side, the smallest downsampled latent at least the decoder's minimum, the latent side divisible by the DCT
    block (eq. 1, 4-7). Returns the spatial compression; raises ``ValueError`` naming the flags to change."""
    f = spatial_compression(config)
    if resolution % f:
        lo = resolution // f * f
        near = f"{lo} or {lo + f}" if lo else f"{f} or {2 * f}"
        raise ValueError(
            f"--resolution {resolution} is not divisible by the autoencoder's spatial compression {f}; use {near}."
        )
    latent = resolution // f
    for s in scale_factors:
        if latent % s:
            ok = [r for r in range(f, 4 * resolution, f) if (r // f) % math.lcm(*scale_factors) == 0]
            near = sorted(ok, key=lambda r: abs(r - resolution))[:2]
            raise ValueError(
                f"SE scale factor {s} does not divide the latent size {latent}x{latent} (resolution "
                f"{resolution} / compression {f}). Use --resolution {' or '.join(map(str, sorted(near)))}, "
                f"or change --se_scale_factors."
            )
    row = get_row(config)
    if latent // max(scale_factors) < row.min_latent_size:
        raise ValueError(
            f"{row.class_name}'s decoder needs latents of at least {row.min_latent_size}x{row.min_latent_size}, but SE "
            f"x{max(scale_factors)} makes {latent}x{latent} smaller: raise --resolution or lower "
            "--se_scale_factors."
        )
    if latent % dct_block_size:
        raise ValueError(
            f"The latent size {latent} is not divisible by --dct_block_size {dct_block_size} (spectra, CHF and "
            "the soft penalty use block DCTs): pick a block size that divides it."
        )
    return f


def check_se_video(
    config: dict,
    image_batch_size: int,
    video_batch_size: Optional[int],
    num_frames: int,
    temporal_scale_factors=None,
    video_flags=(),
) -> int:
    """Check joint image + clip SE training against the AE class (Table 5), before any weights load.

    ``video_flags``: the video-only settings given (flag names), refused for an image AE. ``temporal_scale_factors``
    must leave a downsampled clip that the AE itself takes. Returns the clips per process and micro-batch: 0 for an
    image AE, ``video_batch_size`` or half the image batch (Table 5's ratio) for a video AE.
    """
    row = get_row(config)
    name = row.class_name
    if not row.video:
        if video_flags:
            videos = ", ".join(n for n in supported_classes() if get_row(n).video)
            raise ValueError(
                f"{name} is an image autoencoder, but {', '.join(video_flags)} need a video AE ({videos})."
            )
        if image_batch_size == 0:
            raise ValueError("--train_batch_size must be positive.")
        return 0
    clips = max(1, image_batch_size // 2) if video_batch_size is None else video_batch_size
    if clips == 0 and image_batch_size == 0:
        raise ValueError("--image_batch_size and --video_batch_size are both 0: nothing to train on.")
    check_num_frames(config, num_frames)
    if not row.causal and image_batch_size > 0:
        raise ValueError(
            f"{name} is not causal (it takes {frame_rule(config)} frames): it cannot encode images as 1-frame "
            "videos. Pass --image_batch_size 0 to train on clips only."
        )
    if clips == 0 and temporal_scale_factors:
        raise ValueError("--se_temporal_scale_factors needs clips: set --video_batch_size.")
    latent_frames = latent_num_frames(config, num_frames)
    for f in temporal_scale_factors or []:
        pixels = 1 + (num_frames - 1) // f
        if not row.causal or (latent_frames - 1) % f or not valid_num_frames(config, pixels):
            raise ValueError(
                f"Temporal SE factor {f} does not fit {num_frames} frames ({latent_frames} latent frames) of "
                f"{name}: the downsampled clip must itself take {frame_rule(config)} frames. Try --num_frames "
                f"{1 + frame_multiple(config) * f} or {1 + 2 * frame_multiple(config) * f}, or drop {f}."
            )
    return clips
