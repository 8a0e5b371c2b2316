"""Block DCT, zigzag order, frequency profiles, chopping and the soft penalty, checked against scipy/numpy."""

import math

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.fft import dct, dctn
from skimage import data as skdata

from diffusability_hf.spectral import (
    ac_energy_shares,
    blockwise_dct2d,
    blockwise_idct2d,
    chop_high_frequencies,
    chop_mask,
    dct_matrix,
    energy_profile,
    frequency_profile,
    high_frequency_share,
    plot_frequency_profiles,
    soft_frequency_penalty,
    soft_penalty_weights,
    zigzag_order,
    zigzag_rank,
)

matplotlib.use("Agg")

# The JPEG zigzag sequence (ITU-T T.81, Figure A.6 / libjpeg's jpeg_natural_order): entry k is the row-major
# index (row * 8 + column) of the k-th coefficient, the row being the vertical frequency.
# fmt: off
JPEG_ZIGZAG_8 = [
    0, 1, 8, 16, 9, 2, 3, 10,
    17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34,
    27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36,
    29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46,
    53, 60, 61, 54, 47, 55, 62, 63,
]
# fmt: on


# ----------------------------------------------------------------------------------------------------------------
# Independent numpy/scipy references
# ----------------------------------------------------------------------------------------------------------------


def ref_block_dct(x: np.ndarray, b: int) -> np.ndarray:
    """``(..., H, W) -> (..., H//b, W//b, b, b)`` by an explicit loop over blocks with ``scipy.fft.dctn``."""
    *lead, h, w = x.shape
    out = np.empty((*lead, h // b, w // b, b, b), dtype=np.float64)
    for i in range(h // b):
        for j in range(w // b):
            block = x[..., i * b : (i + 1) * b, j * b : (j + 1) * b].astype(np.float64)
            out[..., i, j, :, :] = dctn(block, norm="ortho", axes=(-2, -1))
    return out


def ref_zigzag_flat(a: np.ndarray) -> np.ndarray:
    """``(..., 8, 8) -> (..., 64)`` in the literal JPEG zigzag order."""
    return a.reshape(*a.shape[:-2], 64)[..., JPEG_ZIGZAG_8]


def ref_frequency_profile(x: np.ndarray, b: int = 8) -> np.ndarray:
    """Ratio of block-mean amplitudes per (sample, channel[, frame]) signal, averaged over signals."""
    amp = np.abs(ref_block_dct(x, b))  # (..., nh, nw, b, b)
    amp = amp.reshape(*amp.shape[:-4], -1, b, b).mean(axis=-3)  # (..., b, b)
    amp = ref_zigzag_flat(amp).reshape(-1, b * b)
    return (amp / amp[:, :1]).mean(axis=0)


def to_media(img: np.ndarray, block: int = 8) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` photo -> float32 ``(1, 3, H', W')`` in ``[-1, 1]``, cropped to multiples of ``block``."""
    h, w = img.shape[0] // block * block, img.shape[1] // block * block
    x = torch.from_numpy(img[:h, :w].astype(np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def photos():
    return {name: to_media(getattr(skdata, name)()) for name in ("astronaut", "coffee", "chelsea")}


def white_noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# DCT matrix and block transforms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16])
def test_dct_matrix_matches_scipy_and_is_orthonormal(n):
    c = dct_matrix(n, dtype=torch.float64).numpy()
    np.testing.assert_allclose(c, dct(np.eye(n), norm="ortho", axis=0), atol=1e-12)
    np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(c.T @ c, np.eye(n), atol=1e-12)
    assert dct_matrix(n).dtype == torch.float32


def test_dct_matrix_rejects_non_positive_size():
    with pytest.raises(ValueError):
        dct_matrix(0)


@pytest.mark.parametrize(
    "shape, b",
    [
        ((8, 8), 8),
        ((2, 3, 16, 24), 8),
        ((1, 4, 12, 8), 4),
        ((2, 3, 2, 16, 8), 8),  # video (N, C, T, H, W)
        ((1, 2, 3, 10, 15), 5),  # video, odd block size
        ((3, 6, 9), 3),
    ],
)
def test_blockwise_dct2d_matches_scipy_dctn_per_block(shape, b):
    x = white_noise(*shape, seed=1).double()
    got = blockwise_dct2d(x, b)
    *lead, h, w = shape
    assert got.shape == (*lead, h // b, w // b, b, b)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_block_dct(x.numpy(), b), atol=1e-10)


def test_blockwise_dct2d_coefficient_orientation():
    """A pattern varying only down the rows (vertical frequency) lands in D[u, 0], u = row frequency."""
    b = 8
    rows = np.cos(np.pi * (2 * np.arange(b) + 1) * 3 / (2 * b))  # the u = 3 cosine, along the rows
    block = np.repeat(rows[:, None], b, axis=1)  # varies along H only
    coeffs = blockwise_dct2d(torch.from_numpy(block), b)[0, 0].numpy()
    nz = np.argwhere(np.abs(coeffs) > 1e-9)
    assert nz.tolist() == [[3, 0]]
    np.testing.assert_allclose(coeffs, dctn(block, norm="ortho"), atol=1e-12)


def test_blockwise_dct2d_float32_and_half_inputs():
    x = white_noise(2, 3, 16, 16, seed=2)
    got = blockwise_dct2d(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_block_dct(x.numpy(), 8), atol=1e-5)
    got_half = blockwise_dct2d(x.to(torch.bfloat16))
    assert got_half.dtype == torch.float32  # computed in float32, not in bfloat16
    np.testing.assert_allclose(got_half.numpy(), ref_block_dct(x.to(torch.bfloat16).float().numpy(), 8), atol=1e-5)


@pytest.mark.parametrize("shape, b", [((1, 3, 12, 16), 8), ((1, 3, 16, 12), 8), ((2, 1, 2, 9, 9), 2), ((7,), 1)])
def test_blockwise_dct2d_rejects_bad_shapes(shape, b):
    with pytest.raises(ValueError):
        blockwise_dct2d(torch.zeros(shape), b)


def test_blockwise_dct2d_error_message_names_sizes():
    with pytest.raises(ValueError, match=r"12x20.*8"):
        blockwise_dct2d(torch.zeros(1, 3, 12, 20), 8)


@pytest.mark.parametrize("shape, b", [((2, 3, 16, 24), 8), ((1, 2, 3, 8, 12), 4), ((4, 4), 2)])
def test_blockwise_idct2d_is_exact_inverse(shape, b):
    x = white_noise(*shape, seed=3).double()
    coeffs = blockwise_dct2d(x, b)
    np.testing.assert_allclose(blockwise_idct2d(coeffs).numpy(), x.numpy(), atol=1e-12)
    # and the other way round: any coefficient array is the DCT of its inverse
    c = white_noise(*coeffs.shape, seed=4).double()
    np.testing.assert_allclose(blockwise_dct2d(blockwise_idct2d(c), b).numpy(), c.numpy(), atol=1e-12)


def test_blockwise_idct2d_rejects_non_square_blocks():
    with pytest.raises(ValueError):
        blockwise_idct2d(torch.zeros(1, 2, 2, 8, 4))


def test_parseval_energy_preserved():
    x = white_noise(2, 3, 32, 40, seed=5).double()
    coeffs = blockwise_dct2d(x, 8)
    np.testing.assert_allclose(coeffs.square().sum().item(), x.square().sum().item(), rtol=1e-12)
    # per block, too
    blocks = x.reshape(2, 3, 4, 8, 5, 8).transpose(-3, -2)
    np.testing.assert_allclose(
        coeffs.square().sum((-2, -1)).numpy(), blocks.square().sum((-2, -1)).numpy(), rtol=1e-10
    )


@st.composite
def block_shapes(draw):
    b = draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    nh, nw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return tuple(lead) + (nh * b, nw * b), b, seed


@settings(max_examples=25, deadline=None)
@given(block_shapes())
def test_property_inverse_and_parseval(args):
    shape, b, seed = args
    x = white_noise(*shape, seed=seed).double()
    coeffs = blockwise_dct2d(x, b)
    np.testing.assert_allclose(blockwise_idct2d(coeffs).numpy(), x.numpy(), atol=1e-10)
    np.testing.assert_allclose(coeffs.square().sum().item(), x.square().sum().item(), rtol=1e-10)


@settings(max_examples=15, deadline=None)
@given(block_shapes())
def test_property_matches_scipy(args):
    shape, b, seed = args
    x = white_noise(*shape, seed=seed).double()
    np.testing.assert_allclose(blockwise_dct2d(x, b).numpy(), ref_block_dct(x.numpy(), b), atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Zigzag
# ----------------------------------------------------------------------------------------------------------------


def test_zigzag_order_8_is_the_jpeg_table():
    assert len(JPEG_ZIGZAG_8) == 64 and sorted(JPEG_ZIGZAG_8) == list(range(64))
    order = zigzag_order(8)
    assert order.dtype == torch.long
    assert order.tolist() == JPEG_ZIGZAG_8
    assert zigzag_order().tolist() == JPEG_ZIGZAG_8


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 7, 8, 16])
def test_zigzag_order_is_a_walk_over_anti_diagonals(b):
    order = zigzag_order(b).tolist()
    assert sorted(order) == list(range(b * b))  # a permutation
    u, v = np.divmod(np.array(order), b)
    assert order[0] == 0 and order[-1] == b * b - 1
    assert np.all(np.diff(u + v) >= 0)  # u + v non-decreasing
    if b > 1:
        # consecutive entries are neighbours (one step along an edge or along a diagonal), as in JPEG
        assert np.all(np.maximum(np.abs(np.diff(u)), np.abs(np.diff(v))) == 1)
        assert (u[1], v[1]) == (0, 1)  # JPEG starts horizontally


@pytest.mark.parametrize("b", [1, 3, 8])
def test_zigzag_rank_inverts_order(b):
    order, rank = zigzag_order(b), zigzag_rank(b)
    assert rank.shape == (b, b)
    assert rank.flatten()[order].tolist() == list(range(b * b))
    if b == 8:
        expected = np.empty(64, dtype=np.int64)
        expected[JPEG_ZIGZAG_8] = np.arange(64)
        assert rank.flatten().tolist() == expected.tolist()


def test_zigzag_rejects_non_positive_block():
    with pytest.raises(ValueError):
        zigzag_order(0)


# ----------------------------------------------------------------------------------------------------------------
# Frequency profile
# ----------------------------------------------------------------------------------------------------------------


def test_frequency_profile_matches_numpy_reference():
    x = white_noise(3, 2, 16, 24, seed=6) + 0.5  # non-zero DC
    got = frequency_profile(x)
    assert got.shape == (64,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_frequency_profile(x.double().numpy()), rtol=1e-5)


def test_frequency_profile_equals_eq1_when_dc_is_constant():
    """With the same D_00 in every block, the estimator is the block average of eq. 1's |D_uv / D_00|."""
    x = white_noise(2, 3, 16, 16, seed=7).double()
    blocks = x.reshape(2, 3, 2, 8, 2, 8)
    x = (blocks - blocks.mean(dim=(3, 5), keepdim=True) + 0.7).reshape(2, 3, 16, 16)  # every block mean = 0.7
    coeffs = ref_block_dct(x.numpy(), 8)
    np.testing.assert_allclose(coeffs[..., 0, 0], 0.7 * 8)
    eq1 = np.abs(coeffs / coeffs[..., :1, :1])  # (2, 3, 2, 2, 8, 8)
    expected = ref_zigzag_flat(eq1).reshape(-1, 64).mean(axis=0)
    np.testing.assert_allclose(frequency_profile(x).numpy(), expected, rtol=1e-5)


def test_frequency_profile_constant_image():
    x = torch.full((2, 3, 32, 32), 0.37)
    expected = np.zeros(64)
    expected[0] = 1.0
    np.testing.assert_allclose(frequency_profile(x).numpy(), expected, atol=1e-6)
    # different constants per channel and sample: same profile
    x = torch.linspace(-0.9, 0.8, 6).reshape(2, 3, 1, 1).expand(2, 3, 16, 16)
    np.testing.assert_allclose(frequency_profile(x).numpy(), expected, atol=1e-6)


def test_frequency_profile_white_noise_is_flat():
    prof = frequency_profile(white_noise(16, 4, 64, 64, seed=8)).numpy()
    assert prof[0] == pytest.approx(1.0)
    np.testing.assert_allclose(prof, np.ones(64), rtol=0.1)
    assert abs(prof[1:].mean() - 1.0) < 0.03


def test_frequency_profile_natural_photo_falls_with_frequency(photos):
    for name, x in photos.items():
        prof = frequency_profile(x).numpy()
        assert np.all(np.isfinite(prof)), name
        low, high = prof[1:9].mean(), prof[-16:].mean()
        assert low > 5 * high, (name, low, high)
        # and it is far below white noise's flat profile at high frequencies
        assert high < 0.1, (name, high)


def test_frequency_profile_zero_mean_latent_is_finite():
    z = white_noise(4, 16, 32, 32, seed=9)
    blocks = z.reshape(4, 16, 4, 8, 4, 8)
    z = (blocks - blocks.mean(dim=(3, 5), keepdim=True)).reshape(4, 16, 32, 32)  # D_00 ~ 0 in every block
    assert blockwise_dct2d(z)[..., 0, 0].abs().max() < 1e-5
    prof = frequency_profile(z)
    assert torch.isfinite(prof).all()
    # latent-like: roughly zero-mean noise, D_00 small but not zero
    prof = frequency_profile(white_noise(4, 16, 32, 32, seed=10) * 0.01)
    assert torch.isfinite(prof).all()


def test_frequency_profile_all_zero_is_finite():
    prof = frequency_profile(torch.zeros(2, 4, 16, 16))
    assert torch.isfinite(prof).all()
    np.testing.assert_allclose(prof.numpy(), np.zeros(64), atol=0)


def test_frequency_profile_video_equals_frames_in_batch():
    v = white_noise(2, 3, 4, 16, 16, seed=11) + torch.linspace(-0.5, 0.5, 4).reshape(1, 1, 4, 1, 1)
    frames = v.transpose(1, 2).reshape(8, 3, 16, 16)
    np.testing.assert_allclose(frequency_profile(v).numpy(), frequency_profile(frames).numpy(), rtol=1e-5)
    np.testing.assert_allclose(frequency_profile(v).numpy(), ref_frequency_profile(v.double().numpy()), rtol=1e-5)


def test_frequency_profile_other_block_size():
    x = white_noise(2, 2, 16, 16, seed=12) + 1.0
    prof = frequency_profile(x, block_size=4)
    assert prof.shape == (16,)
    amp = np.abs(ref_block_dct(x.double().numpy(), 4)).reshape(2, 2, -1, 4, 4).mean(axis=2)
    amp = amp.reshape(2, 2, 16)[..., zigzag_order(4).numpy()].reshape(-1, 16)
    np.testing.assert_allclose(prof.numpy(), (amp / amp[:, :1]).mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 1, 1, 1, 8, 8)])
def test_frequency_profile_rejects_non_media(shape):
    with pytest.raises(ValueError):
        frequency_profile(torch.zeros(shape))


# ----------------------------------------------------------------------------------------------------------------
# Energy profile and high-frequency share
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 3, 8, 16)])
def test_energy_profile_parseval_and_reference(shape):
    x = white_noise(*shape, seed=13) * 2 + 0.3
    e = energy_profile(x)
    assert e.shape == (64,)
    assert e.sum().item() == pytest.approx(64 * x.double().square().mean().item(), rel=1e-5)
    ref = ref_zigzag_flat(ref_block_dct(x.double().numpy(), 8) ** 2).reshape(-1, 64).mean(axis=0)
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5)


def test_energy_profile_block_size_4_parseval(photos):
    x = photos["astronaut"]
    e = energy_profile(x, block_size=4)
    assert e.shape == (16,)
    assert e.sum().item() == pytest.approx(16 * x.double().square().mean().item(), rel=1e-5)


def ref_high_frequency_share(x: np.ndarray, cutoff: float = 0.5) -> float:
    e = ref_zigzag_flat(ref_block_dct(x, 8) ** 2).reshape(-1, 64).mean(axis=0)
    k = math.ceil(cutoff * 64)
    return e[k:].sum() / e[1:].sum()


def test_high_frequency_share_white_noise():
    x = white_noise(8, 4, 64, 64, seed=14)
    share = high_frequency_share(x)
    assert share.ndim == 0 and share.dtype == torch.float32
    assert share.item() == pytest.approx(0.5, abs=0.03)
    assert share.item() == pytest.approx(ref_high_frequency_share(x.double().numpy()), rel=1e-5)
    assert high_frequency_share(x, cutoff=0.25).item() == pytest.approx(48 / 63, abs=0.03)


def test_high_frequency_share_natural_photo_and_blur(photos):
    # astronaut ~0.03, chelsea ~0.05; coffee's grainy texture puts it near 0.11, still far below noise's ~0.5
    limits = {"astronaut": 0.1, "chelsea": 0.1, "coffee": 0.2}
    for name, x in photos.items():
        share = high_frequency_share(x).item()
        assert share < limits[name], (name, share)
        assert share == pytest.approx(ref_high_frequency_share(x.double().numpy()), rel=1e-4)
        blurred = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5)))
        assert high_frequency_share(blurred).item() < 0.5 * share, name
    noise = white_noise(2, 3, 64, 64, seed=15)
    blurred_noise = torch.from_numpy(ndimage.gaussian_filter(noise.numpy(), sigma=(0, 0, 1.0, 1.0)))
    assert high_frequency_share(blurred_noise).item() < 0.5 * high_frequency_share(noise).item()


def test_high_frequency_share_edge_cases():
    assert high_frequency_share(torch.zeros(1, 3, 16, 16)).item() == 0.0
    assert high_frequency_share(torch.zeros(1, 3, 16, 16, dtype=torch.float64)).item() == 0.0
    for cutoff in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            high_frequency_share(torch.zeros(1, 3, 16, 16), cutoff=cutoff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_high_frequency_share_constant_image_is_zero(dtype):
    assert high_frequency_share(torch.full((1, 3, 16, 16), 0.4, dtype=dtype)).item() == pytest.approx(0.0, abs=1e-6)


def test_ac_energy_shares_match_numpy_sum_to_one_and_agree_with_the_high_frequency_share(photos):
    x = photos["chelsea"]
    shares = ac_energy_shares(energy_profile(x))
    e = ref_zigzag_flat(ref_block_dct(x.double().numpy(), 8) ** 2).reshape(-1, 64).mean(axis=0)
    assert shares.shape == (64,) and shares[0].item() == 0.0
    np.testing.assert_allclose(shares[1:].numpy(), e[1:] / e[1:].sum(), rtol=1e-5)
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert shares[32:].sum().item() == pytest.approx(high_frequency_share(x).item(), rel=1e-5)
    # A large DC offset changes eq. 1's normalisation but not the AC shares
    np.testing.assert_allclose(ac_energy_shares(energy_profile(x + 5.0)).numpy(), shares.numpy(), rtol=1e-4)
    assert not ac_energy_shares(energy_profile(torch.full((1, 3, 16, 16), 0.4))).any()


# ----------------------------------------------------------------------------------------------------------------
# Chopping high frequencies (eq. 4-5)
# ----------------------------------------------------------------------------------------------------------------


def test_chop_ratio_zero_is_identity():
    x = white_noise(2, 3, 16, 24, seed=16)
    out = chop_high_frequencies(x, 8, 0.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 3, 16, 8)])
def test_chop_zigzag_zeroes_exactly_the_last_coefficients(ratio, shape):
    x = white_noise(*shape, seed=17).double()
    out = chop_high_frequencies(x, 8, ratio)
    assert out.shape == x.shape and out.dtype == torch.float64
    n = 64 - int((1 - ratio) * 64)  # the authors' rule: keep floor((1 - r) B^2)
    before = ref_zigzag_flat(ref_block_dct(x.numpy(), 8))
    after = ref_zigzag_flat(ref_block_dct(out.numpy(), 8))  # (..., nh, nw, 64)
    zero = np.abs(after) < 1e-10
    assert np.all(zero.sum(axis=-1) == n)  # exactly N zeroed per block ...
    assert np.all(zero[..., 64 - n :])  # ... the last N in zigzag order
    np.testing.assert_allclose(after[..., : 64 - n], before[..., : 64 - n], atol=1e-10)  # the rest untouched


@pytest.mark.parametrize("ratio", [0.125, 0.3, 0.5, 0.75])
def test_chop_axis_keeps_a_square_corner(ratio):
    x = white_noise(2, 3, 16, 16, seed=18).double()
    out = chop_high_frequencies(x, 8, ratio, order="axis")
    keep = int((1 - ratio) * 8)
    before, after = ref_block_dct(x.numpy(), 8), ref_block_dct(out.numpy(), 8)
    nonzero = np.abs(after) > 1e-10
    expected = np.zeros((8, 8), dtype=bool)
    expected[:keep, :keep] = True
    assert np.all(nonzero == expected)
    np.testing.assert_allclose(after[..., :keep, :keep], before[..., :keep, :keep], atol=1e-10)


def test_chop_mask_counts_and_errors():
    for b in (4, 8):
        for ratio in (0.0, 0.2, 0.5, 1.0):
            m = chop_mask(b, ratio)
            assert m.sum().item() == int((1 - ratio) * b * b)
    assert chop_mask(8, 0.1).sum().item() == 57  # 57.6 kept coefficients round down (7 cut, not 6)
    with pytest.raises(ValueError):
        chop_mask(8, 1.5)
    with pytest.raises(ValueError):
        chop_mask(8, 0.5, order="diagonal")


def test_chop_is_differentiable_and_a_projection():
    x = white_noise(1, 2, 16, 16, seed=19).requires_grad_(True)
    out = chop_high_frequencies(x, 8, 0.5)
    torch.testing.assert_close(chop_high_frequencies(out, 8, 0.5), out, atol=1e-5, rtol=0)  # idempotent
    out.square().sum().backward()
    # d/dx sum(P x)^2 = 2 P^T P x = 2 P x for an orthogonal projection P
    torch.testing.assert_close(x.grad, 2 * out.detach(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Soft penalty (eq. 6-7)
# ----------------------------------------------------------------------------------------------------------------


def ref_soft_penalty(z: np.ndarray, b: int, p: float, normalization: str) -> np.ndarray:
    """Eq. 6-7 as printed (per-block sum of |D| (u+v)^p / b^p, mean over blocks), or the authors' code: the mean
    over every coefficient of |D| w(u, v) with w = (x + y)^p / 4 on linspace(0, 1, b) coordinates."""
    amp = np.abs(ref_block_dct(z, b))  # (N, ..., nh, nw, b, b)
    if normalization == "paper":
        u = np.arange(b)
        per_block = (amp * (u[:, None] + u[None, :]) ** p / b**p).sum(axis=(-2, -1))
        return per_block.reshape(z.shape[0], -1).mean(axis=1)
    x = np.linspace(0, 1, b)
    w = (x[None, :] + x[:, None]) ** p / 4.0
    return (amp * w).reshape(z.shape[0], -1).mean(axis=1)


def test_soft_penalty_weights_eq6_and_the_authors():
    w = soft_penalty_weights(8, 2.0, "paper").numpy()
    assert w[0, 0] == 0.0 and w[7, 7] == pytest.approx(14**2 / 64)
    assert w[2, 3] == pytest.approx(25 / 64)
    np.testing.assert_allclose(
        soft_penalty_weights(4, 1.0, "paper").numpy(), np.add.outer(np.arange(4), np.arange(4)) / 4
    )
    a = soft_penalty_weights(8, 2.0).numpy()  # the default: the authors' normalisation
    assert a[0, 0] == 0.0 and a[7, 7] == pytest.approx(1.0) and a[2, 3] == pytest.approx((5 / 7) ** 2 / 4)
    with pytest.raises(ValueError, match="normalization"):
        soft_penalty_weights(8, 2.0, "eq6")


@pytest.mark.parametrize("normalization", ["authors", "paper"])
@pytest.mark.parametrize(
    "shape, b, p", [((3, 4, 16, 16), 8, 2.0), ((2, 3, 8, 12), 4, 1.0), ((2, 2, 3, 16, 8), 8, 1.5)]
)
def test_soft_penalty_matches_hand_computation(shape, b, p, normalization):
    z = white_noise(*shape, seed=20) - 0.2
    got = soft_frequency_penalty(z, b, p, normalization)
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_soft_penalty(z.double().numpy(), b, p, normalization), rtol=1e-5)


def test_soft_penalty_default_is_the_authors_and_eq6_is_196x_stronger_at_b8_p2():
    z = white_noise(2, 4, 16, 16, seed=23)
    authors = soft_frequency_penalty(z)
    np.testing.assert_allclose(authors.numpy(), ref_soft_penalty(z.double().numpy(), 8, 2.0, "authors"), rtol=1e-5)
    ratio = (soft_frequency_penalty(z, normalization="paper") / authors).numpy()
    np.testing.assert_allclose(ratio, 4 * 64 * 7**2 / 8**2, rtol=1e-5)  # = 196


def test_soft_penalty_zero_for_constant_input_and_positive_otherwise():
    const = torch.linspace(-1, 1, 8).reshape(2, 4, 1, 1).expand(2, 4, 16, 16).contiguous()
    np.testing.assert_allclose(soft_frequency_penalty(const).numpy(), np.zeros(2), atol=1e-6)
    assert (soft_frequency_penalty(white_noise(2, 4, 16, 16, seed=21)) > 0).all()


def test_soft_penalty_is_differentiable():
    z = white_noise(2, 4, 16, 16, seed=22).requires_grad_(True)
    soft_frequency_penalty(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Plotting
# ----------------------------------------------------------------------------------------------------------------


def test_plot_frequency_profiles():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    profiles = {
        "constant": frequency_profile(torch.ones(1, 3, 16, 16)),  # exact zeros: must still plot on a log axis
        "noise": frequency_profile(white_noise(1, 3, 16, 16, seed=23)).numpy(),
        "list": [1.0 / (k + 1) for k in range(64)],
    }
    fig = plot_frequency_profiles(profiles, title="test")
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert len(ax.get_lines()) == len(profiles)
        assert ax.get_yscale() == "log"
        assert [line.get_label() for line in ax.get_lines()] == list(profiles)
        np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), profiles["list"], rtol=1e-6)
        assert len(ax.get_lines()[0].get_xdata()) == 64
        assert ax.get_title() == "test"
    finally:
        plt.close(fig)

    fig2, ax2 = plt.subplots()
    try:
        assert plot_frequency_profiles({"a": profiles["list"]}, ax=ax2) is fig2
        assert len(ax2.get_lines()) == 1 and ax2.get_yscale() == "log"
    finally:
        plt.close(fig2)
