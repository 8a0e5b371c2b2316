"""Losses of the SE fine-tuning objective (paper eq. 2) and its Appendix C variants, and the objective itself.

Every loss here returns a per-sample tensor of shape ``(B,)``; the training loop reduces it. Images are
``(B, C, H, W)``, videos ``(B, C, T, H, W)`` in ``[-1, 1]``; video operations act on every frame (spatially).
:class:`SEAutoencoderLoss` puts them together as ``train_scripts/train_ae_se.py`` trains with them.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import autoencoders as ae
from .spectral import SOFT_PENALTY_NORMALIZATIONS, autocast_disabled, chop_high_frequencies, soft_frequency_penalty

DOWNSAMPLE_MODES = ("bilinear", "bilinear_align_corners", "bilinear_antialias", "area")


def _frames_to_batch(x: torch.Tensor):
    """``(B, C, T, H, W) -> (B * T, C, H, W)``; images pass through. Returns the tensor and an undo function."""
    if x.ndim == 4:
        return x, lambda y: y
    if x.ndim != 5:
        raise ValueError(f"Expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}.")
    b, c, t, h, w = x.shape
    flat = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)

    def undo(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')

    return flat, undo


def downsample(x: torch.Tensor, factor: int, mode: str = "bilinear") -> torch.Tensor:
    """Spatially downsample images ``(B, C, H, W)`` or every frame of videos ``(B, C, T, H, W)`` by ``factor``.

    Modes (the paper, Section 3.3, says only "x2-4 bilinear downsampling"; the authors' released code has two
    modes, ``'bil'`` and ``'mean'``, and its released configs do not say which one the paper's runs used):
        ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)``, **no** antialiasing. For
            ``factor = 2`` it equals 2x2 box averaging; for 4 it averages only the two centre pixels of each
            4-pixel cell (it aliases).
        ``bilinear_align_corners``: the authors' ``'bil'``: bilinear with ``align_corners=True``, no antialiasing.
            Output pixel ``i`` samples input position ``i * (H - 1) / (H / factor - 1)``, so the corners map onto
            the corners and the sampling grid spreads over the whole image instead of sitting at cell centres.
        ``bilinear_antialias``: bilinear with torch's antialiasing filter (a triangle stretched by ``factor``: at x4,
            weights 1, 3, 5, 7, 7, 5, 3, 1 / 32 over the 8 pixels around each 4-pixel cell).
        ``area``: box averaging of each ``factor x factor`` cell (average pooling), the authors' ``'mean'``.

    ``H`` and ``W`` must be divisible by ``factor``.
    """
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"Unknown downsampling mode {mode!r}; choose one of {DOWNSAMPLE_MODES}.")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"Downsampling factor must be a positive integer, got {factor}.")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"Spatial size {h}x{w} is not divisible by the downsampling factor {factor}.")
    flat, undo = _frames_to_batch(x)
    size = (h // factor, w // factor)
    if mode == "area":
        out = F.avg_pool2d(flat, kernel_size=factor, stride=factor)
    else:
        out = F.interpolate(
            flat,
            size=size,
            mode="bilinear",
            align_corners=mode == "bilinear_align_corners",
            antialias=mode == "bilinear_antialias",
        )
    return undo(out)


def temporal_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Causal temporal downsampling of a video ``(B, C, T, H, W)`` with ``T = 1 + factor * k``.

    As the authors' code: frame 0 is kept alone (a causal AE encodes it on its own) and the following frames are
    averaged in groups of ``factor``, giving ``1 + k`` frames. The paper reports that temporal SE did not help.
    """
    factor = int(factor)
    if factor == 1:
        return x
    if x.ndim != 5:
        raise ValueError(f"Temporal downsampling needs a video (B, C, T, H, W), got shape {tuple(x.shape)}.")
    b, c, t, h, w = x.shape
    if factor < 1 or (t - 1) % factor:
        raise ValueError(f"Temporal factor {factor} needs 1 + {factor}k frames, got {t}.")
    rest = x[:, :, 1:].reshape(b, c, (t - 1) // factor, factor, h, w).mean(dim=3)  # (B, C, k, H, W)
    return torch.cat([x[:, :, :1], rest], dim=2)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension: ``(B, ...) -> (B,)``."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


def _valid_factor_sizes(h: int, w: int, factor: int) -> str:
    lo_h, lo_w = h // factor * factor, w // factor * factor
    return f"{lo_h}x{lo_w} or {lo_h + factor}x{lo_w + factor}" if lo_h and lo_w else f"multiples of {factor}"


def scale_equivariance_loss(
    x: torch.Tensor,
    z: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    scale_factor: int = 2,
    mode: str = "bilinear",
    distance: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    temporal_factor: int = 1,
) -> torch.Tensor:
    """The scale-equivariance regulariser of paper eq. 2, ``d(down(x), Dec(down(z)))``, per sample.

    The caller multiplies it by ``alpha`` (0.25 in the paper). ``x`` and ``z`` are downsampled the same way
    (spatially, every frame for videos); the decoder sees a ``scale_factor`` times smaller latent.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, T, H, W)`` pixels.
        z: ``(B, c, h, w)`` or ``(B, c, t, h, w)`` latents of ``x`` (a posterior sample in the paper).
        decode: latents -> pixels.
        scale_factor: 2 or 4 in the paper, one per batch.
        mode: see :func:`downsample`.
        distance: per-sample ``d(pred, target) -> (B,)``; defaults to :func:`per_sample_mse`.
        temporal_factor: also downsample videos in time (:func:`temporal_downsample`); 1 (the paper) = spatial
            only. Needs ``1 + temporal_factor * k`` latent frames.

    Returns:
        ``(B,)``.
    """
    h, w = z.shape[-2:]
    if h % scale_factor or w % scale_factor:
        raise ValueError(
            f"SE scale factor {scale_factor} does not divide the latent size {h}x{w}: use latents of "
            f"{_valid_factor_sizes(h, w, scale_factor)} (the image resolution divided by the AE's spatial "
            f"compression), or drop {scale_factor} from the scale factors."
        )
    x_small = downsample(x, scale_factor, mode)
    z_small = downsample(z, scale_factor, mode)
    if temporal_factor != 1 and x.ndim == 5:
        if (z.shape[2] - 1) % temporal_factor:
            raise ValueError(
                f"Temporal SE factor {temporal_factor} needs 1 + {temporal_factor}k latent frames, got {z.shape[2]}."
            )
        x_small, z_small = temporal_downsample(x_small, temporal_factor), temporal_downsample(z_small, temporal_factor)
    recon_small = decode(z_small)
    if recon_small.shape != x_small.shape:
        raise ValueError(
            f"Decoding the downsampled latent gave shape {tuple(recon_small.shape)}, but the downsampled image "
            f"has shape {tuple(x_small.shape)}."
        )
    return (distance or per_sample_mse)(recon_small, x_small)


def chf_loss(
    x: torch.Tensor,
    z: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    ratio: float,
    block_size: int = 8,
    order: str = "zigzag",
    distance: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    pixel_block_size: Optional[int] = None,
) -> torch.Tensor:
    """Chopping-high-frequencies regulariser, the second term of paper eq. 4, per sample:
    ``d(D^-1(D(x) * M), Dec(D^-1(D(z) * M)))`` with the mask ``M`` of eq. 5 (Appendix C.1).

    The latent is cut with ``block_size`` blocks and the image with ``pixel_block_size`` blocks, by default
    ``block_size`` times the spatial compression (``x``'s width over ``z``'s: 64 for an 8x AE with 8x8 latent
    blocks), as the authors' code does: one latent block covers exactly one pixel block, so both masks keep the
    same share of the same frequency band. ``ratio`` is the share of coefficients zeroed in both.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, T, H, W)`` pixels.
        z: latents of ``x``, ``(B, c, h, w)`` or ``(B, c, t, h, w)``.
        decode: latents -> pixels.
        ratio: share of block-DCT coefficients removed (:func:`~diffusability_hf.spectral.chop_mask`).
        block_size: latent DCT block ``B``.
        pixel_block_size: pixel DCT block; default ``B * (W // w)``.

    Returns:
        ``(B,)``.
    """
    if pixel_block_size is None:
        if x.shape[-1] % z.shape[-1]:
            raise ValueError(f"Image width {x.shape[-1]} is not a multiple of the latent width {z.shape[-1]}.")
        pixel_block_size = block_size * (x.shape[-1] // z.shape[-1])
    x_chop = chop_high_frequencies(x, pixel_block_size, ratio, order)
    recon = decode(chop_high_frequencies(z, block_size, ratio, order))
    return (distance or per_sample_mse)(recon, x_chop)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` averaged over every element but the batch: ``(B, ...) -> (B,)``.

    diffusers' ``DiagonalGaussianDistribution.kl()`` sums over dims 1-3 only, which is wrong for 5D video
    latents; the paper averages the KL per element (Appendix B, Table 5's beta weights are per element).
    """
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).mean(dim=1)


# LPIPS trunks: the torchvision file names that `lpips` downloads through torchvision.
LPIPS_TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
LPIPS_MIN_SIZE = 32  # smallest side the LPIPS trunks accept
_TORCHVISION_BUILDERS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _torch_hub_checkpoint(filename: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_lpips(net: str = "alex", trunk_path: Optional[str] = None, pretrained_trunk: bool = True) -> nn.Module:
    """LPIPS (Zhang et al., 2018) with frozen weights, inputs in ``[-1, 1]``.

    The ``lpips`` package ships only its linear heads; the AlexNet/VGG/SqueezeNet trunk comes from torchvision.
    The trunk is taken from ``trunk_path`` (a torchvision state dict) when given, else from torch's hub cache;
    when it is in neither place we raise, naming the file and the folder, instead of trying to download it.
    ``pretrained_trunk=False`` builds a random trunk (tests only: the distance is then not perceptual).
    """
    import lpips

    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"Unknown LPIPS network {net!r}; choose one of {sorted(LPIPS_TRUNK_FILES)}.")
    cached = _torch_hub_checkpoint(LPIPS_TRUNK_FILES[net])
    if pretrained_trunk and trunk_path is None and not os.path.isfile(cached):
        raise FileNotFoundError(
            f"LPIPS({net}) needs torchvision's pretrained trunk '{LPIPS_TRUNK_FILES[net]}', which is not in "
            f"{os.path.dirname(cached)}. Download it on a machine with network access (e.g. "
            f"`python -c \"import torchvision; torchvision.models.{_TORCHVISION_BUILDERS[net]}(weights='DEFAULT')\"`) "
            "and copy it there, pass its path with --lpips_trunk_path, or train without LPIPS (--lpips_weight 0)."
        )
    use_cache = pretrained_trunk and trunk_path is None
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not use_cache, verbose=False)
    if pretrained_trunk and trunk_path is not None:
        if not os.path.isfile(trunk_path):
            raise FileNotFoundError(f"--lpips_trunk_path {trunk_path} does not exist (a torchvision state dict file).")
        state = torch.load(trunk_path, map_location="cpu", weights_only=True)
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        own = model.net.state_dict()
        # lpips splits torchvision's `features` into slices that keep the original layer indices.
        mapped = {key: features[key.split(".", 1)[1]] for key in own}
        model.net.load_state_dict(mapped)
    model.eval().requires_grad_(False)
    return model


class ReconstructionDistance(nn.Module):
    """``d(pred, target) = mse_weight * MSE + lpips_weight * LPIPS``, per sample (paper eq. 2's ``d``).

    Videos ``(B, C, T, H, W)`` get LPIPS per frame, averaged over frames. LPIPS is loaded only when its weight
    is positive; images smaller than 32 px are upsampled (bilinear) before LPIPS, which the trunks need. The LPIPS network is frozen but gradients flow through it to ``pred``.
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips_net: str = "alex",
        lpips_trunk_path: Optional[str] = None,
        lpips_model: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.mse_weight = float(mse_weight)
        self.lpips_weight = float(lpips_weight)
        if self.lpips_weight > 0:
            self.lpips = lpips_model if lpips_model is not None else load_lpips(lpips_net, lpips_trunk_path)
            self.lpips.eval().requires_grad_(False)
        else:
            self.lpips = None

    def lpips_distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS ``(B,)`` in float32 (autocast off: a bf16 trunk moves the distance by about 1%); per frame
        for videos."""
        pred_f, _ = _frames_to_batch(pred)
        target_f, _ = _frames_to_batch(target)
        if pred_f.shape[1] != 3:
            raise ValueError(f"LPIPS needs 3-channel RGB, got {pred_f.shape[1]} channels.")
        pred_f, target_f = pred_f.float(), target_f.float()
        if min(pred_f.shape[-2:]) < LPIPS_MIN_SIZE:
            # The trunks pool their input away below ~32 px (e.g. a x4-downsampled 64 px crop in the SE term):
            # compare bilinear upsamplings of both images instead.
            s = LPIPS_MIN_SIZE / min(pred_f.shape[-2:])
            size = (round(pred_f.shape[-2] * s), round(pred_f.shape[-1] * s))
            pred_f = F.interpolate(pred_f, size=size, mode="bilinear", align_corners=False)
            target_f = F.interpolate(target_f, size=size, mode="bilinear", align_corners=False)
        with autocast_disabled(pred_f.device):  # the frozen trunk in float32, also in a bf16 autocast training step
            d = self.lpips(pred_f, target_f).flatten()  # (B*T,)
        return d.reshape(pred.shape[0], -1).mean(dim=1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mse_weight * per_sample_mse(pred, target) if self.mse_weight else 0.0
        if self.lpips is not None:
            loss = loss + self.lpips_weight * self.lpips_distance(pred, target)
        if not torch.is_tensor(loss):
            raise ValueError("Both the MSE and the LPIPS weights are 0: the reconstruction distance is empty.")
        return loss


class SEAutoencoderLoss(nn.Module):
    """The SE fine-tuning objective of paper eq. 2 with the optional terms of Sec. 3.3 and Appendix C, per sample:

        L(x) = d(x, Dec(z)) + alpha * d(down(x), Dec(down(z)))          (eq. 2, :func:`scale_equivariance_loss`)
               + beta * KL(q(z|x) || N(0, I))                          (per element, :func:`kl_divergence`)
               + w_chf * d(D^-1(D(x) M), Dec(D^-1(D(z) M)))            (eq. 4-5, :func:`chf_loss`)
               + gamma * L_soft(z)                                     (eq. 6-7, ``spectral.soft_frequency_penalty``)

    with ``z`` a posterior sample of ``Enc(x)`` (or its mean) and ``d`` the reconstruction distance. Encode, decode
    and every branch run in one ``forward``, so that DDP and autocast see all of it. A term whose weight is 0 is not
    computed. Images go through a causal video AE as 1-frame videos.

    Args:
        vae: a diffusers autoencoder of ``autoencoders.AE_TABLE``: the trained module.
        distance: ``d(pred, target) -> (B,)``, e.g. :class:`ReconstructionDistance`. Not registered as a submodule:
            a frozen LPIPS is no part of the trained (or checkpointed) state.
        se_weight: ``alpha`` (paper: 0.25; 0 is the paper's "+FT" baseline).
        downsample_mode: how ``x`` and ``z`` are downsampled for SE (:func:`downsample`).
        kl_weight: ``beta``; skipped for deterministic encoders (no log-variance).
        chf_weight: weight of the CHF term (latents cut in ``dct_block_size`` blocks).
        soft_penalty_weight: ``gamma`` of the soft high-frequency penalty.
        soft_penalty_p: exponent ``p`` of eq. 6.
        soft_penalty_normalization: ``"authors"`` or ``"paper"`` (``spectral.soft_frequency_penalty``).
        dct_block_size: latent DCT block ``B`` of the CHF term and the soft penalty.
        latent_sampling: ``"sample"`` (a posterior sample, as the authors' code) or ``"mode"`` (the mean).
        decode_timestep, decode_noise_scale: for timestep-conditioned LTX decoders (``autoencoders.decode``).
    """

    def __init__(
        self,
        vae: nn.Module,
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        se_weight: float = 0.25,
        downsample_mode: str = "bilinear",
        kl_weight: float = 0.0,
        chf_weight: float = 0.0,
        soft_penalty_weight: float = 0.0,
        soft_penalty_p: float = 2.0,
        soft_penalty_normalization: str = "authors",
        dct_block_size: int = 8,
        latent_sampling: str = "sample",
        decode_timestep: float = 0.05,
        decode_noise_scale: float = 0.025,
    ):
        super().__init__()
        if latent_sampling not in ("sample", "mode"):
            raise ValueError(f"latent_sampling must be 'sample' or 'mode', got {latent_sampling!r}.")
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"Unknown downsampling mode {downsample_mode!r}; choose one of {DOWNSAMPLE_MODES}.")
        if soft_penalty_normalization not in SOFT_PENALTY_NORMALIZATIONS:
            raise ValueError(f"soft_penalty_normalization must be one of {SOFT_PENALTY_NORMALIZATIONS}.")
        self.vae = vae
        object.__setattr__(self, "distance", distance)  # frozen LPIPS: not part of the trained state
        self.se_weight = se_weight
        self.downsample_mode = downsample_mode
        self.kl_weight = kl_weight
        self.chf_weight = chf_weight
        self.soft_penalty_weight = soft_penalty_weight
        self.soft_penalty_p = soft_penalty_p
        self.soft_penalty_normalization = soft_penalty_normalization
        self.dct_block_size = dct_block_size
        self.latent_sampling = latent_sampling
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_noise_scale

    def decode(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``Dec(z)``; ``generator`` draws the decode noise of timestep-conditioned LTX decoders."""
        return ae.decode(self.vae, z, generator, self.decode_timestep, self.decode_noise_scale)

    def sample_losses(
        self,
        x: torch.Tensor,
        scale_factor: int,
        temporal_factor: int = 1,
        chf_ratio: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``L(x)`` of one modality, images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)``: the per-sample total
        ``(B,)`` and its terms ``{"rec", "se", "kl", "chf", "soft": (B,)}`` (those with a positive weight), unweighted."""
        if self.chf_weight > 0 and chf_ratio is None:
            raise ValueError("The CHF term needs chf_ratio, the share of DCT coefficients to cut.")

        def decode(z):
            return self.decode(z, generator)

        posterior = ae.encode(self.vae, x)
        z = posterior.sample(generator) if self.latent_sampling == "sample" else posterior.mode()
        terms = {"rec": self.distance(decode(z), x)}  # (B,)
        loss = terms["rec"]
        if self.se_weight > 0:
            terms["se"] = scale_equivariance_loss(
                x, z, decode, scale_factor, self.downsample_mode, self.distance, temporal_factor
            )
            loss = loss + self.se_weight * terms["se"]
        if self.kl_weight > 0 and posterior.logvar is not None:
            terms["kl"] = kl_divergence(posterior.mean, posterior.logvar)  # per element, also for 5D
            loss = loss + self.kl_weight * terms["kl"]
        if self.chf_weight > 0:
            terms["chf"] = chf_loss(x, z, decode, chf_ratio, self.dct_block_size, distance=self.distance)
            loss = loss + self.chf_weight * terms["chf"]
        if self.soft_penalty_weight > 0:
            terms["soft"] = soft_frequency_penalty(
                z, self.dct_block_size, self.soft_penalty_p, self.soft_penalty_normalization
            )
            loss = loss + self.soft_penalty_weight * terms["soft"]
        return loss, terms

    def forward(
        self,
        images: Optional[torch.Tensor],
        videos: Optional[torch.Tensor] = None,
        scale_factor: int = 2,
        temporal_factor: int = 1,
        chf_ratio: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The objective on a batch of images, of clips, or both (the paper's joint image + video batches).

        Args:
            images: ``(B_i, C, H, W)`` or ``None``.
            videos: ``(B_v, C, T, H, W)`` or ``None`` (video AEs).
            scale_factor: the SE downsampling factor, one per batch (paper: 2 or 4).
            temporal_factor: also downsample clips in time for SE (:func:`temporal_downsample`); 1 = spatial only.
            chf_ratio: the share of DCT coefficients the CHF term cuts (one per batch).
            generator: draws the posterior samples and the decode noise.

        Returns:
            ``(loss, terms)``: the per-sample loss ``(B_i + B_v,)``, images first (every sample counts once in its
            mean), and the batch means of the unweighted terms, detached, for logging (with ``rec_image`` and
            ``rec_video`` for joint batches).
        """
        parts = [
            (kind, self.sample_losses(x, scale_factor, temporal_factor, chf_ratio, generator))
            for kind, x in (("image", images), ("video", videos))
            if x is not None
        ]
        if not parts:
            raise ValueError("SEAutoencoderLoss needs images, videos or both.")
        loss = torch.cat([p[0] for _, p in parts])  # (B_images + B_videos,)
        terms = {k: torch.cat([p[1][k] for _, p in parts if k in p[1]]) for _, p in parts for k in p[1]}
        terms = {k: v.detach().float().mean() for k, v in terms.items()}
        if len(parts) > 1:
            terms.update({f"rec_{kind}": p[1]["rec"].detach().float().mean() for kind, p in parts})
        return loss, terms
