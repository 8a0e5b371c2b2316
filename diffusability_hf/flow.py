"""Rectified-flow training and sampling math for the latent DiT (paper Section 4, Appendix B; Esser et al., 2024).

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``): ``sigma = 1`` is pure noise, ``sigma = 0`` clean data,

    x_t = (1 - sigma) * x0 + sigma * noise,        v = d x_t / d sigma = noise - x0,

and the model predicts ``v``. A sampler integrates ``dx = v dsigma`` from ``sigma = 1`` down to ``0``, which is what
``FlowMatchEulerDiscreteScheduler.step`` does (``x + (sigma_next - sigma) * v``). The DiT sees ``sigma`` on its
0..1000 timestep scale (:func:`timesteps_from_sigmas`). :class:`FlowMatchingLoss` is the training objective built
from these functions, as ``train_scripts/train_dit_flow.py`` runs it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

SIGMA_SAMPLING_MODES = ("logit_normal", "uniform")

# Keeps sampled sigmas strictly inside (0, 1): float32 sigmoid rounds to exactly 1.0 for logits above ~17 and
# torch.rand can return exactly 0.
_SIGMA_EPS = 1e-6


def random_draw(
    sampler: Callable,
    shape,
    generator: Optional[torch.Generator],
    device: Optional[Union[str, torch.device]],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``sampler(shape)`` (``torch.randn`` / ``torch.rand``) on ``device`` from ``generator`` wherever the generator
    lives, as diffusers' ``randn_tensor`` does: a generator on another device (a CPU one for CUDA latents) draws there
    and the draw is moved, instead of torch refusing the mismatch. The numbers are the generator's either way."""
    if generator is not None and device is not None:
        device, home = torch.device(device), generator.device
        if home.type != device.type or (device.index is not None and home.index != device.index):
            return sampler(shape, generator=generator, device=home, dtype=dtype).to(device)
    return sampler(shape, generator=generator, device=device, dtype=dtype)


def sample_sigmas(
    n: int,
    mode: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Draw training noise levels ``sigma`` of shape ``(n,)`` in ``(0, 1)`` (float32).

    ``"logit_normal"``: ``sigma = sigmoid(logit_mean + logit_std * N(0, 1))``, the paper's choice (Appendix B,
    "logit-normal t"; Esser et al., 2024, Section 3.1); the paper's default is location 0 and scale 1 (Section 4.2).
    ``"uniform"``: ``sigma ~ U(0, 1)`` (plain rectified flow). Both are clamped to ``[1e-6, 1 - 1e-6]``. A
    ``generator`` on another device than ``device`` draws on its own device (the result is moved to ``device``).
    """
    if mode not in SIGMA_SAMPLING_MODES:
        raise ValueError(f"Unknown sigma sampling mode {mode!r}; choose one of {SIGMA_SAMPLING_MODES}.")
    if n < 0:
        raise ValueError(f"Number of sigmas must be non-negative, got {n}.")
    if mode == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}.")
        z = random_draw(torch.randn, (n,), generator, device)
        sigma = torch.sigmoid(logit_mean + logit_std * z)
    else:
        sigma = random_draw(torch.rand, (n,), generator, device)
    return sigma.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)


def _expand_like(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``x.ndim`` dims, so one sigma per sample broadcasts over any layout."""
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape (B,) = ({x.shape[0]},), got {tuple(sigma.shape)}.")
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Noisy sample ``x_t = (1 - sigma) * x0 + sigma * noise`` (rectified flow, Esser et al., 2024, Section 2).

    Args:
        x0: clean latents ``(B, ...)`` (images ``(B, C, H, W)`` or videos ``(B, C, T, H, W)``).
        noise: standard Gaussian noise, same shape as ``x0``.
        sigma: noise levels ``(B,)`` in ``[0, 1]``, broadcast over the trailing dims.

    Returns:
        ``x_t`` with the shape of ``x0``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape.")
    s = _expand_like(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching target ``v = d x_t / d sigma = noise - x0`` (same shape as ``x0``).

    This is the sign that ``FlowMatchEulerDiscreteScheduler.step`` integrates (``x + (sigma_next - sigma) * v``).
    """
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the predicted velocity and ``noise - x0``; returns ``(B,)`` in float32.

    Unweighted conditional flow matching (Esser et al., 2024, Section 2); the logit-normal weighting enters through
    how sigma is sampled (:func:`sample_sigmas`), not as a loss weight. Computed in float32 so that bf16 autocast
    outputs do not lose precision.
    """
    if pred.shape != x0.shape:
        raise ValueError(f"Prediction {tuple(pred.shape)} and x0 {tuple(x0.shape)} must have the same shape.")
    err = pred.float() - velocity_target(x0.float(), noise.float())
    return err.pow(2).flatten(1).mean(dim=1)


def time_shift(t: Union[torch.Tensor, float], shift: float) -> Union[torch.Tensor, float]:
    """Inference-time shift of the noise level (paper Appendix B, eq. 3, adapted from Lumina-T2X):

        t' = 1 - (1 - t) / (s + (1 - s) * (1 - t)).

    Algebraically ``t' = s * t / (1 + (s - 1) * t)``, the map ``FlowMatchEulerDiscreteScheduler(shift=s)`` applies
    to its sigmas. ``t = 1`` is pure noise, ``t = 0`` clean data; ``s = 1`` is the identity and ``s > 1`` spends more
    steps at high noise. Works on tensors of any shape and on floats.
    """
    if shift <= 0:
        raise ValueError(f"The time-shift coefficient must be positive, got {shift}.")
    return 1.0 - (1.0 - t) / (shift + (1.0 - shift) * (1.0 - t))


def timesteps_from_sigmas(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DiT timestep ``sigma * 1000`` (the 0..1000 scale of diffusers' DiT and ``FlowMatchEulerDiscreteScheduler``)."""
    return sigma * num_train_timesteps


def sampling_sigmas(num_inference_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sigma grid ``(num_inference_steps + 1,)`` from 1 to 0: uniform in ``t``, then shifted by eq. 3."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    t = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
    return time_shift(t, shift).float()


@torch.no_grad()
def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Integrate ``dx / dsigma = v(x, sigma)`` with Euler steps along ``sigmas`` (usually from 1 down to 0).

    Args:
        velocity_fn: ``velocity_fn(x, sigma_batch) -> v``, with ``x`` of the shape of ``noise`` and ``sigma_batch``
            of shape ``(B,)`` (all equal to the current sigma); for a DiT wrap it as
            ``lambda x, s: model(x, timesteps_from_sigmas(s), labels).sample``.
        noise: the starting point ``x = noise`` at ``sigmas[0]`` (usually 1), shape ``(B, ...)``.
        sigmas: strictly decreasing ``(N + 1,)`` grid, e.g. :func:`sampling_sigmas`; ``N`` model evaluations.

    Returns:
        ``x`` at ``sigmas[-1]`` (the sample when it is 0), same shape and dtype as ``noise``.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1D grid with at least 2 entries, got shape {tuple(sigmas.shape)}.")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (from noise, sigma = 1, towards data, sigma = 0).")
    x = noise
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity_fn(x, sigma.expand(x.shape[0]))
        # Same update as FlowMatchEulerDiscreteScheduler.step, accumulated in float32 then cast back.
        x = (x.float() + (sigma_next - sigma) * v.float()).to(noise.dtype)
    return x


class FlowMatchingLoss(nn.Module):
    """The class-conditional rectified-flow objective of the paper's DiT (Section 4, Appendix B), per sample.

    For clean latents ``x0`` and their labels it draws, in this order from one ``generator``: ``noise ~ N(0, I)``,
    ``sigma`` (:func:`sample_sigmas`: logit-normal, Appendix B), which labels become the null class (classifier-free
    guidance training), and, with self-conditioning, which samples keep the auxiliary pass. Then

        x_t = (1 - sigma) * x0 + sigma * noise,     loss = || v_theta(x_t, 1000 sigma, y) - (noise - x0) ||^2

    averaged per sample (:func:`interpolate`, :func:`timesteps_from_sigmas`, :func:`flow_matching_loss`). The whole
    step is one ``forward``, so that DDP and autocast see all of it; the caller reduces the ``(B,)`` loss.

    Self-conditioning (Appendix B): a no-grad auxiliary pass at the same ``x_t`` gives the last block's activations,
    which condition the main pass for a fraction ``self_conditioning_prob`` of the samples (zeros for the others).

    Args:
        transformer: a class-conditional DiT called as ``transformer(x_t, timestep, labels)`` that returns
            ``.sample`` ``(B, C or 2C, h, w)`` (the first ``C`` channels are the velocity) and, for
            self-conditioning, ``.last_hidden_state`` ``(B, N, D)`` and a ``self_cond`` keyword. Its label table
            must hold ``num_classes + 1`` rows: id ``num_classes`` is the null class.
        num_classes: the number of real classes (the null class id).
        weighting_scheme: how ``sigma`` is drawn, ``"logit_normal"`` (the paper, after SD3) or ``"uniform"``.
        logit_mean, logit_std: the logit-normal location and scale (paper: 0 and 1).
        class_dropout_prob: probability that a label is replaced by the null class, in ``[0, 1)``.
        self_conditioning_prob: probability that a sample's main pass sees the auxiliary pass, in ``[0, 1]``; 0 runs
            no auxiliary pass (a transformer without self-conditioning).
        num_train_timesteps: the DiT's timestep scale (``timestep = sigma * num_train_timesteps``).
    """

    def __init__(
        self,
        transformer: nn.Module,
        num_classes: int,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        class_dropout_prob: float = 0.1,
        self_conditioning_prob: float = 0.0,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        if weighting_scheme not in SIGMA_SAMPLING_MODES:
            raise ValueError(f"Unknown weighting scheme {weighting_scheme!r}; choose one of {SIGMA_SAMPLING_MODES}.")
        if not 0 <= class_dropout_prob < 1 or not 0 <= self_conditioning_prob <= 1:
            raise ValueError(
                f"class_dropout_prob must be in [0, 1) and self_conditioning_prob in [0, 1], got {class_dropout_prob} "
                f"and {self_conditioning_prob}."
            )
        self.transformer = transformer
        self.num_classes = num_classes
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.class_dropout_prob = class_dropout_prob
        self.self_conditioning_prob = self_conditioning_prob
        self.num_train_timesteps = num_train_timesteps

    def forward(
        self, x0: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Per-sample loss ``(B,)`` (float32) of clean latents ``x0`` ``(B, C, h, w)`` with labels ``(B,)``; the draws
        come from ``generator`` on its own device (a CPU generator also serves CUDA latents)."""
        b, device = x0.shape[0], x0.device
        noise = random_draw(torch.randn, x0.shape, generator, device, x0.dtype)
        sigma = sample_sigmas(b, self.weighting_scheme, self.logit_mean, self.logit_std, generator, device)  # (B,)
        x_t = interpolate(x0, noise, sigma)  # (B, C, h, w)
        drop = random_draw(torch.rand, (b,), generator, device) < self.class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # CFG: the null class id
        timestep = timesteps_from_sigmas(sigma, self.num_train_timesteps)
        kwargs = {}
        if self.self_conditioning_prob > 0:  # Appendix B: a no-grad auxiliary pass at the same noise level
            with torch.no_grad():
                aux = self.transformer(x_t, timestep, labels).last_hidden_state  # (B, N, D)
            keep = random_draw(torch.rand, (b,), generator, device) < self.self_conditioning_prob
            kwargs["self_cond"] = aux * keep.view(-1, 1, 1).to(aux.dtype)
        pred = self.transformer(x_t, timestep, labels, **kwargs).sample[:, : x0.shape[1]]  # learned sigma dropped
        return flow_matching_loss(pred, x0, noise)


@torch.no_grad()
def held_out_flow_loss(
    transformer: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    levels,
    generator: torch.Generator,
    batch_size: int = 64,
    autocast: Callable = contextlib.nullcontext,
    num_train_timesteps: int = 1000,
    progress: Callable = iter,
) -> dict:
    """The flow-matching loss of ``transformer`` on held-out clean latents ``x0`` (CPU, normalised as in training) at
    fixed noise levels ``sigma`` in ``levels``, with the latents' own ``labels`` and again with the null class.

    Per level, one ``noise`` for all rows from the CPU ``generator`` (so the numbers do not depend on the batch size
    or the device), ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``, per-sample MSE averaged over the
    rows. A self-conditioned transformer gets an auxiliary pass whose ``last_hidden_state`` feeds the main pass (as at
    inference). Returns ``sigma``, ``loss``, ``loss_null_class`` (lists) and ``num_samples``; ``loss_null_class -
    loss`` is what the label is worth to the model (about 0 for a class-blind one). The transformer's train/eval mode
    is restored.
    """
    device = next(transformer.parameters()).device
    n, channels = x0.shape[:2]
    self_conditioning = bool(getattr(transformer.config, "self_conditioning", False))
    was_training = transformer.training
    transformer.eval()

    def loss_sum(x_t, timestep, y, target_x0, noise):
        with autocast():
            kwargs = {}
            if self_conditioning:  # the auxiliary pass at the same noise level (App. B)
                aux = transformer(hidden_states=x_t, timestep=timestep, class_labels=y, return_dict=True)
                kwargs["self_cond"] = aux.last_hidden_state
            out = transformer(hidden_states=x_t, timestep=timestep, class_labels=y, return_dict=True, **kwargs)
        return float(flow_matching_loss(out.sample[:, :channels], target_x0, noise).double().sum())

    losses, null_losses = [], []
    try:
        for sigma in progress(levels):
            noise_all = torch.randn(x0.shape, generator=generator)
            total, total_null = 0.0, 0.0
            for start in range(0, n, batch_size):
                x = x0[start : start + batch_size].to(device)
                noise = noise_all[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].to(device)
                s = torch.full((x.shape[0],), sigma, device=device)
                x_t = interpolate(x, noise, s).to(transformer.dtype)
                timestep = timesteps_from_sigmas(s, num_train_timesteps)
                total += loss_sum(x_t, timestep, y, x, noise)
                total_null += loss_sum(x_t, timestep, torch.full_like(y, num_classes), x, noise)
            losses.append(total / n)
            null_losses.append(total_null / n)
    finally:
        transformer.train(was_training)
    return {"sigma": list(levels), "loss": losses, "loss_null_class": null_losses, "num_samples": int(n)}


def warmup_cosine(step: int, warmup: int, total: int, peak: float, end: float) -> float:
    """App. B's schedule as a factor of ``peak``: linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine
    decay to ``end`` at ``total`` steps. For ``LambdaLR``; under accelerate the scheduler steps once per process per
    optimizer step, so pass ``warmup`` and ``total`` times the process count (as diffusers' examples do)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))) / peak
