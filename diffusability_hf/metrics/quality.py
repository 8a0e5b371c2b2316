"""Per-sample reconstruction metrics for images ``(N, C, H, W)`` and clips ``(N, C, T, H, W)`` in ``[-1, 1]``.

PSNR and SSIM as in the paper's Table 4 (computed in float64). Clips are scored frame by frame and the frames
averaged, so a clip and the batch of its frames give the same numbers.
"""

from __future__ import annotations

import math

import torch

PIXEL_RANGE = 2.0  # [-1, 1]


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, H, W) -> (N, T, C, H, W)``; images ``(N, C, H, W) -> (N, 1, C, H, W)``."""
    if x.ndim == 4:
        return x.unsqueeze(1)
    if x.ndim == 5:
        return x.transpose(1, 2)
    raise ValueError(f"Expected images (N, C, H, W) or clips (N, C, T, H, W), got shape {tuple(x.shape)}.")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"Shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}.")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = PIXEL_RANGE) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(R^2 / MSE)`` in dB, one value per sample.

    Args:
        pred, target: ``(N, C, H, W)`` or ``(N, C, T, H, W)``; ``data_range`` ``R`` is 2 for ``[-1, 1]``.

    Returns:
        ``(N,)`` float64. A clip's PSNR is the mean of its frames' PSNRs. Identical frames give ``inf``.
    """
    _check_pair(pred, target)
    mse = (_frames(pred).double() - _frames(target).double()).square().flatten(2).mean(2)  # (N, T)
    return (10 * torch.log10(data_range**2 / mse)).mean(1)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1D Gaussian of ``size`` taps (``scipy.ndimage.gaussian_filter`` with ``truncate=3.5`` at sigma 1.5)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _band(g: torch.Tensor, n: int) -> torch.Tensor:
    """``(n - k + 1, n)`` matrix whose rows are the window ``g`` (length ``k``) at every valid offset."""
    k = len(g)
    band = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    for i in range(n - k + 1):
        band[i, i : i + k] = g
    return band


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = PIXEL_RANGE,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) with an 11x11 Gaussian window (sigma 1.5), one value per sample.

    The mean SSIM map over valid window positions (no padding) and channels, which equals
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=R, channel_axis=-1)``. A clip's SSIM is the mean over its frames.

    Returns:
        ``(N,)`` float64.
    """
    _check_pair(pred, target)
    radius = int(3.5 * sigma + 0.5)  # scipy's truncate=3.5, as skimage
    size = 2 * radius + 1
    a, b = _frames(pred).double(), _frames(target).double()  # (N, T, C, H, W)
    n, t, c, h, w = a.shape
    if min(h, w) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {h}x{w}.")
    # The separable Gaussian blur over valid positions as two banded matrices: (h - size + 1, h) and (w', w).
    # Float64 matmuls are ~100x faster than a float64 conv2d with an 11x11 kernel on CPU.
    g = gaussian_window(size, sigma).to(a.device)
    rows, cols = _band(g, h), _band(g, w)

    def blur(x):
        return rows @ x @ cols.T  # (N, T, C, h', w')

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)  # every frame and channel has the same number of positions


def mean_and_ci(values, z: float = 1.96) -> tuple:
    """Mean and the half-width of its normal 95% confidence interval (``z * std / sqrt(n)``) of finite values."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, z * math.sqrt(var / len(vals))
