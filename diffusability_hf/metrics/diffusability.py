"""Cheap proxies of an autoencoder's diffusability: numbers its latents give in minutes on a CPU, to be ranked against
the FD of the bench's generators (``train_scripts/diffusability_score.py``, ``experiments/diffusability_score``).

Every proxy takes latents normalised as a DiT sees them (per channel, :func:`standardize`) and says which way is
"more diffusable" in :data:`PROXIES`: the direction the paper's account predicts, not one fitted to the bench."""

import math
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..flow import FlowMatchingLoss, held_out_flow_loss
from ..spectral import ac_energy_shares, chop_high_frequencies, energy_profile, share_of_high_frequencies
from .quality import psnr

# proxy -> (what it is, +1 if a higher value predicts a better generator (lower FD), -1 if lower does)
PROXIES = {
    "hf_share": ("high-frequency share of the AC energy, normalised posterior samples (Sec. 3.2)", -1),
    "spectral_slope": ("slope of log10 AC energy share against zigzag position (Fig. 2, 4)", -1),
    "rgb_profile_distance": ("mean |log10 share| gap between the latents' and RGB's spectra (Fig. 2)", -1),
    "dct_cut_slope": ("slope of PSNR (dB) against the share of latent DCT coefficients cut (Fig. 8)", +1),
    "noise_psnr": ("mean PSNR of Dec(z + s sigma_z eps) over the noise scales s", +1),
    "linear_probe": ("class accuracy of a ridge probe on 8x8-pooled latents", +1),
    "flow_loss_auc": ("held-out flow-matching loss of a short-budget DiT, mean over noise levels", -1),
    "flow_class_gain": ("that loss with the null class minus with the true class, mean over levels", +1),
}


def standardize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(z - mean) / std`` per channel (``mean``, ``std``: ``(C,)``), as the bench's DiT normalises its latents."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return (z - mean.view(shape)) / std.view(shape)


def channel_statistics(z: torch.Tensor):
    """Per-channel mean and std ``(C,)`` over samples and positions of ``z`` ``(N, C, ...)`` (float64 sums)."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1).double()
    return flat.mean(1).float(), flat.std(1).clamp_min(1e-8).float()


def spectral_proxies(z: torch.Tensor, rgb: torch.Tensor, block_size: int = 8, cutoff: float = 0.5) -> Dict:
    """The spectrum's three proxies of normalised latents ``z`` ``(N, C, h, w)`` against ``rgb`` at the latents' size.

    - ``hf_share``: :func:`~diffusability_hf.spectral.share_of_high_frequencies` (the upper ``cutoff`` of the zigzag
      order's AC energy).
    - ``spectral_slope``: least-squares slope of ``log10`` of each AC index's energy share against its zigzag position
      scaled to ``[0, 1]`` (indices 1 to ``B^2 - 1``); RGB's is steeply negative, white noise's 0. Our summary of the
      paper's Fig. 2 curves in one number.
    - ``rgb_profile_distance``: mean over AC indices of ``|log10 share_latent - log10 share_rgb|``, RGB downsampled to
      the latents' size as in Fig. 2. Shares, not eq. 1's ``|D_uv / D_00|``: a zero-mean latent's ``D_00`` is near 0.
    """
    lat, ref = energy_profile(z.float(), block_size), energy_profile(rgb.float(), block_size)
    share_lat, share_rgb = ac_energy_shares(lat)[1:], ac_energy_shares(ref)[1:]
    floor = 1e-12  # an empty index (a constant signal) counts as 1e-12 of the energy, not as -inf
    log_lat, log_rgb = share_lat.clamp_min(floor).log10(), share_rgb.clamp_min(floor).log10()
    position = torch.linspace(0, 1, len(log_lat), dtype=torch.float64)
    return {
        "hf_share": float(share_of_high_frequencies(lat, cutoff)),
        "spectral_slope": float(np.polyfit(position.numpy(), log_lat.numpy(), 1)[0]),
        "rgb_profile_distance": float((log_lat - log_rgb).abs().mean()),
    }


def fitted_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    return float(np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), 1)[0])


@torch.no_grad()
def dct_cut_curve(
    decode: Callable, z: torch.Tensor, pixels: torch.Tensor, ratios: Sequence[float], block_size: int = 8
) -> Dict:
    """Fig. 8 on latents ``z`` (as ``decode`` takes them): mean PSNR of ``decode(chop(z, ratio))`` against
    ``pixels`` per ratio, and ``dct_cut_slope``, its least-squares slope in dB per unit ratio (negative: cutting
    loses detail; nearer 0 means the high frequencies carry less of the image)."""
    curve = {}
    for ratio in ratios:
        recon = decode(chop_high_frequencies(z.float(), block_size, ratio)).float().clamp(-1, 1)
        curve[float(ratio)] = float(psnr(recon, pixels).mean())
    return {"psnr": curve, "dct_cut_slope": fitted_slope(list(curve), list(curve.values()))}


@torch.no_grad()
def noise_robustness(
    decode: Callable, z: torch.Tensor, pixels: torch.Tensor, scales: Sequence[float], generator: torch.Generator
) -> Dict:
    """PSNR of ``decode(z + s * sigma_z * eps)`` against ``pixels`` for each scale ``s`` (``sigma_z``: the per-channel
    std of ``z``; ``eps`` drawn once from ``generator`` and shared by every scale), and ``noise_psnr``, their mean. A
    decoder that maps nearby latents to nearby images is easier for a generator to land on; the probe follows the
    noisy-latent decoding of the authors' released evaluation code."""
    eps = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device)
    _, sigma = channel_statistics(z)
    sigma = sigma.to(z.device).view((1, -1) + (1,) * (z.ndim - 2))
    curve = {}
    for s in scales:
        recon = decode((z.float() + float(s) * sigma * eps)).float().clamp(-1, 1)
        curve[float(s)] = float(psnr(recon, pixels).mean())
    return {"psnr": curve, "noise_psnr": float(np.mean(list(curve.values())))}


def pooled(z: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``(N, C * size * size)``: ``z`` average-pooled to ``size x size`` (or kept, if smaller) and flattened."""
    if z.shape[-1] > size:
        z = nn.functional.adaptive_avg_pool2d(z.float(), size)
    return z.flatten(1).double()


def linear_probe_accuracy(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, ridge: float = 1.0
) -> float:
    """Accuracy on ``test`` of a ridge regression from features to one-hot labels fitted on ``train`` (closed form,
    features standardised with the training mean and std, ``ridge`` times the identity added): how linearly the
    latents separate the classes a generator must tell apart. Deterministic, seconds on a CPU."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    a, b = (train - mean) / std, (test - mean) / std
    a, b = torch.cat([a, torch.ones_like(a[:, :1])], 1), torch.cat([b, torch.ones_like(b[:, :1])], 1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    target = nn.functional.one_hot(train_labels.long(), num_classes).double()
    if a.shape[0] < a.shape[1]:  # the dual form: an n x n system
        weights = a.T @ torch.linalg.solve(a @ a.T + ridge * torch.eye(a.shape[0], dtype=a.dtype), target)
    else:
        weights = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target)
    return float(((b @ weights).argmax(1) == test_labels.long()).double().mean())


def flow_probe(
    transformer: nn.Module,
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    lr_end: float = 1e-5,
    warmup_fraction: float = 0.1,
    noise_levels: int = 10,
    seed: int = 0,
    self_conditioning_prob: float = 0.9,
    train_noise_std: Optional[torch.Tensor] = None,
    autocast: Callable = nullcontext,
) -> Dict:
    """Train ``transformer`` (fresh) on normalised latents ``train`` for ``steps`` steps as ``train_dit_flow.py`` does
    (with ``train_noise_std``, the normalised posterior std, each step draws a new posterior sample ``train + std *
    eps`` as that script does; without it ``train`` is used as it is)
    with the flow objective of App. B (label dropout 0.1 and self-conditioning, AdamW (0.9, 0.99), weight decay 0.01,
    a tenth of the steps of warmup then cosine to ``lr_end``), then its held-out loss per noise level on ``test``
    (:func:`~diffusability_hf.flow.held_out_flow_loss`). No EMA: over a few hundred steps App. B's half-life would
    average the initial weights. Returns the curves, ``flow_loss_auc`` (mean loss over the levels, which are evenly
    spaced) and ``flow_class_gain`` (mean of the null-class loss minus the loss)."""
    from ..flow import warmup_cosine

    generator = torch.Generator().manual_seed(seed)
    device = next(transformer.parameters()).device
    objective = FlowMatchingLoss(transformer, num_classes, class_dropout_prob=0.1,
                                 self_conditioning_prob=self_conditioning_prob)  # fmt: skip
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = int(warmup_fraction * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, steps, learning_rate, lr_end)
    )
    transformer.train()
    start, losses = time.perf_counter(), []
    order = torch.randperm(len(train), generator=generator)
    for step in range(steps):
        at = (step * batch_size) % len(train)
        if at + batch_size > len(train):  # a new pass: a new order
            order, at = torch.randperm(len(train), generator=generator), 0
        idx = order[at : at + batch_size]
        x0 = train[idx]
        if train_noise_std is not None:
            x0 = x0 + train_noise_std[idx] * torch.randn(x0.shape, generator=generator)
        with autocast():
            loss = objective(x0.to(device), train_labels[idx].to(device), generator).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - start
    levels = [(k + 0.5) / noise_levels for k in range(noise_levels)]
    held = held_out_flow_loss(
        transformer, test, test_labels, num_classes, levels, torch.Generator().manual_seed(seed + 1), autocast=autocast
    )
    gain = [b - a for a, b in zip(held["loss"], held["loss_null_class"])]
    return {
        **held, "class_gain": gain, "flow_loss_auc": float(np.mean(held["loss"])),
        "flow_class_gain": float(np.mean(gain)), "train_loss_last_tenth": float(np.mean(losses[-max(1, steps // 10):])),
        "steps": steps, "train_seconds": train_seconds,
    }  # fmt: skip


def predicted_ranking(scores: Dict[str, Dict[str, float]], proxy: str) -> list:
    """Labels from the most to the least diffusable by ``proxy`` (:data:`PROXIES` gives the direction); a label
    without a finite value goes last."""
    sign = PROXIES[proxy][1]

    def key(label):
        value = scores[label].get(proxy)
        return (0, -sign * value) if value is not None and math.isfinite(value) else (1, 0.0)

    return sorted(scores, key=key)


def rank_correlations(proxy_values: Sequence[float], fd_values: Sequence[float]) -> Dict[str, float]:
    """Spearman's rho and Kendall's tau-b between a proxy and generator FD (scipy), signed as they come: a proxy
    whose higher values predict better generators (:data:`PROXIES` +1) should correlate negatively with FD."""
    from scipy import stats

    rho = stats.spearmanr(proxy_values, fd_values).statistic
    tau = stats.kendalltau(proxy_values, fd_values).statistic
    return {"spearman": float(rho), "kendall": float(tau)}


def pair_agreement(
    proxy_values: Sequence[float], fd_means: Sequence[float], fd_noise: Sequence[float], sign: int, k: float = 2.0
) -> Dict[str, float]:
    """How often a proxy orders a pair of autoencoders as generator FD does, over the pairs that FD separates beyond
    its noise: ``|FD_a - FD_b| > k * sqrt(se_a^2 + se_b^2)`` with ``fd_noise`` the standard errors over seeds. A pair
    agrees when the proxy (turned by ``sign`` so that higher predicts better) is higher for the lower FD. Returns
    ``agreement`` (NaN without separated pairs) and the counts."""
    n, agree, separated = len(fd_means), 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            gap = fd_means[i] - fd_means[j]
            if abs(gap) <= k * math.sqrt(fd_noise[i] ** 2 + fd_noise[j] ** 2):
                continue
            separated += 1
            better = i if gap < 0 else j
            worse = j if better == i else i
            agree += int(sign * proxy_values[better] > sign * proxy_values[worse])
    return {"agreement": agree / separated if separated else float("nan"), "agree": agree, "separated": separated}


def bootstrap_spearman(
    proxy: np.ndarray, fd_per_seed: np.ndarray, draws: int = 2000, seed: int = 0, level: float = 0.95
) -> Dict[str, float]:
    """A percentile interval of Spearman's rho between a proxy ``(A,)`` and FD ``(A, S)`` (autoencoders x seeds),
    resampling autoencoders and, within each, seeds (FD averaged over the drawn seeds). Draws with fewer than three
    distinct autoencoders or a constant column are skipped."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    num_aes, num_seeds = fd_per_seed.shape
    values = []
    for _ in range(draws):
        aes = rng.integers(0, num_aes, num_aes)
        if len(set(aes.tolist())) < 3:
            continue
        fd = np.array([fd_per_seed[a, rng.integers(0, num_seeds, num_seeds)].mean() for a in aes])
        x = proxy[aes]
        if np.ptp(x) == 0 or np.ptp(fd) == 0:
            continue
        values.append(stats.spearmanr(x, fd).statistic)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if values else (float("nan"), float("nan"))
    return {"low": float(lo), "high": float(hi), "draws": len(values)}
