"""Block DCT spectra of images and latents (paper Section 3.1, eq. 1, and Appendix C, eq. 4-7).

Conventions shared by the whole toolkit:

* the DCT is the orthonormal type-II transform applied to non-overlapping ``B x B`` blocks of the last two
  dimensions (``H``, ``W``) of a tensor;
* a coefficient ``D[..., u, v]`` has ``u`` the vertical (row) frequency and ``v`` the horizontal one;
* videos ``(N, C, T, H, W)`` are analysed per frame: every leading dimension is a batch dimension;
* zigzag order is JPEG's (Wallace, 1991), from ``D[0, 0]`` to ``D[B-1, B-1]``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


@functools.lru_cache(maxsize=32)
def _dct_matrix_f64(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]  # frequency (row)
    i = torch.arange(n, dtype=torch.float64)[None, :]  # position (column)
    mat = torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    mat[0] *= math.sqrt(1.0 / n)
    mat[1:] *= math.sqrt(2.0 / n)
    return mat


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C`` of size ``(n, n)`` (paper Section 3.1).

    ``C[k, i] = alpha(k) cos(pi (2i + 1) k / (2n))`` with ``alpha(0) = sqrt(1/n)`` and ``alpha(k) = sqrt(2/n)``,
    so ``C @ C.T = I`` and the 1D DCT of a column vector ``a`` is ``C @ a``.
    """
    if n < 1:
        raise ValueError(f"DCT size must be a positive integer, got {n}.")
    return _dct_matrix_f64(int(n)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _kron_dct_f64(n: int) -> torch.Tensor:
    c = _dct_matrix_f64(n)
    return torch.kron(c, c)


def _kron_dct(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``kron(C, C)``: the 2D DCT of a row-major flattened ``n x n`` block as one ``(n^2, n^2)`` matrix."""
    return _kron_dct_f64(int(n)).to(dtype=dtype, device=device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision DCTs lose the small high-frequency coefficients we want to measure.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_disabled(device: torch.device):
    """A context in which autocast is off on ``device`` (a no-op where it is not on, or for devices without autocast,
    such as ``meta``): float32 code stays float32 under a training loop's bf16 autocast, which would otherwise run its
    matmuls and convolutions in bf16 whatever the dtype of their inputs."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # no autocast for this device type
        pass
    return contextlib.nullcontext()


def _check_blocks(x: torch.Tensor, block_size: int) -> None:
    if x.ndim < 2:
        raise ValueError(f"Expected a tensor with at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}.")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    h, w = x.shape[-2:]
    if h % block_size or w % block_size:
        raise ValueError(
            f"Spatial size {h}x{w} is not divisible by the DCT block size {block_size}: crop or resize to a "
            f"multiple of {block_size} (e.g. {h // block_size * block_size}x{w // block_size * block_size}), "
            "or pick a block size that divides both."
        )


def blockwise_dct2d(x: torch.Tensor, block_size: int = 8) -> torch.Tensor:
    """Orthonormal 2D DCT-II of every ``B x B`` block (paper Section 3.1).

    Args:
        x: ``(..., H, W)``, ``H`` and ``W`` divisible by ``block_size``.
        block_size: ``B``.

    Returns:
        ``(..., H // B, W // B, B, B)`` coefficients, ``[..., u, v]`` with ``u`` vertical and ``v`` horizontal.
        Computed in float32 (float64 for float64 inputs) as ``C @ block @ C.T``, evaluated for all blocks at once as
        one matrix product with ``kron(C, C)`` (no Python loop over blocks), also under autocast (which would run
        the product in bf16).
    """
    _check_blocks(x, block_size)
    *lead, h, w = x.shape
    b = block_size
    blocks = x.to(_compute_dtype(x)).reshape(*lead, h // b, b, w // b, b).transpose(-3, -2)  # (..., H/B, W/B, B, B)
    # D = C A C^T as one (B^2 x B^2) product on flattened blocks: vec(D) = kron(C, C) vec(A) (row-major vec)
    with autocast_disabled(x.device):
        flat = blocks.reshape(*lead, h // b, w // b, b * b) @ _kron_dct(b, blocks.dtype, x.device).T
    return flat.reshape(*lead, h // b, w // b, b, b)


def blockwise_idct2d(coeffs: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`blockwise_dct2d`: ``(..., H//B, W//B, B, B) -> (..., H, W)``, in the dtype of
    ``coeffs``, computed as :func:`blockwise_dct2d` is (float32, float64 for float64; autocast off)."""
    if coeffs.ndim < 4 or coeffs.shape[-1] != coeffs.shape[-2]:
        raise ValueError(f"Expected (..., H//B, W//B, B, B) coefficients, got shape {tuple(coeffs.shape)}.")
    *lead, nh, nw, b, _ = coeffs.shape
    dtype = _compute_dtype(coeffs)
    with autocast_disabled(coeffs.device):
        flat = coeffs.to(dtype).reshape(*lead, nh, nw, b * b) @ _kron_dct(b, dtype, coeffs.device)  # A = C^T D C
    return flat.reshape(*lead, nh, nw, b, b).transpose(-3, -2).reshape(*lead, nh * b, nw * b).to(coeffs.dtype)


@functools.lru_cache(maxsize=32)
def _zigzag_list(block_size: int) -> tuple:
    order = []
    for s in range(2 * block_size - 1):  # anti-diagonal u + v = s
        rows = range(max(0, s - block_size + 1), min(s, block_size - 1) + 1)
        # JPEG: odd diagonals run down-left (row increasing), even ones up-right (row decreasing).
        rows = rows if s % 2 == 1 else reversed(rows)
        order.extend(u * block_size + (s - u) for u in rows)
    return tuple(order)


def zigzag_order(block_size: int = 8) -> torch.Tensor:
    """JPEG zigzag order: a LongTensor of shape ``(B * B,)`` whose entry ``k`` is the flat index ``u * B + v``
    of the ``k``-th coefficient (``u`` the row/vertical frequency). For ``B = 8`` it is the standard JPEG table.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    return torch.tensor(_zigzag_list(int(block_size)), dtype=torch.long)


def zigzag_rank(block_size: int = 8) -> torch.Tensor:
    """``(B, B)`` LongTensor with ``zigzag(u, v)``, the rank of ``D[u, v]`` in zigzag order (paper eq. 5)."""
    order = zigzag_order(block_size)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank.reshape(block_size, block_size)


def _flat_zigzag(coeffs: torch.Tensor) -> torch.Tensor:
    """``(..., B, B) -> (..., B * B)`` in zigzag order."""
    b = coeffs.shape[-1]
    return coeffs.flatten(-2)[..., zigzag_order(b).to(coeffs.device)]


def _check_media(x: torch.Tensor) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"Expected images (N, C, H, W) or videos (N, C, T, H, W), got shape {tuple(x.shape)}.")


def frequency_profile(x: torch.Tensor, block_size: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """The paper's frequency profile (eq. 1): normalised amplitudes ``|D_uv / D_00|`` in zigzag order.

    Args:
        x: images ``(N, C, H, W)`` or videos ``(N, C, T, H, W)`` (2D DCT of each frame).
        block_size: DCT block size ``B``.
        eps: floor for the denominator.

    Returns:
        ``(B * B,)`` float32 profile; entry 0 is 1 unless a whole signal is zero.

    Estimator: within each (sample, channel[, frame]) signal we take the ratio of block means,
    ``mean_blocks |D_uv| / mean_blocks |D_00|``, then average these over samples, channels and frames. Latent
    channels are roughly zero-mean, so individual latent blocks have ``D_00`` near 0 and the per-block ratio of
    eq. 1 is heavy-tailed (one near-zero block dominates the average, or gives inf/NaN). The ratio of means
    equals eq. 1 whenever ``|D_00|`` is constant over a signal's blocks, is never NaN or inf (the denominator is
    floored at ``eps``, and an all-zero signal gives a zero row), and weighs every signal equally regardless of
    its scale, as the paper's normalisation intends.
    """
    _check_media(x)
    amp = blockwise_dct2d(x, block_size).abs()  # (N, C, [T,] H/B, W/B, B, B)
    amp = amp.flatten(x.ndim - 2, x.ndim - 1).mean(dim=-3)  # (N, C, [T,] B, B): mean over blocks
    amp = _flat_zigzag(amp)  # (N, C, [T,] B*B)
    ratio = amp / amp[..., :1].clamp_min(eps)
    return ratio.reshape(-1, block_size * block_size).mean(dim=0).float()


def energy_profile(x: torch.Tensor, block_size: int = 8) -> torch.Tensor:
    """Mean DCT energy ``E[D_uv ** 2]`` in zigzag order, averaged over samples, channels, frames and blocks.

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, T, H, W)``.

    Returns:
        ``(B * B,)`` float32. By Parseval (orthonormal DCT) its sum is ``B ** 2`` times the mean of ``x ** 2``.
    """
    _check_media(x)
    energy = blockwise_dct2d(x, block_size).square()
    return _flat_zigzag(energy).reshape(-1, block_size * block_size).mean(dim=0).float()


def high_frequency_share(x: torch.Tensor, block_size: int = 8, cutoff: float = 0.5) -> torch.Tensor:
    """Scalar share of the AC energy that lies in the high-frequency part of the zigzag order.

    Definition: with ``E_k`` the :func:`energy_profile` in zigzag order and ``K = ceil(cutoff * B ** 2)``,
    ``share = sum_{k >= K} E_k / sum_{k >= 1} E_k``. The DC term is left out so that a latent channel's offset
    (``shift_factor``) does not dilute the share. With the default ``cutoff = 0.5`` it is the energy share of
    the upper half of the zigzag spectrum: ``~0.5`` for white noise, a few percent for natural RGB images;
    the SE regularisation (paper Section 3.3) lowers it for latents. Cheap: one block DCT. Returns a 0-d
    float32 tensor (0 when the signal has no AC energy).
    """
    return share_of_high_frequencies(energy_profile(x, block_size), cutoff)


def share_of_high_frequencies(energy: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """:func:`high_frequency_share` from an :func:`energy_profile` ``(B * B,)`` (e.g. one summed over batches)."""
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff must be in (0, 1), got {cutoff}.")
    energy = torch.as_tensor(energy)
    k = max(1, math.ceil(cutoff * energy.numel()))
    ac = energy[1:].sum()
    # AC energy at rounding level (a constant signal) counts as none: 1e-10 of the total is far below any real AC.
    has_ac = ac > 1e-10 * energy.sum()
    return torch.where(has_ac, energy[k:].sum() / ac.clamp_min(torch.finfo(ac.dtype).tiny), torch.zeros_like(ac))


def ac_energy_shares(energy: torch.Tensor) -> torch.Tensor:
    """Each zigzag index's share of the AC energy, from an :func:`energy_profile` ``(B * B,)``.

    ``share_k = E_k / sum_{j >= 1} E_j`` for ``k >= 1`` and ``share_0 = 0`` (the DC term is left out, as in
    :func:`high_frequency_share`, so entry ``k`` is zigzag index ``k`` and the entries sum to 1). Unlike the
    paper's eq. 1 it does not divide by the near-zero DC of zero-mean latents, so autoencoders compare directly.
    Returns float64 ``(B * B,)``; all zeros when the signal has no AC energy.
    """
    energy = torch.as_tensor(energy, dtype=torch.float64).flatten()
    ac = energy[1:].sum()
    shares = torch.zeros_like(energy)
    if ac > 1e-10 * energy.sum():  # as share_of_high_frequencies: rounding-level AC (a constant signal) is none
        shares[1:] = energy[1:] / ac
    return shares


def chop_mask(block_size: int, ratio: float, order: str = "zigzag") -> torch.Tensor:
    """Binary ``(B, B)`` mask ``M`` of paper eq. 5 that keeps the low frequencies.

    ``order="zigzag"``: keep the first ``K = floor((1 - ratio) * B ** 2)`` coefficients in zigzag order,
    ``M[u, v] = 1 iff zigzag(u, v) < K`` (eq. 5 with ``N = B ** 2 - K``). ``order="axis"`` (Table 6's non-zigzag
    ablation): cut each axis independently, keeping ``u < K`` and ``v < K`` with ``K = floor((1 - ratio) * B)``.
    The paper does not say how ``N`` is rounded; the floor of the kept count is the authors' released code's
    (``int((1 - cut_ratio) * B * B)``), so a ratio cuts at least its share.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
    if order == "zigzag":
        keep = int((1.0 - ratio) * block_size * block_size)
        return (zigzag_rank(block_size) < keep).float()
    if order == "axis":
        keep = int((1.0 - ratio) * block_size)
        idx = torch.arange(block_size)
        return ((idx[:, None] < keep) & (idx[None, :] < keep)).float()
    raise ValueError(f"order must be 'zigzag' or 'axis', got {order!r}.")


def chop_high_frequencies(x: torch.Tensor, block_size: int = 8, ratio: float = 0.5, order: str = "zigzag"):
    """``D^-1(D(x) * M)`` of paper eq. 4: zero the highest block-DCT frequencies of ``x``.

    Args:
        x: ``(..., H, W)`` images, videos (per frame) or latents.
        block_size: ``B``.
        ratio: share of coefficients removed (see :func:`chop_mask` for ``order``).

    Returns:
        A tensor of the shape and dtype of ``x``. Differentiable.
    """
    mask = chop_mask(block_size, ratio, order).to(device=x.device)
    coeffs = blockwise_dct2d(x, block_size)
    return blockwise_idct2d(coeffs * mask.to(coeffs.dtype)).to(x.dtype)


SOFT_PENALTY_NORMALIZATIONS = ("authors", "paper")


def soft_penalty_weights(block_size: int = 8, p: float = 2.0, normalization: str = "authors") -> torch.Tensor:
    """The ``(B, B)`` weights ``W_uv`` of the soft high-frequency penalty (Appendix C.2).

    ``"paper"``: eq. 6 as printed, ``W_uv = (u + v) ** p / B ** p``. ``"authors"``: the authors' released code,
    ``W_uv = ((u + v) / (B - 1)) ** p / 4`` (0 at DC, 1 at the highest frequency ``u = v = B - 1``).
    """
    if normalization not in SOFT_PENALTY_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {SOFT_PENALTY_NORMALIZATIONS}, got {normalization!r}.")
    idx = torch.arange(block_size, dtype=torch.float32)
    freq = idx[:, None] + idx[None, :]  # u + v
    if normalization == "paper":
        return freq.pow(p) / float(block_size) ** p
    return (freq / max(1, block_size - 1)).pow(p) / 4.0


def soft_frequency_penalty(
    z: torch.Tensor, block_size: int = 8, p: float = 2.0, normalization: str = "authors"
) -> torch.Tensor:
    """Soft high-frequency penalty of paper eq. 6-7 on the amplitudes ``|D_uv(z)|``, per sample.

    ``normalization="authors"`` (the default): the authors' released code, the **mean** over every coefficient of
    every block (and channel and frame) of ``|D_uv| * ((u + v) / (B - 1)) ** p / 4``. The paper's gamma values
    (Table 7, "a small coefficient (e.g., 0.01)") were found with that code, so with this default gamma means what
    the paper means. ``normalization="paper"``: eq. 6-7 as printed, the **sum** over each block of
    ``|D_uv| * (u + v) ** p / B ** p``, averaged over blocks, channels and frames: ``4 B^2 (B - 1)^p / B^p`` times
    the authors' value (196x at ``B = 8, p = 2``), so a gamma tuned for one is wrong for the other.

    Eq. 7 writes ``D_uv`` without the absolute value; a signed sum can be lowered by flipping signs, so both
    penalise the amplitude (as the authors' code does). The paper does not state ``p``; ``p = 2`` is the authors'
    code's default. Weighted by gamma (``--soft_penalty_weight``).

    Args:
        z: ``(N, C, h, w)`` or ``(N, C, T, h, w)`` latents.
        block_size: DCT block ``B``.
        p: exponent of eq. 6.
        normalization: ``"authors"`` or ``"paper"``.

    Returns:
        ``(N,)`` per-sample penalty.
    """
    coeffs = blockwise_dct2d(z, block_size).abs()  # (N, ..., H/B, W/B, B, B)
    w = soft_penalty_weights(block_size, p, normalization).to(device=z.device, dtype=coeffs.dtype)
    weighted = coeffs * w
    if normalization == "paper":
        per_sample = weighted.sum(dim=(-2, -1)).flatten(1).mean(dim=1)  # sum per block, mean over blocks
    else:
        per_sample = weighted.flatten(1).mean(dim=1)  # mean over every coefficient
    return per_sample.to(z.dtype if z.is_floating_point() else torch.float32)


def plot_frequency_profiles(
    profiles: Mapping[str, "torch.Tensor | np.ndarray | Sequence[float]"],
    title: Optional[str] = None,
    ax=None,
    styles: Optional[Mapping[str, str]] = None,
):
    """Plot profiles (``{name: (B*B,)}``) as log amplitude over zigzag index, as in the paper's Fig. 2 and 4.

    Returns the matplotlib ``Figure``. Uses the non-interactive backend when no ``ax`` is given.
    """
    if ax is None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    else:
        fig = ax.figure
    floor = 1e-6  # log axis: keep exact zeros (e.g. a constant image) visible
    for name, prof in profiles.items():
        values = np.clip(np.asarray(torch.as_tensor(prof, dtype=torch.float32).cpu()), floor, None)
        ax.plot(np.arange(len(values)), values, (styles or {}).get(name, "-"), label=name, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("zigzag frequency index")
    ax.set_ylabel(r"normalised amplitude $|D_{uv} / D_{00}|$")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
