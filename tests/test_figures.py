"""Labelled image grids and the two-panel spectrum figure: layout in pixels, plotted data against numpy."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.fft import dctn

from diffusability_hf.figures import labelled_image_grid, plot_spectra, save_png
from diffusability_hf.spectral import energy_profile, frequency_profile


def flat_tiles(levels, h=16, w=20):
    """``(N, 3, H, W)`` tiles of one colour each: tile ``k`` is ``(levels[k], -levels[k], 0)`` in ``[-1, 1]``."""
    x = torch.zeros(len(levels), 3, h, w)
    for k, v in enumerate(levels):
        x[k, 0], x[k, 1] = v, -v
    return x


def u8(v):
    return round((v + 1) * 127.5)


def test_grid_without_labels_is_tiles_and_padding():
    rows = [flat_tiles([0.5, -0.5, 1.0]), flat_tiles([0.25, -1.0, 0.0])]
    grid = np.asarray(labelled_image_grid(rows, ["", ""], padding=3))
    assert grid.shape == (2 * (16 + 3), 3 * (20 + 3), 3)
    for i, row in enumerate(rows):
        for j in range(3):
            y, x = i * 19, j * 23
            tile = grid[y : y + 16, x : x + 20]
            v = row[j, 0, 0, 0].item()
            assert (tile == [u8(v), u8(-v), u8(0.0)]).all(), (i, j)
    assert (grid[16:19] == 255).all() and (grid[:, 20:23] == 255).all()  # padding between tiles


@pytest.mark.parametrize("h, w", [(16, 20), (64, 64)])
def test_labels_add_margins_and_tiles_move_by_them(h, w):
    rows = [flat_tiles([0.5, -0.5], h, w), flat_tiles([0.8, -0.2], h, w), flat_tiles([0.1, -0.9], h, w)]
    plain = labelled_image_grid(rows, ["", "", ""], padding=1)
    short = labelled_image_grid(rows, ["a", "bb", "c"], col_labels=["x", "y"], padding=1)
    long = labelled_image_grid(rows, ["a", "a much longer label", "c"], col_labels=["x", "y"], padding=1)
    assert plain.size == (2 * (w + 1), 3 * (h + 1))
    left, top = short.width - plain.width, short.height - plain.height
    assert left > 0 and top > 0
    assert long.width > short.width and long.height == short.height  # the margin follows the longest row label
    g = np.asarray(short)
    for i, row in enumerate(rows):
        for j in range(2):
            y, x = top + i * (h + 1), left + j * (w + 1)
            v = row[j, 0, 0, 0].item()
            assert (g[y : y + h, x : x + w] == [u8(v), u8(-v), u8(0.0)]).all(), (i, j)
    # Each row's label darkens pixels in the left margin at that row's height; column labels sit above the tiles
    for i in range(3):
        band = g[top + i * (h + 1) : top + i * (h + 1) + h, :left]
        assert (band < 128).any(), i
    for j in range(2):
        assert (g[:top, left + j * (w + 1) : left + j * (w + 1) + w] < 128).any(), j
    assert (g[:top, :left] == 255).all()  # the corner stays empty
    # Other texts draw other pixels
    other = np.asarray(labelled_image_grid(rows, ["z", "bb", "c"], col_labels=["x", "y"], padding=1))
    assert (other[top : top + h, :left] != g[top : top + h, :left]).any()


def test_short_rows_leave_cells_empty_and_clips_show_their_first_frame():
    clip = torch.zeros(1, 3, 4, 8, 8)
    clip[:, :, 0] = 1.0  # first frame white, the rest black
    clip[:, :, 1:] = -1.0
    grid = np.asarray(labelled_image_grid([flat_tiles([0.0, 0.0], 8, 8), clip], ["", ""], padding=0))
    assert grid.shape == (16, 16, 3)
    assert (grid[8:16, :8] == 255).all()  # the clip's first frame
    assert (grid[8:16, 8:] == 255).all()  # the empty cell is background


def test_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="row labels"):
        labelled_image_grid([flat_tiles([0.0])], ["a", "b"])
    with pytest.raises(ValueError, match="same size"):
        labelled_image_grid([flat_tiles([0.0]), flat_tiles([0.0], 8, 8)], ["a", "b"])
    with pytest.raises(ValueError, match="column labels"):
        labelled_image_grid([flat_tiles([0.0, 0.0])], ["a"], col_labels=["only one"])


def spectra_inputs():
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(2, 3, 16, 16, generator=g).cumsum(-1).cumsum(-2) * 0.1  # smooth: energy at low frequencies
    noisy = torch.randn(2, 4, 16, 16, generator=g)  # white: flat energy
    signals = {"RGB (16 px)": rgb, "vanilla": noisy, "se": rgb[:, :2] + 0.1 * noisy[:, :2]}
    return (
        signals,
        {k: frequency_profile(v) for k, v in signals.items()},
        {k: energy_profile(v) for k, v in signals.items()},
    )


def test_plot_spectra_draws_eq1_and_ac_shares_of_every_signal():
    signals, profiles, energies = spectra_inputs()
    fig = plot_spectra(profiles, energies, title="test", hf_cutoff=0.5)
    left, right = fig.axes[:2]
    assert len(fig.axes) == 2
    assert [line.get_label() for line in left.get_lines()] == list(profiles)
    for line, prof in zip(left.get_lines(), profiles.values()):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(64))
        np.testing.assert_allclose(line.get_ydata(), np.clip(prof.numpy(), 1e-6, None), rtol=1e-6)
    lines = right.get_lines()
    assert len(lines) == 3 and right.get_yscale() == "log" and "AC energy" in right.get_ylabel()
    for line, (label, x) in zip(lines, signals.items()):
        # Independently: squared orthonormal block DCT coefficients, averaged, in zigzag order, DC dropped
        blocks = x.double().numpy().reshape(*x.shape[:2], 2, 8, 2, 8).swapaxes(-3, -2)  # (N, C, 2, 2, 8, 8)
        e = (dctn(blocks, norm="ortho", axes=(-2, -1)) ** 2).reshape(-1, 8, 8).mean(0)
        order = sorted(range(64), key=lambda k: (k // 8 + k % 8, (k // 8) if (k // 8 + k % 8) % 2 else -(k // 8)))
        e = e.reshape(64)[order]
        share = e[1:] / e[1:].sum()
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 64))
        np.testing.assert_allclose(line.get_ydata(), share, rtol=1e-5)
        assert line.get_ydata().sum() == pytest.approx(1.0, abs=1e-9)
        assert line.get_label().startswith(label) and f"{share[31:].sum():.3f}" in line.get_label()
    # The same label has the same colour in both panels; RGB is dashed
    for a, b in zip(left.get_lines(), lines):
        assert a.get_color() == b.get_color()
    assert lines[0].get_linestyle() == "--" and lines[1].get_linestyle() == "-"
    # White noise spreads energy evenly, the smooth signal keeps little of it at high frequencies
    assert lines[1].get_ydata()[31:].sum() > 0.3 > lines[0].get_ydata()[31:].sum()
    assert fig._suptitle.get_text() == "test"


def test_save_png_writes_a_figure_and_an_image_atomically(tmp_path):
    _, profiles, energies = spectra_inputs()
    save_png(plot_spectra(profiles, energies), str(tmp_path / "spectrum.png"))
    save_png(labelled_image_grid([flat_tiles([0.0])], ["row"]), str(tmp_path / "grid.png"))
    with Image.open(tmp_path / "spectrum.png") as im:
        assert im.width > 2 * im.height > 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.height == 16 + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "spectrum.png"]  # no temporary file left
