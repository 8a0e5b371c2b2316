"""SE loss (paper eq. 2), downsampling, KL, CHF loss and the reconstruction distance, against numpy references; the
SE objective (``SEAutoencoderLoss``) against eq. 2 computed by hand with stock diffusers calls."""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.fft import dctn, idctn

from diffusability_hf.losses import (
    LPIPS_TRUNK_FILES,
    ReconstructionDistance,
    SEAutoencoderLoss,
    chf_loss,
    downsample,
    kl_divergence,
    load_lpips,
    per_sample_mse,
    scale_equivariance_loss,
    temporal_downsample,
)

from testing_utils import tiny_autoencoder_kl

# lpips builds its AlexNet trunk with torchvision's deprecated `pretrained=` argument
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def np_box(x: np.ndarray, f: int) -> np.ndarray:
    """Average non-overlapping ``f x f`` cells of the last two axes."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))


def np_per_sample_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(axis=1)


def frames(v: torch.Tensor):
    """``(N, C, T, H, W)`` -> list of ``T`` frames ``(N, C, H, W)``."""
    return [v[:, :, t] for t in range(v.shape[2])]


# ----------------------------------------------------------------------------------------------------------------
# downsample
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_area_is_block_mean(factor):
    x = randn(2, 3, 12, 24, seed=1)
    got = downsample(x, factor, "area")
    assert got.shape == (2, 3, 12 // factor, 24 // factor)
    np.testing.assert_allclose(got.numpy(), np_box(x.double().numpy(), factor), atol=1e-6)


def test_downsample_bilinear_factor2_is_box_average():
    x = randn(2, 3, 16, 8, seed=2)
    np.testing.assert_allclose(downsample(x, 2, "bilinear").numpy(), np_box(x.double().numpy(), 2), atol=1e-6)
    np.testing.assert_allclose(downsample(x, 2).numpy(), np_box(x.double().numpy(), 2), atol=1e-6)  # default mode


def test_downsample_bilinear_factor4_averages_centre_pixels():
    """Without antialiasing, output pixel i samples source coordinate 4i + 1.5: the mean of pixels 4i+1, 4i+2."""
    x = randn(1, 2, 16, 16, seed=3).double()
    xn = x.numpy().reshape(1, 2, 4, 4, 4, 4)
    expected = xn[:, :, :, 1:3, :, 1:3].mean(axis=(3, 5))
    np.testing.assert_allclose(downsample(x, 4, "bilinear").numpy(), expected, atol=1e-12)


def np_bilinear_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resampling with align_corners=True, by hand: output i samples input (H - 1) i / (out - 1)."""

    def weights(n_in, n_out):  # (n_out, n_in) interpolation matrix
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            pos = (n_in - 1) * i / (n_out - 1) if n_out > 1 else 0.0
            lo = min(int(np.floor(pos)), n_in - 1)
            hi, frac = min(lo + 1, n_in - 1), pos - np.floor(pos)
            m[i, lo] += 1 - frac
            m[i, hi] += frac
        return m

    rows, cols = weights(x.shape[-2], out_h), weights(x.shape[-1], out_w)
    return np.einsum("oh,...hw,pw->...op", rows, x, cols)


@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_bilinear_align_corners_is_the_authors_bil(factor):
    """The authors' 'bil': F.interpolate(bilinear, align_corners=True), no antialias; per frame for videos."""
    x = randn(2, 3, 16, 24, seed=7).double()
    got = downsample(x, factor, "bilinear_align_corners")
    np.testing.assert_allclose(
        got.numpy(), np_bilinear_align_corners(x.numpy(), 16 // factor, 24 // factor), atol=1e-12
    )
    # Corners map onto corners (unlike align_corners=False), and it differs from the other modes
    np.testing.assert_allclose(got[..., 0, 0].numpy(), x[..., 0, 0].numpy(), atol=1e-12)
    np.testing.assert_allclose(got[..., -1, -1].numpy(), x[..., -1, -1].numpy(), atol=1e-12)
    for other in ("bilinear", "area"):
        assert not torch.allclose(got, downsample(x, factor, other))
    v = randn(1, 2, 3, 8, 8, seed=8).double()
    expected = np.stack([np_bilinear_align_corners(f.numpy(), 8 // factor, 8 // factor) for f in frames(v)], axis=2)
    np.testing.assert_allclose(downsample(v, factor, "bilinear_align_corners").numpy(), expected, atol=1e-12)


def test_downsample_antialias_differs_but_preserves_constants():
    x = randn(1, 2, 16, 16, seed=4)
    aa = downsample(x, 4, "bilinear_antialias")
    assert aa.shape == (1, 2, 4, 4)
    assert not torch.allclose(aa, downsample(x, 4, "bilinear"))
    const = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(downsample(const, 4, "bilinear_antialias"), torch.full((1, 2, 4, 4), 0.3))


@pytest.mark.parametrize("mode", ["bilinear", "bilinear_antialias", "area"])
@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_video_is_per_frame(mode, factor):
    v = randn(2, 3, 4, 16, 8, seed=5)
    got = downsample(v, factor, mode)
    assert got.shape == (2, 3, 4, 16 // factor, 8 // factor)
    expected = torch.stack([downsample(f, factor, mode) for f in frames(v)], dim=2)
    torch.testing.assert_close(got, expected)
    if mode == "area":
        np.testing.assert_allclose(got.numpy(), np_box(v.double().numpy(), factor), atol=1e-6)


def test_downsample_factor_one_is_identity():
    x = randn(1, 3, 5, 7, seed=6)
    assert torch.equal(downsample(x, 1, "area"), x)


def test_downsample_errors():
    x = torch.zeros(1, 3, 12, 12)
    with pytest.raises(ValueError, match="mode"):
        downsample(x, 2, "nearest")
    with pytest.raises(ValueError, match="divisible"):
        downsample(x, 5)
    with pytest.raises(ValueError, match="divisible"):
        downsample(torch.zeros(1, 3, 12, 10), 4, "area")
    with pytest.raises(ValueError):
        downsample(x, 0)
    with pytest.raises(ValueError):
        downsample(torch.zeros(1, 1, 1, 3, 8, 8), 2)  # 6D


# ----------------------------------------------------------------------------------------------------------------
# scale_equivariance_loss (eq. 2)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bilinear_antialias", "area"])
@pytest.mark.parametrize("factor", [2, 4])
def test_se_loss_identity_decoder_is_zero(mode, factor):
    x = randn(3, 4, 16, 16, seed=7)
    loss = scale_equivariance_loss(x, x.clone(), lambda z: z, factor, mode)
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss.numpy(), np.zeros(3), atol=1e-12)


@pytest.mark.parametrize("factor", [2, 4])
def test_se_loss_scaling_decoder_by_hand(factor):
    x, z = randn(2, 3, 16, 16, seed=8), randn(2, 3, 16, 16, seed=9)
    loss = scale_equivariance_loss(x, z, lambda t: 2 * t, factor, "area")
    expected = np_per_sample_mse(2 * np_box(z.double().numpy(), factor), np_box(x.double().numpy(), factor))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_se_loss_conv1x1_decoder_with_upsampling_by_hand():
    """Latents at 1/4 of the image resolution, decoder = fixed 1x1 conv (4 -> 3 channels) + 4x nearest upsampling."""
    w = randn(3, 4, seed=10)
    conv = nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])

    def decode(t):
        return torch.repeat_interleave(torch.repeat_interleave(conv(t), 4, dim=-2), 4, dim=-1)

    x, z = randn(2, 3, 32, 32, seed=11), randn(2, 4, 8, 8, seed=12)
    loss = scale_equivariance_loss(x, z, decode, 2, "bilinear")  # bilinear x2 == 2x2 box averaging
    z_small = np_box(z.double().numpy(), 2)  # (2, 4, 4, 4)
    recon = np.einsum("oc,nchw->nohw", w.double().numpy(), z_small).repeat(4, axis=-2).repeat(4, axis=-1)
    expected = np_per_sample_mse(recon, np_box(x.double().numpy(), 2))
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)


def test_se_loss_custom_distance_receives_pred_then_target():
    x, z = randn(2, 3, 8, 8, seed=13), randn(2, 3, 8, 8, seed=14)
    seen = {}

    def distance(pred, target):
        seen["pred"], seen["target"] = pred, target
        return (pred - target).abs().flatten(1).mean(1)

    loss = scale_equivariance_loss(x, z, lambda t: 3 * t, 2, "area", distance=distance)
    np.testing.assert_allclose(seen["pred"].numpy(), 3 * np_box(z.numpy(), 2), atol=1e-6)
    np.testing.assert_allclose(seen["target"].numpy(), np_box(x.numpy(), 2), atol=1e-6)
    expected = np.abs(3 * np_box(z.double().numpy(), 2) - np_box(x.double().numpy(), 2)).reshape(2, -1).mean(1)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "area"])
def test_se_loss_video_equals_mean_of_frame_losses(mode):
    w = randn(3, 4, seed=15)

    def decode(t):  # 1x1(x1) conv over channels, any number of trailing dims
        return torch.einsum("oc,nc...->no...", w, t)

    x, z = randn(2, 3, 5, 16, 16, seed=16), randn(2, 4, 5, 16, 16, seed=17)
    loss = scale_equivariance_loss(x, z, decode, 2, mode)
    assert loss.shape == (2,)
    per_frame = torch.stack([scale_equivariance_loss(xf, zf, decode, 2, mode) for xf, zf in zip(frames(x), frames(z))])
    torch.testing.assert_close(loss, per_frame.mean(dim=0))


def test_se_loss_factor_not_dividing_latent_raises_with_valid_sizes():
    x, z = torch.zeros(1, 3, 48, 80), torch.zeros(1, 4, 6, 10)
    with pytest.raises(ValueError, match=r"4x8 or 8x12"):
        scale_equivariance_loss(x, z, lambda t: t, 4)
    with pytest.raises(ValueError, match=r"multiples of 4"):
        scale_equivariance_loss(torch.zeros(1, 3, 24, 24), torch.zeros(1, 4, 3, 3), lambda t: t, 4)


def test_se_loss_shape_mismatch_raises():
    x, z = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        scale_equivariance_loss(x, z, lambda t: t[..., :-1], 2)


def test_se_loss_gradients_reach_decoder_parameters():
    torch.manual_seed(0)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    x, z = randn(2, 3, 16, 16, seed=18), randn(2, 4, 16, 16, seed=19).requires_grad_(True)
    loss = scale_equivariance_loss(x, z, decoder, 2)
    loss.mean().backward()
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0
    assert decoder.bias.grad is not None and decoder.bias.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0  # and to the encoder side


def test_se_loss_under_bf16_autocast_is_finite():
    torch.manual_seed(0)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    x, z = randn(2, 3, 32, 32, seed=20), randn(2, 4, 32, 32, seed=21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = scale_equivariance_loss(x, z, decoder, 2)
        loss_aa = scale_equivariance_loss(x, z, decoder, 4, "bilinear_antialias")
    assert loss.dtype == torch.float32  # per_sample_mse reduces in float32
    assert torch.isfinite(loss).all() and torch.isfinite(loss_aa).all()
    loss.mean().backward()
    assert torch.isfinite(decoder.weight.grad).all()
    with torch.no_grad():
        ref = scale_equivariance_loss(x, z, decoder, 2)
    torch.testing.assert_close(loss.detach(), ref, rtol=0.05, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_kl_divergence_closed_form_and_torch_distributions(shape):
    mean, logvar = randn(*shape, seed=22), 0.5 * randn(*shape, seed=23)
    got = kl_divergence(mean, logvar)
    assert got.shape == (shape[0],)
    m, lv = mean.double().numpy(), logvar.double().numpy()
    var = np.exp(lv)
    expected = (0.5 * (m**2 + var - 1.0 - lv)).reshape(shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    q = torch.distributions.Normal(mean.double(), torch.exp(0.5 * logvar.double()))
    p = torch.distributions.Normal(torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).mean(dim=1)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5)


def test_kl_divergence_zero_at_standard_normal_and_half_precision():
    z = torch.zeros(2, 4, 8, 8)
    np.testing.assert_allclose(kl_divergence(z, z).numpy(), np.zeros(2), atol=0)
    mean, logvar = randn(2, 4, 8, 8, seed=24), randn(2, 4, 8, 8, seed=25)
    got = kl_divergence(mean.bfloat16(), logvar.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kl_divergence(mean.bfloat16().float(), logvar.bfloat16().float()))


# ----------------------------------------------------------------------------------------------------------------
# CHF loss (eq. 4)
# ----------------------------------------------------------------------------------------------------------------


# fmt: off
JPEG_ZIGZAG_8 = [  # the standard JPEG table (Wallace, 1991)
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


def np_chop(x: np.ndarray, ratio: float, b: int = 8) -> np.ndarray:
    """Zero the last b^2 - floor((1 - ratio) b^2) zigzag coefficients of every block, with scipy (JPEG's table)."""
    assert b == 8
    return np_chop_any(x, ratio, 8, JPEG_ZIGZAG_8)


def test_chf_loss_ratio_zero_identity_decoder_is_zero():
    x = randn(2, 4, 16, 16, seed=26)
    np.testing.assert_allclose(chf_loss(x, x.clone(), lambda z: z, 0.0).numpy(), np.zeros(2), atol=1e-10)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_chf_loss_by_hand(ratio):
    x, z = randn(2, 3, 16, 24, seed=27), randn(2, 3, 16, 24, seed=28)
    # identity decoder and z = x: zero for any ratio
    np.testing.assert_allclose(chf_loss(x, x.clone(), lambda t: t, ratio).numpy(), np.zeros(2), atol=1e-10)
    got = chf_loss(x, z, lambda t: 2 * t, ratio)
    xn, zn = x.double().numpy(), z.double().numpy()
    expected = np_per_sample_mse(2 * np_chop(zn, ratio), np_chop(xn, ratio))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def np_zigzag(b: int) -> list:
    """JPEG zigzag by sorting: anti-diagonal s = u + v first; odd ones run with u increasing, even ones decreasing."""
    cells = [(u, v) for u in range(b) for v in range(b)]
    return [u * b + v for u, v in sorted(cells, key=lambda c: (c[0] + c[1], c[0] if (c[0] + c[1]) % 2 else -c[0]))]


def np_chop_any(x: np.ndarray, ratio: float, b: int, order=None) -> np.ndarray:
    """Keep the first floor((1 - ratio) b^2) zigzag coefficients (``order``, default :func:`np_zigzag`) of every
    b x b block (scipy DCT, any b)."""
    mask = np.zeros(b * b)
    mask[(order or np_zigzag(b))[: int((1 - ratio) * b * b)]] = 1
    mask = mask.reshape(b, b)
    out = np.empty_like(x, dtype=np.float64)
    for i in range(x.shape[-2] // b):
        for j in range(x.shape[-1] // b):
            sl = (..., slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b))
            out[sl] = idctn(dctn(x[sl], norm="ortho", axes=(-2, -1)) * mask, norm="ortho", axes=(-2, -1))
    return out


def test_np_zigzag_is_jpegs_for_8():
    assert np_zigzag(8) == JPEG_ZIGZAG_8


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_chf_cuts_pixels_with_block_times_compression(ratio):
    """App. C.1 as the authors' code: an 8x AE with 8x8 latent blocks cuts the image in 64x64 blocks, so that each
    latent block and the pixels it decodes to lose the same share of the same frequencies."""
    x, z = randn(2, 3, 64, 128, seed=29), randn(2, 4, 8, 16, seed=30)

    def decode(t):  # a stand-in 8x decoder: (B, 4, h, w) -> (B, 3, 8h, 8w)
        return F.interpolate(t[:, :3], scale_factor=8, mode="nearest")

    got = chf_loss(x, z, decode, ratio)
    expected = np_per_sample_mse(decode(torch.from_numpy(np_chop_any(z.double().numpy(), ratio, 8))).numpy(),
                                 np_chop_any(x.double().numpy(), ratio, 64))  # fmt: skip
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the old behaviour (pixels cut in 8x8 blocks like the latents) is a different target
    wrong = np_per_sample_mse(decode(torch.from_numpy(np_chop_any(z.double().numpy(), ratio, 8))).numpy(),
                              np_chop_any(x.double().numpy(), ratio, 8))  # fmt: skip
    assert np.all(np.abs(got.numpy() - wrong) > 1e-3 * np.abs(wrong))
    np.testing.assert_allclose(chf_loss(x, z, decode, ratio, pixel_block_size=8).numpy(), wrong, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# ReconstructionDistance and LPIPS
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_lpips():
    """LPIPS with its shipped linear heads and a random AlexNet trunk: builds without any download."""
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (2, 4, 3, 8, 8)])
def test_reconstruction_distance_mse_only(shape):
    pred, target = randn(*shape, seed=29), randn(*shape, seed=30)
    d = ReconstructionDistance(mse_weight=0.7, lpips_weight=0.0)
    assert d.lpips is None
    expected = 0.7 * np_per_sample_mse(pred.numpy(), target.numpy())
    np.testing.assert_allclose(d(pred, target).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(per_sample_mse(pred, target).numpy(), expected / 0.7, rtol=1e-5)


def test_reconstruction_distance_both_weights_zero_raises():
    with pytest.raises(ValueError):
        ReconstructionDistance(mse_weight=0.0, lpips_weight=0.0)(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8))


def test_reconstruction_distance_lpips_identity_and_positive(offline_lpips):
    x = torch.tanh(randn(2, 3, 64, 64, seed=31))
    y = torch.tanh(randn(2, 3, 64, 64, seed=32))
    d = ReconstructionDistance(mse_weight=0.0, lpips_weight=1.0, lpips_model=offline_lpips)
    same = d(x, x)
    assert same.shape == (2,)
    np.testing.assert_allclose(same.numpy(), np.zeros(2), atol=1e-7)
    diff = d(x, y)
    assert (diff > 0).all()
    # combined: mse_weight * MSE + lpips_weight * LPIPS
    both = ReconstructionDistance(mse_weight=0.5, lpips_weight=2.0, lpips_model=offline_lpips)
    expected = 0.5 * np_per_sample_mse(x.numpy(), y.numpy()) + 2.0 * offline_lpips(x, y).flatten().numpy()
    np.testing.assert_allclose(both(x, y).numpy(), expected, rtol=1e-5)


def test_reconstruction_distance_lpips_video_is_mean_over_frames(offline_lpips):
    x = torch.tanh(randn(2, 3, 3, 64, 64, seed=33))
    y = torch.tanh(randn(2, 3, 3, 64, 64, seed=34))
    d = ReconstructionDistance(mse_weight=0.0, lpips_weight=1.0, lpips_model=offline_lpips)
    got = d(x, y)
    assert got.shape == (2,)
    per_frame = torch.stack([offline_lpips(xf, yf).flatten() for xf, yf in zip(frames(x), frames(y))])  # (T, N)
    torch.testing.assert_close(got, per_frame.mean(dim=0), rtol=1e-5, atol=1e-7)
    # frames differ from each other, so a wrong frame/sample pairing would be detected
    assert per_frame.std(dim=0).min() > 0


def test_reconstruction_distance_lpips_gradients_reach_pred(offline_lpips):
    x = torch.tanh(randn(1, 3, 64, 64, seed=35))
    pred = torch.tanh(randn(1, 3, 64, 64, seed=36)).requires_grad_(True)
    d = ReconstructionDistance(mse_weight=1.0, lpips_weight=1.0, lpips_model=offline_lpips)
    d(pred, x).sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in d.lpips.parameters())


def test_reconstruction_distance_lpips_upsamples_small_images(offline_lpips):
    """Below 32 px both images are bilinearly upsampled (shortest side -> 32) before LPIPS."""
    import torch.nn.functional as F

    x, y = torch.tanh(randn(2, 3, 16, 24, seed=40)), torch.tanh(randn(2, 3, 16, 24, seed=41))
    d = ReconstructionDistance(mse_weight=0.0, lpips_weight=1.0, lpips_model=offline_lpips)

    def up(t):
        return F.interpolate(t, size=(32, 48), mode="bilinear", align_corners=False)

    got = d(x, y)
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got, offline_lpips(up(x), up(y)).flatten(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d(x, x).numpy(), np.zeros(2), atol=1e-7)


def test_reconstruction_distance_lpips_rejects_non_rgb(offline_lpips):
    d = ReconstructionDistance(mse_weight=0.0, lpips_weight=1.0, lpips_model=offline_lpips)
    with pytest.raises(ValueError, match="3-channel"):
        d(torch.zeros(1, 4, 64, 64), torch.zeros(1, 4, 64, 64))


@pytest.fixture
def empty_hub_dir(tmp_path, monkeypatch):
    """torch.hub's folder set to an empty one, as ``torch.hub.set_dir`` does, and unset afterwards: restoring it
    with ``set_dir(get_dir())`` would pin the default path and hide a later test's ``TORCH_HOME``."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_load_lpips_without_cached_trunk_raises(empty_hub_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_lpips("alex")
    message = str(info.value)
    assert LPIPS_TRUNK_FILES["alex"] in message
    assert os.path.join(str(empty_hub_dir), "checkpoints") in message
    with pytest.raises(FileNotFoundError, match="vgg16"):
        load_lpips("vgg")
    # ReconstructionDistance loads LPIPS when its weight is positive, so it raises too
    with pytest.raises(FileNotFoundError, match=LPIPS_TRUNK_FILES["alex"]):
        ReconstructionDistance(lpips_weight=1.0)


def test_load_lpips_unknown_net_and_missing_trunk_path(tmp_path):
    with pytest.raises(ValueError):
        load_lpips("resnet")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_lpips("alex", trunk_path=str(tmp_path / "nope.pth"))


def test_load_lpips_trunk_path_loads_those_weights(tmp_path, empty_hub_dir):
    import torchvision

    torch.manual_seed(123)
    alex = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet_trunk.pth"
    torch.save(alex.state_dict(), path)
    state = alex.state_dict()

    model = load_lpips("alex", trunk_path=str(path))
    own = model.net.state_dict()
    # lpips keeps torchvision's layer indices inside its slices: slice1.0 = features.0, ..., slice5.10 = features.10
    for key in own:
        torch.testing.assert_close(own[key], state["features." + key.split(".", 1)[1]], rtol=0, atol=0)
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice5, "10").weight, state["features.10.weight"], rtol=0, atol=0)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.tanh(randn(1, 3, 64, 64, seed=37))
    assert model(x, x).abs().max().item() < 1e-7


def test_load_lpips_random_trunk_needs_no_file(empty_hub_dir):
    model = load_lpips("alex", pretrained_trunk=False)
    x, y = torch.tanh(randn(1, 3, 64, 64, seed=38)), torch.tanh(randn(1, 3, 64, 64, seed=39))
    assert model(x, y).item() > 0


# ----------------------------------------------------------------------------------------------------------------
# Temporal downsampling and temporal SE
# ----------------------------------------------------------------------------------------------------------------


def np_temporal(x: np.ndarray, f: int) -> np.ndarray:
    """Causal temporal downsampling of ``(N, C, T, H, W)``, frame by frame: frame 0, then means of ``f`` frames."""
    out = [x[:, :, 0]]
    for start in range(1, x.shape[2], f):
        out.append(sum(x[:, :, start + i] for i in range(f)) / f)
    return np.stack(out, axis=2)


def test_temporal_downsample_by_hand():
    x = randn(2, 3, 7, 2, 4, seed=50)
    got = temporal_downsample(x, 2)
    assert got.shape == (2, 3, 4, 2, 4)
    torch.testing.assert_close(got[:, :, 0], x[:, :, 0], rtol=0, atol=0)  # frame 0 alone
    torch.testing.assert_close(got[:, :, 1], (x[:, :, 1] + x[:, :, 2]) / 2)
    torch.testing.assert_close(got[:, :, 2], (x[:, :, 3] + x[:, :, 4]) / 2)
    torch.testing.assert_close(got[:, :, 3], (x[:, :, 5] + x[:, :, 6]) / 2)
    got3 = temporal_downsample(x, 3)
    assert got3.shape == (2, 3, 3, 2, 4)
    np.testing.assert_allclose(got3.numpy(), np_temporal(x.double().numpy(), 3), atol=1e-6)
    x9 = randn(1, 2, 9, 3, 3, seed=51)
    np.testing.assert_allclose(temporal_downsample(x9, 4).numpy(), np_temporal(x9.double().numpy(), 4), atol=1e-6)
    # a single frame is 1 + f * 0 frames: kept as it is
    torch.testing.assert_close(temporal_downsample(x[:, :, :1], 2), x[:, :, :1], rtol=0, atol=0)


def test_temporal_downsample_frame_index_ramp():
    """Frame ``t`` filled with ``t``: the output frames are 0, then the centres of the groups of ``f`` frames."""
    x = torch.arange(13, dtype=torch.float32).reshape(1, 1, 13, 1, 1).expand(2, 3, 13, 4, 4)
    got = temporal_downsample(x, 4)
    expected = torch.tensor([0.0, 2.5, 6.5, 10.5]).reshape(1, 1, 4, 1, 1).expand(2, 3, 4, 4, 4)
    torch.testing.assert_close(got, expected)


def test_temporal_downsample_factor_one_is_identity_and_errors():
    x = randn(2, 3, 6, 4, 4, seed=52)
    assert torch.equal(temporal_downsample(x, 1), x)
    with pytest.raises(ValueError, match=r"1 \+ 2k frames, got 6"):
        temporal_downsample(x, 2)
    with pytest.raises(ValueError, match="got 6"):
        temporal_downsample(x, 4)
    with pytest.raises(ValueError, match="video"):
        temporal_downsample(randn(2, 3, 4, 4, seed=53), 2)
    for bad in (0, -2):
        with pytest.raises(ValueError):
            temporal_downsample(randn(1, 1, 5, 2, 2, seed=54), bad)


@pytest.mark.parametrize("temporal_factor", [2, 4])
def test_se_loss_temporal_identity_decoder_is_zero(temporal_factor):
    x = randn(2, 3, 9, 16, 16, seed=55)
    loss = scale_equivariance_loss(x, x.clone(), lambda z: z, 2, "area", temporal_factor=temporal_factor)
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss.numpy(), np.zeros(2), atol=1e-12)


@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_se_loss_temporal_scaling_decoder_by_hand(mode):
    x, z = randn(2, 3, 5, 16, 16, seed=56), randn(2, 3, 5, 16, 16, seed=57)
    seen = {}

    def decode(t):
        seen["latent_shape"] = tuple(t.shape)
        return 2 * t

    loss = scale_equivariance_loss(x, z, decode, 2, mode, temporal_factor=2)
    assert seen["latent_shape"] == (2, 3, 3, 8, 8)
    xn, zn = x.double().numpy(), z.double().numpy()
    expected = np_per_sample_mse(2 * np_temporal(np_box(zn, 2), 2), np_temporal(np_box(xn, 2), 2))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # differs from the spatial-only loss
    assert not np.allclose(scale_equivariance_loss(x, z, decode, 2, mode).numpy(), expected, rtol=1e-3)


def test_se_loss_temporal_with_a_causal_temporally_compressing_decoder():
    """Latents ``1 + k`` frames at 1/2 resolution; the decoder repeats latent frame 0 once and every later frame
    4 times (a causal 4x temporal compression) and upsamples 2x (nearest)."""

    def decode(t):
        t = torch.cat([t[:, :, :1], t[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return t.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    x, z = randn(2, 3, 9, 16, 16, seed=58), randn(2, 3, 3, 8, 8, seed=59)  # 9 = 1 + 4 * 2 pixel frames
    loss = scale_equivariance_loss(x, z, decode, 2, "area", temporal_factor=2)
    zs = np_temporal(np_box(z.double().numpy(), 2), 2)  # (2, 3, 2, 4, 4)
    recon = np.concatenate([zs[:, :, :1], zs[:, :, 1:].repeat(4, axis=2)], axis=2).repeat(2, -2).repeat(2, -1)
    expected = np_per_sample_mse(recon, np_temporal(np_box(x.double().numpy(), 2), 2))  # x: 9 -> 5 frames
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_se_loss_temporal_factor_errors_and_images():
    x = randn(1, 3, 6, 8, 8, seed=60)
    with pytest.raises(ValueError, match=r"1 \+ 2k latent frames, got 6"):
        scale_equivariance_loss(x, x.clone(), lambda t: t, 2, temporal_factor=2)
    with pytest.raises(ValueError, match="latent frames, got 5"):
        scale_equivariance_loss(
            randn(1, 3, 5, 8, 8, seed=61), randn(1, 3, 5, 8, 8, seed=62), lambda t: t, 2, temporal_factor=3
        )
    # images have no time axis: the temporal factor does not apply
    xi, zi = randn(2, 3, 8, 8, seed=63), randn(2, 3, 8, 8, seed=64)
    torch.testing.assert_close(
        scale_equivariance_loss(xi, zi, lambda t: 2 * t, 2, temporal_factor=2),
        scale_equivariance_loss(xi, zi, lambda t: 2 * t, 2),
    )


# ----------------------------------------------------------------------------------------------------------------
# SEAutoencoderLoss: the objective train_ae_se.py trains with (test_train_ae_se.py checks that the script's step is it)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_kl_vae():
    """A 2x AutoencoderKL with random weights (16x16 latents for 32 px images)."""
    return tiny_autoencoder_kl(mid_block_add_attention=False).eval()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scale_factor", [2, 4])
def test_se_objective_is_eq2_by_hand(tiny_kl_vae, scale_factor):
    """L = d(x, Dec(z)) + alpha d(down(x), Dec(down(z))), z a posterior sample, d = MSE: per sample, with diffusers'
    own encode / sample / decode and the tested downsample."""
    vae, x = tiny_kl_vae, randn(3, 3, 32, 32, seed=70).clamp(-1, 1)
    objective = SEAutoencoderLoss(vae, per_sample_mse, se_weight=0.25)
    with torch.no_grad():
        loss, terms = objective(x, None, scale_factor, generator=seeded(5))
        z = vae.encode(x).latent_dist.sample(seeded(5))  # the same posterior draw
        rec = (vae.decode(z).sample - x).square().flatten(1).mean(1)
        x_small, z_small = downsample(x, scale_factor), downsample(z, scale_factor)
        se = (vae.decode(z_small).sample - x_small).square().flatten(1).mean(1)
    assert loss.shape == (3,) and set(terms) == {"rec", "se"}
    torch.testing.assert_close(loss, rec + 0.25 * se, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["se"], se.mean(), rtol=1e-6, atol=1e-7)
    # alpha = 0 is the paper's "+FT": the reconstruction term alone, and no SE decode
    with torch.no_grad():
        plain, terms = SEAutoencoderLoss(vae, per_sample_mse, se_weight=0.0)(
            x, None, scale_factor, generator=seeded(5)
        )
    torch.testing.assert_close(plain, rec, rtol=1e-6, atol=1e-7)
    assert set(terms) == {"rec"}


@pytest.mark.parametrize("normalization", ["authors", "paper"])
def test_se_objective_with_every_term_is_the_weighted_sum_of_the_tested_terms(tiny_kl_vae, normalization):
    """Sec. 3.3 and App. C: + beta KL (per element) + w CHF (eq. 4-5, pixels cut in (latent block x compression)
    blocks) + gamma soft penalty (eq. 6-7), each the tested function of this file or of spectral.py."""
    from diffusability_hf.spectral import soft_frequency_penalty

    vae, x = tiny_kl_vae, randn(2, 3, 32, 32, seed=71).clamp(-1, 1)
    d = ReconstructionDistance(mse_weight=2.0, lpips_weight=0.0)
    weight = {"se": 0.25, "kl": 1e-3, "chf": 0.5, "soft": 0.1}
    objective = SEAutoencoderLoss(
        vae, d, se_weight=0.25, kl_weight=1e-3, chf_weight=0.5, soft_penalty_weight=0.1, downsample_mode="area",
        dct_block_size=4, soft_penalty_normalization=normalization,
    )  # fmt: skip
    with torch.no_grad():
        loss, terms = objective(x, None, 4, chf_ratio=0.3, generator=seeded(6))
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(seeded(6))

        def decode(latents):
            return vae.decode(latents).sample

        expected = {
            "rec": d(decode(z), x),
            "se": scale_equivariance_loss(x, z, decode, 4, "area", d),
            "kl": kl_divergence(posterior.mean, posterior.logvar),
            "chf": chf_loss(x, z, decode, 0.3, 4, pixel_block_size=4 * 2, distance=d),  # a 2x AE
            "soft": soft_frequency_penalty(z, 4, 2.0, normalization),
        }
    total = expected["rec"] + sum(weight[k] * expected[k] for k in weight)
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-7)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value.mean(), rtol=1e-5, atol=1e-7, msg=key)


def test_se_objective_joint_batches_put_images_first_and_count_every_sample_once(tiny_kl_vae):
    """Joint image + clip batches (Table 5): one per-sample loss per image, then per clip, drawn from one generator
    in that order; a video AE encodes images as 1-frame videos."""
    from diffusability_hf import autoencoders as ae

    config = ae.read_config(os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs", "cogvideox.json"))
    torch.manual_seed(0)
    vae = ae.model_class(config).from_config(config).eval()
    images, clips = randn(2, 3, 32, 32, seed=72).clamp(-1, 1), randn(1, 3, 9, 32, 32, seed=73).clamp(-1, 1)
    objective = SEAutoencoderLoss(vae, per_sample_mse, se_weight=0.25)
    with torch.no_grad():
        loss, terms = objective(images, clips, 2, generator=seeded(7))
        gen = seeded(7)
        image_loss, image_terms = objective.sample_losses(images, 2, generator=gen)
        clip_loss, clip_terms = objective.sample_losses(clips, 2, generator=gen)
    torch.testing.assert_close(loss, torch.cat([image_loss, clip_loss]))  # (2 + 1,)
    torch.testing.assert_close(terms["rec"], torch.cat([image_terms["rec"], clip_terms["rec"]]).mean())
    torch.testing.assert_close(terms["rec_image"], image_terms["rec"].mean())
    torch.testing.assert_close(terms["rec_video"], clip_terms["rec"].mean())


def test_se_objective_refuses_what_it_cannot_compute(tiny_kl_vae):
    x = randn(1, 3, 32, 32, seed=74)
    with pytest.raises(ValueError, match="chf_ratio"):
        SEAutoencoderLoss(tiny_kl_vae, per_sample_mse, chf_weight=1.0)(x, None, 2)
    with pytest.raises(ValueError, match="images, videos or both"):
        SEAutoencoderLoss(tiny_kl_vae, per_sample_mse)(None, None, 2)
    with pytest.raises(ValueError, match="latent_sampling"):
        SEAutoencoderLoss(tiny_kl_vae, per_sample_mse, latent_sampling="mean")
    # the distance (a frozen LPIPS) is not part of the trained state
    d = ReconstructionDistance(1.0, 0.0)
    assert not any(name.startswith("distance") for name, _ in SEAutoencoderLoss(tiny_kl_vae, d).named_modules())
