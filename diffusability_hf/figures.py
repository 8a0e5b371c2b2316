"""Figures the scripts write: labelled image grids and the latent-spectrum figure (paper Fig. 2/4 and an AC view).

- :func:`labelled_image_grid`: rows of images with a text label left of each row and optional column labels above
  (``reconstructions.png``, ``dct_cut_grid.png``, DiT samples). PIL only, its default font, offline.
- :func:`plot_spectra`: the paper's eq. 1 profile next to each zigzag index's share of the AC energy, where the
  SE effect (less energy at high frequencies) is visible at a glance.
- :func:`save_png`: a figure or an image written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import as_plain_write
from .spectral import ac_energy_shares, plot_frequency_profiles

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


# ----------------------------------------------------------------------------------------------------------------
# Image grids


def _font(size: int):
    """PIL's default font at ``size`` px (a scalable font when FreeType is available, the bitmap one otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` (or ``(N, 3, T, H, W)``: first frame; 1 channel: grey) in ``[-1, 1]`` -> ``(N, H, W, 3)``."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 5:
        images = images[:, :, 0]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images (N, 3, H, W) or clips (N, 3, T, H, W), got shape {tuple(images.shape)}.")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def labelled_image_grid(
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str],
    col_labels: Optional[Sequence[str]] = None,
    padding: int = 2,
    font_size: Optional[int] = None,
    background: int = 255,
) -> Image.Image:
    """One image of tiles: row ``i`` holds the images of ``rows[i]``, labelled ``row_labels[i]`` on its left.

    Args:
        rows: one tensor ``(N_i, 3, H, W)`` per row, pixel range ``[-1, 1]`` (clips ``(N_i, 3, T, H, W)`` show their
            first frame). Every tile has the same ``H x W``; a row with fewer images than the longest leaves its
            last cells empty.
        row_labels: one text per row, drawn in a left margin as wide as the longest label.
        col_labels: optional texts above the columns (as many as the longest row).
        padding: pixels between tiles (and after the last row and column).
        font_size: label size in px (default: a fifth of the tile height, between 10 and 24).
        background: grey level of the margins and padding.

    Returns:
        An RGB ``PIL.Image``. With ``L`` the label margin (0 when every row label is empty) and ``T`` the column
        label band (0 without column labels), its size is ``(L + n * (W + padding), T + m * (H + padding))`` for
        ``m`` rows and ``n`` columns, and tile ``(i, j)`` has its top-left pixel at
        ``(L + j * (W + padding), T + i * (H + padding))``.
    """
    if len(rows) == 0:
        raise ValueError("labelled_image_grid needs at least one row of images.")
    if len(row_labels) != len(rows):
        raise ValueError(f"Got {len(rows)} rows of images but {len(row_labels)} row labels.")
    tiles = [_to_uint8_hwc(r) for r in rows]  # (N_i, H, W, 3) each
    sizes = {t.shape[1:3] for t in tiles}
    if len(sizes) != 1:
        raise ValueError(f"Every tile must have the same size, got {sorted(sizes)} (H, W).")
    (h, w), n = sizes.pop(), max(len(t) for t in tiles)
    if col_labels is not None and len(col_labels) != n:
        raise ValueError(f"Got {len(col_labels)} column labels for {n} columns.")
    font = _font(font_size or int(min(24, max(10, round(h / 5)))))

    # Margins from the labels' measured sizes
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(2, padding)
    row_sizes = [_text_size(measure, str(t), font) for t in row_labels]
    col_sizes = [_text_size(measure, str(t), font) for t in (col_labels or [])]
    left = max(s[0] for s in row_sizes) + 2 * pad if any(s[0] for s in row_sizes) else 0
    top = max(s[1] for s in col_sizes) + 2 * pad if col_sizes and any(s[1] for s in col_sizes) else 0

    grid = Image.new("RGB", (left + n * (w + padding), top + len(rows) * (h + padding)), (background,) * 3)
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(tiles):
        y = top + i * (h + padding)
        for j, tile in enumerate(row):
            grid.paste(Image.fromarray(tile), (left + j * (w + padding), y))
        if row_sizes[i][0]:  # right-aligned against the tiles, centred on the row
            box = draw.textbbox((0, 0), str(row_labels[i]), font=font)
            x0 = left - pad - (box[2] - box[0]) - box[0]
            draw.text((x0, y + (h - (box[3] - box[1])) // 2 - box[1]), str(row_labels[i]), fill=(0, 0, 0), font=font)
    for j, text in enumerate(col_labels or []):
        if col_sizes[j][0]:  # centred on the column
            box = draw.textbbox((0, 0), str(text), font=font)
            x0 = left + j * (w + padding) + (w - (box[2] - box[0])) // 2 - box[0]
            draw.text((x0, pad - box[1]), str(text), fill=(0, 0, 0), font=font)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Spectra


def _is_rgb(label: str) -> bool:
    return label.startswith("RGB")


def plot_spectra(
    profiles: Mapping[str, ArrayLike],
    energies: Mapping[str, ArrayLike],
    title: Optional[str] = None,
    hf_cutoff: Optional[float] = 0.5,
    styles: Optional[Mapping[str, str]] = None,
):
    """Two panels over the zigzag index of a ``B x B`` block DCT: the paper's eq. 1, and the AC energy per index.

    Left (``fig.axes[0]``): the frequency profiles ``|D_uv / D_00|`` of :func:`spectral.frequency_profile`, log
    scale, as the paper's Fig. 2 and 4. Latents are roughly zero-mean, so ``D_00`` is small and this curve sits
    high at low indices for every autoencoder, which hides differences between them.

    Right (``fig.axes[1]``): each zigzag index's share of the AC energy, ``E_k / sum_{j >= 1} E_j`` for
    ``k = 1 .. B*B - 1`` (:func:`spectral.ac_energy_shares` of :func:`spectral.energy_profile`), log scale. It does
    not divide by the DC term: a curve lower at high indices is a latent space with less high-frequency energy (the
    SE regularisation's effect, paper Section 3.3). With ``hf_cutoff`` the high-frequency part (the zigzag indices
    from ``ceil(hf_cutoff * B * B)`` on) is shaded and every legend entry gives its share of the AC energy.

    Args:
        profiles: ``{label: (B*B,) eq. 1 profile}``.
        energies: ``{label: (B*B,) energy profile}`` (labels shared with ``profiles`` get the same colour; e.g. RGB
            at the latents' spatial size).
        title: figure title.
        hf_cutoff: where "high frequencies" start, as a share of the zigzag order (``None``: no shading).
        styles: matplotlib format strings by label (default: dashed for labels starting with ``RGB``, solid else).

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot: no ``plt.close`` needed); write it with
        :func:`save_png`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.4, 4.2), dpi=120)
    ax_profile, ax_share = fig.subplots(1, 2)
    labels = list(dict.fromkeys([*profiles, *energies]))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fmt = {label: (styles or {}).get(label, "--" if _is_rgb(label) else "-") for label in labels}

    # Left: eq. 1, as in the paper
    plot_frequency_profiles(profiles, ax=ax_profile, styles=fmt)
    for line, label in zip(ax_profile.get_lines(), profiles):
        line.set_color(colours[label])
    ax_profile.legend()
    ax_profile.set_title(r"paper eq. 1: $|D_{uv} / D_{00}|$ (divides by the DC term)")

    # Right: share of the AC energy per zigzag index
    floor = 1e-12  # log axis: an exact zero stays visible at the bottom
    size = None
    for label, energy in energies.items():
        energy = torch.as_tensor(energy, dtype=torch.float64).cpu()
        size = energy.numel()
        shares = ac_energy_shares(energy).numpy()
        text = label
        if hf_cutoff is not None:
            start = max(1, int(np.ceil(hf_cutoff * size)))
            text = f"{label} (high-freq. share {shares[start:].sum():.3f})"
        index = np.arange(1, size)
        ax_share.plot(index, np.clip(shares[1:], floor, None), fmt[label], color=colours[label], label=text, lw=1.5)
    if hf_cutoff is not None and size is not None:
        start = max(1, int(np.ceil(hf_cutoff * size)))
        ax_share.axvspan(start - 0.5, size - 0.5, color="0.85", alpha=0.5, lw=0, zorder=0)
        ax_share.text(
            0.98, 0.96, f"high frequencies (zigzag index >= {start})", transform=ax_share.transAxes,
            ha="right", va="top", fontsize=8, color="0.3",
        )  # fmt: skip
    ax_share.set_yscale("log")
    ax_share.set_xlabel("zigzag frequency index k (DC excluded)")
    ax_share.set_ylabel(r"share of AC energy $E_k \, / \, \Sigma_{j \geq 1} E_j$")
    ax_share.set_title("energy per frequency, as a share of the AC energy")
    ax_share.grid(True, which="both", alpha=0.3)
    if energies:
        ax_share.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Writing


def plot_fine_tuning_spectra(rgb: Mapping[str, Mapping], before: Mapping[str, Mapping], after: Mapping[str, Mapping]):
    """:func:`plot_spectra` of a fine-tuning run (``spectrum.png``, as the paper's Fig. 2/4): RGB at the latent size
    and the latents before and after, per kind of validation pixels ("image", "video": "(clips)" in the labels).
    Each argument maps a kind to a ``{"profile", "energy"}`` measurement."""
    profiles, energies = {}, {}
    for kind in rgb:
        label = "" if kind == "image" else " (clips)"
        for name, source in ((f"RGB at the latent size{label}", rgb[kind]), (f"latents before{label}", before[kind]),
                             (f"latents after{label}", after[kind])):  # fmt: skip
            profiles[name], energies[name] = source["profile"], source["energy"]
    return plot_spectra(profiles, energies, title="Latent spectrum before and after fine-tuning (paper Fig. 2/4)")


def save_png(figure_or_image, path: str) -> str:
    """Write a matplotlib ``Figure`` or a ``PIL.Image`` to ``path`` as PNG, atomically (temporary file + rename).

    A figure is closed afterwards when pyplot manages it. Returns ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp.png", dir=folder)
    os.close(fd)
    try:
        if isinstance(figure_or_image, Image.Image):
            figure_or_image.save(tmp, format="PNG")
        else:
            figure_or_image.savefig(tmp, format="png")
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(figure_or_image)
        as_plain_write(tmp)  # not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
