"""PSNR/SSIM, the Frechet distance, running feature statistics and the feature extractors, against independent
references (closed forms, numpy, scipy, scikit-image, torch-fidelity, the raw networks)."""

import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from diffusability_hf.metrics.features import (
    extract_features,
    fetch_weights,
    load_feature_extractor,
    to_uint8,
)
from diffusability_hf.metrics.frechet import (
    FeatureStatistics,
    frechet_distance,
    load_statistics,
    trace_sqrt_product,
)
from diffusability_hf.metrics.quality import mean_and_ci, psnr, ssim

from testing_utils import tiny_autoencoder_kl


def gen(seed):
    return torch.Generator().manual_seed(seed)


def uniform(*shape, seed=0, dtype=torch.float64):
    """Uniform pixels in [-1, 1]."""
    return torch.rand(*shape, generator=gen(seed), dtype=dtype) * 2 - 1


def random_uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=gen(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("offset", [0.5, 0.1, 0.013])
def test_psnr_constant_offset(offset):
    target = uniform(3, 3, 8, 8)
    pred = target + offset  # MSE = offset^2
    np.testing.assert_allclose(psnr(pred, target).numpy(), [10 * math.log10(4 / offset**2)] * 3, rtol=1e-9)
    np.testing.assert_allclose(psnr(target, pred).numpy(), [10 * math.log10(4 / offset**2)] * 3, rtol=1e-9)


def test_psnr_known_noise_and_data_range():
    target = uniform(2, 3, 16, 12, seed=1)
    noise = 0.1 * torch.randn(target.shape, generator=gen(2), dtype=torch.float64)
    mse = noise.square().flatten(1).mean(1).numpy()
    out = psnr(target + noise, target)
    assert out.dtype == torch.float64 and out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), 10 * np.log10(4 / mse), rtol=1e-10)
    np.testing.assert_allclose(
        psnr(target + noise, target, data_range=1.0).numpy(), 10 * np.log10(1 / mse), rtol=1e-10
    )


def test_psnr_float32_inputs_are_scored_in_float64():
    target = uniform(2, 3, 8, 8, seed=3, dtype=torch.float32)
    pred = (target + 0.01 * torch.randn(target.shape, generator=gen(4))).float()
    mse = (pred.double() - target.double()).square().flatten(1).mean(1).numpy()
    out = psnr(pred, target)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), 10 * np.log10(4 / mse), rtol=1e-12)


def test_psnr_is_per_sample():
    target = uniform(2, 3, 8, 8, seed=5)
    offsets = torch.tensor([0.25, 0.05], dtype=torch.float64).view(2, 1, 1, 1)
    out = psnr(target + offsets, target).numpy()
    np.testing.assert_allclose(out, [10 * math.log10(4 / 0.25**2), 10 * math.log10(4 / 0.05**2)], rtol=1e-9)
    # each sample alone gives the same value as in the batch
    for i in range(2):
        np.testing.assert_allclose(psnr(target[i : i + 1] + offsets[i], target[i : i + 1]).numpy(), out[i : i + 1])


def test_psnr_clip_is_mean_of_frame_psnrs():
    target = uniform(2, 3, 4, 8, 10, seed=6)
    # a different noise level per frame, so the mean of PSNRs differs from the PSNR of the mean MSE
    scale = torch.tensor([0.01, 0.05, 0.2, 0.5], dtype=torch.float64).view(1, 1, 4, 1, 1)
    pred = target + scale * torch.randn(target.shape, generator=gen(7), dtype=torch.float64)
    frames = torch.stack([psnr(pred[:, :, t], target[:, :, t]) for t in range(4)], 1)
    np.testing.assert_allclose(psnr(pred, target).numpy(), frames.mean(1).numpy(), rtol=1e-12)
    whole_mse = (pred - target).square().flatten(1).mean(1)
    assert not torch.allclose(psnr(pred, target), 10 * torch.log10(4 / whole_mse))


def test_psnr_identical_is_inf_and_shapes_are_checked():
    x = uniform(2, 3, 8, 8)
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="Shapes differ"):
        psnr(x, x[:, :, :7])
    with pytest.raises(ValueError, match="Expected images"):
        psnr(x[0], x[0])


# ----------------------------------------------------------------------------------------------------------- SSIM


def skimage_ssim(pred, target, data_range=2.0, sigma=1.5):
    """scikit-image's SSIM of (N, C, H, W) pairs, one value per sample."""
    return np.array(
        [
            structural_similarity(
                a.permute(1, 2, 0).numpy(),
                b.permute(1, 2, 0).numpy(),
                channel_axis=-1,
                data_range=data_range,
                gaussian_weights=True,
                sigma=sigma,
                use_sample_covariance=False,
            )
            for a, b in zip(pred, target)
        ]
    )


def structured_pair(n, c, h, w, seed):
    """A smooth gradient/sine image plus noise, and a degraded copy (contrast, brightness, noise)."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
    )
    phase = torch.rand(n, c, 1, 1, generator=gen(seed), dtype=torch.float64) * 6
    base = 0.6 * torch.sin(3 * xx + 2 * yy + phase) + 0.3 * xx
    target = (base + 0.05 * torch.randn(base.shape, generator=gen(seed + 1), dtype=torch.float64)).clamp(-1, 1)
    noise = torch.randn(base.shape, generator=gen(seed + 2), dtype=torch.float64)
    pred = (0.8 * target + 0.1 + 0.1 * noise).clamp(-1, 1)
    return pred, target


@pytest.mark.parametrize("shape", [(2, 3, 11, 11), (2, 3, 32, 40), (1, 1, 23, 17), (2, 3, 40, 13)])
@pytest.mark.parametrize("kind", ["random", "correlated", "structured"])
def test_ssim_matches_skimage(shape, kind):
    if kind == "structured":
        pred, target = structured_pair(*shape, seed=10)
    else:
        target = uniform(*shape, seed=11)
        other = uniform(*shape, seed=12)
        pred = other if kind == "random" else (0.7 * target + 0.3 * other)
    out = ssim(pred, target)
    assert out.dtype == torch.float64 and out.shape == (shape[0],)
    np.testing.assert_allclose(out.numpy(), skimage_ssim(pred, target), rtol=0, atol=1e-6)


@pytest.mark.parametrize("data_range,sigma", [(1.0, 1.5), (2.0, 1.0), (2.0, 2.0)])
def test_ssim_options_match_skimage(data_range, sigma):
    pred, target = structured_pair(2, 3, 24, 30, seed=20)
    out = ssim(pred, target, data_range=data_range, sigma=sigma)
    np.testing.assert_allclose(out.numpy(), skimage_ssim(pred, target, data_range, sigma), rtol=0, atol=1e-6)


def test_ssim_float32_inputs_match_skimage():
    pred, target = structured_pair(2, 3, 16, 20, seed=30)
    pred, target = pred.float(), target.float()
    out = ssim(pred, target)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), skimage_ssim(pred.double(), target.double()), rtol=0, atol=1e-6)


def test_ssim_of_identical_images_is_one_and_lower_otherwise():
    pred, target = structured_pair(3, 3, 16, 16, seed=40)
    np.testing.assert_allclose(ssim(target, target).numpy(), np.ones(3), rtol=0, atol=1e-12)
    assert (ssim(pred, target) < 0.99).all()


@pytest.mark.parametrize("hw", [(10, 11), (11, 10), (5, 5)])
def test_ssim_rejects_images_smaller_than_the_window(hw):
    x = uniform(1, 3, *hw)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)


def test_ssim_clip_is_mean_over_frames():
    pred, target = structured_pair(2, 3, 16, 18, seed=50)
    t = 3
    target = torch.stack([target.roll(k, dims=-1) for k in range(t)], 2)  # (N, C, T, H, W)
    scale = torch.tensor([0.0, 0.2, 0.6], dtype=torch.float64).view(1, 1, t, 1, 1)
    pred = (target + scale * torch.randn(target.shape, generator=gen(51), dtype=torch.float64)).clamp(-1, 1)
    frames = np.stack([skimage_ssim(pred[:, :, k], target[:, :, k]) for k in range(t)], 1)
    np.testing.assert_allclose(ssim(pred, target).numpy(), frames.mean(1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(frames[:, 0], 1.0, atol=1e-12)  # the noise-free frame counts as 1
    with pytest.raises(ValueError, match="Shapes differ"):
        ssim(pred, target[:, :, :2])


def test_mean_and_ci():
    values = [1.0, 2.5, float("inf"), 4.0, float("nan"), -0.5]
    finite = np.array([1.0, 2.5, 4.0, -0.5])
    mean, half = mean_and_ci(values)
    assert mean == pytest.approx(finite.mean())
    assert half == pytest.approx(1.96 * finite.std(ddof=1) / math.sqrt(4))
    assert mean_and_ci(values, z=1.0)[1] == pytest.approx(finite.std(ddof=1) / 2)
    single = mean_and_ci([3.0, float("inf")])
    assert single[0] == 3.0 and math.isnan(single[1])
    assert all(math.isnan(v) for v in mean_and_ci([float("nan")]))


# ------------------------------------------------------------------------------------------------ Frechet distance


def random_spd(d, rng, ridge=0.1):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + ridge * np.eye(d)


def scipy_frechet(mu1, s1, mu2, s2):
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def random_statistics(d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(d), random_spd(d, rng), 0.3 * rng.standard_normal(d), random_spd(d, rng)


@pytest.mark.parametrize("d", [3, 8, 20, 50])
def test_frechet_matches_scipy_sqrtm(d):
    mu1, s1, mu2, s2 = random_statistics(d, seed=d)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2).real), rel=1e-10)


@pytest.mark.parametrize("d", [3, 16, 50])
def test_frechet_matches_torch_fidelity(d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    mu1, s1, mu2, s2 = random_statistics(d, seed=100 + d)
    expected = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected["frechet_inception_distance"], rel=1e-8)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_frechet_of_identical_statistics_is_zero(scale):
    mu1, s1, _, _ = random_statistics(20, seed=7)
    assert abs(frechet_distance(mu1, scale * s1, mu1, scale * s1)) < 1e-8 * scale
    # rank-deficient: 5 samples in 20 dimensions (rank 4)
    feats = scale * np.random.default_rng(8).standard_normal((5, 20))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert np.linalg.matrix_rank(sigma) == 4
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * scale


def test_frechet_rank_deficient_matches_small_eigenproblem():
    """With S1 = A A^T / (n - 1) (A: D x n centred samples), the non-zero eigenvalues of S1 S2 are those of the
    n x n symmetric A^T S2 A / (n - 1): an exact reference that needs no square root of a singular matrix."""
    rng = np.random.default_rng(9)
    x1, x2 = rng.standard_normal((6, 30)), 0.5 + 1.5 * rng.standard_normal((9, 30))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    a = (x1 - mu1).T
    small = a.T @ s2 @ a / (len(x1) - 1)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    # round-off eigenvalues ~1e-15 of the null space add sqrt(1e-15) each to the trace: ~1e-8 relative here
    assert trace_sqrt_product(s1, s2) == pytest.approx(tr_sqrt, rel=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -0.5, 0.3), (2.0, 0.7, 0.1, 3.0)])
def test_frechet_one_dimensional_closed_form(m1, s1, m2, s2):
    fd = frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-14)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(11)
    a, b = rng.uniform(0.01, 3, 12), rng.uniform(0.01, 3, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_covariances_closed_form():
    rng = np.random.default_rng(12)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    a, b = rng.uniform(0.05, 4, 10), rng.uniform(0.05, 4, 10)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [4, 30])
def test_frechet_is_symmetric(d):
    mu1, s1, mu2, s2 = random_statistics(d, seed=200 + d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-10)


def test_frechet_accepts_float32_and_lists():
    mu1, s1, mu2, s2 = random_statistics(5, seed=13)
    expected = frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2)
    reference = scipy_frechet(*(v.astype(np.float32).astype(np.float64) for v in (mu1, s1)), mu2, s2)
    assert expected == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1.tolist(), s1.tolist(), mu2.tolist(), s2.tolist()) == pytest.approx(
        scipy_frechet(mu1, s1, mu2, s2), rel=1e-8
    )


def test_frechet_shape_mismatch_raises():
    mu1, s1, mu2, s2 = random_statistics(4, seed=14)
    mu5, s5, _, _ = random_statistics(5, seed=15)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu5, s5)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2, s5)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s5, mu2, s5)  # covariance size differs from the mean's
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1[:, :3], mu2, s2[:, :3])


def test_frechet_is_never_negative():
    """Nearly identical (and rank-deficient) statistics, where the round-off in the trace term can exceed the true
    distance: the result stays >= 0 and close to the true tiny value."""
    rng = np.random.default_rng(16)
    for seed in range(10):
        feats = 100 * np.random.default_rng(seed).standard_normal((4 + seed, 25))
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
        fd = frechet_distance(mu, sigma, mu + 1e-9, sigma)
        assert fd >= 0 and fd < 1e-6
        mu1, s1, _, _ = random_statistics(25, seed=seed)
        eps = 1e-10 * rng.standard_normal(25)
        fd = frechet_distance(mu1, s1, mu1 + eps, s1)
        assert fd >= 0 and fd == pytest.approx(eps @ eps, abs=1e-9)


# ------------------------------------------------------------------------------------------------ FeatureStatistics


def test_feature_statistics_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(20)
    feats = 3.0 + rng.standard_normal((40, 7)) @ rng.standard_normal((7, 7))
    stats = FeatureStatistics()
    start = 0
    for i, size in enumerate([1, 7, 3, 13, 16]):
        chunk = feats[start : start + size]
        stats.update(torch.from_numpy(chunk) if i % 2 else chunk)  # tensors and arrays
        start += size
    assert start == len(feats) and stats.n == len(feats)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_statistics_float32_and_higher_rank_features():
    x = torch.randn(12, 5, 1, 1, generator=gen(21))  # e.g. (B, D, 1, 1) pooled maps
    stats = FeatureStatistics(dim=5)
    stats.update(x[:5]).update(x[5:])
    ref = x.flatten(1).double().numpy()
    np.testing.assert_allclose(stats.mu, ref.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-14)


def test_feature_statistics_save_load_round_trip(tmp_path):
    feats = np.random.default_rng(22).standard_normal((9, 4))
    stats = FeatureStatistics().update(feats[:4]).update(feats[4:])
    meta = {"extractor": "inception", "fingerprint": "abc", "n_images": 9, "nested": {"res": [256, 256]}}
    path = str(tmp_path / "stats.npz")
    stats.save(path, meta)
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]  # no temporary file left behind
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded["mu"], stats.mu)
    np.testing.assert_array_equal(loaded["sigma"], stats.sigma)
    assert loaded["n"] == 9 and loaded["meta"] == meta
    stats.save(path)  # overwrite, no meta
    assert load_statistics(path)["meta"] == {}


def test_concurrent_saves_of_one_cache_entry(tmp_path):
    """Two evaluations that compute the same reference statistics at once both write the cache entry: every save
    succeeds, the file read afterwards is whole, and no temporary file is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    stats = FeatureStatistics().update(np.random.default_rng(5).standard_normal((300, 200)))
    path = str(tmp_path / "stats.npz")

    def save_many(k):
        for _ in range(15):
            stats.save(path, {"writer": k})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save_many, range(4)))
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded["sigma"], stats.sigma)
    assert loaded["meta"]["writer"] in range(4)


def test_load_statistics_foreign_and_invalid_files(tmp_path):
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    loaded = load_statistics(str(tmp_path / "pytorch_fid.npz"))
    assert loaded["mu"].dtype == np.float64 and loaded["n"] is None and loaded["meta"] == {}
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    np.savez(tmp_path / "other.npz", x=mu)
    with pytest.raises(ValueError, match="not a statistics file"):
        load_statistics(str(tmp_path / "other.npz"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_feature_statistics_reject_non_finite_features(bad):
    stats = FeatureStatistics().update(np.ones((2, 3)))
    feats = np.zeros((2, 3))
    feats[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.update(feats)
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureStatistics().update(torch.from_numpy(feats))


def test_feature_statistics_reject_changing_sizes_and_too_few_samples():
    stats = FeatureStatistics().update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="changed from 4 to 5"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="changed from 6 to 4"):
        FeatureStatistics(dim=6).update(np.zeros((2, 4)))
    one = FeatureStatistics().update(np.ones((1, 2)))
    np.testing.assert_array_equal(one.mu, [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        _ = one.sigma


# ------------------------------------------------------------------------------------------------ weights lookup

URL = "https://example.invalid/weights/some-file.pth"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder (and no torch.hub.set_dir override); returns the checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return str(tmp_path / "torch_home" / "hub" / "checkpoints")


def test_fetch_weights_offline_missing_names_file_folder_and_flag(empty_torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        fetch_weights(None, "some-file.pth", URL, "--some_flag")
    message = str(err.value)
    for part in ("some-file.pth", empty_torch_home, "--some_flag", URL):
        assert part in message
    assert not os.path.exists(empty_torch_home)  # nothing created offline


def test_fetch_weights_explicit_path(tmp_path, empty_torch_home):
    missing = str(tmp_path / "nowhere" / "weights.pth")
    with pytest.raises(FileNotFoundError) as err:
        fetch_weights(missing, "some-file.pth", URL, "--some_flag")
    assert missing in str(err.value) and "--some_flag" in str(err.value)
    with pytest.raises(FileNotFoundError):
        fetch_weights(str(tmp_path), "some-file.pth", URL, "--some_flag")  # a folder is not a weights file
    present = tmp_path / "mine.pth"
    present.write_bytes(b"x")
    assert fetch_weights(str(present), "some-file.pth", URL, "--some_flag") == str(present)


def test_fetch_weights_finds_the_checkpoint_cache(empty_torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.makedirs(empty_torch_home)
    cached = os.path.join(empty_torch_home, "some-file.pth")
    with open(cached, "wb") as fh:
        fh.write(b"weights")
    assert fetch_weights(None, "some-file.pth", URL, "--some_flag") == cached
    with pytest.raises(FileNotFoundError, match="other-file.pth"):
        fetch_weights(None, "other-file.pth", URL, "--some_flag")


def test_fetch_weights_online_downloads_into_the_cache(empty_torch_home, monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "0")
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append((url, dst))
        with open(dst, "wb") as fh:
            fh.write(b"downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = fetch_weights(None, "some-file.pth", URL, "--some_flag")
    assert path == os.path.join(empty_torch_home, "some-file.pth") and calls == [(URL, path)]
    assert fetch_weights(None, "some-file.pth", URL, "--some_flag") == path and len(calls) == 1  # cached now

    def failing_download(url, dst, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    with pytest.raises(FileNotFoundError) as err:
        fetch_weights(None, "another.pth", URL, "--some_flag")
    assert "another.pth" in str(err.value) and "--some_flag" in str(err.value) and "unreachable" in str(err.value)


# ------------------------------------------------------------------------------------------------ feature extractors


def test_to_uint8_levels_rounding_and_clamping():
    levels = torch.arange(256)
    np.testing.assert_array_equal(to_uint8(levels / 127.5 - 1).numpy(), levels.numpy())  # every level round-trips
    x = torch.tensor([-1.0, 1.0, 0.0, -5.0, 3.0, -1.0001, 1.0001, 1e-3, -1e-3])
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    # 0 -> 127.5, rounded half to even -> 128; out-of-range values clamp; tiny offsets round to the nearest level
    np.testing.assert_array_equal(out.numpy(), [0, 255, 128, 0, 255, 0, 255, 128, 127])
    # either side of the 127/128 boundary (0 is exactly on it) and of the 0/1 and 254/255 ones
    near = torch.tensor([-1e-5, 1e-5, -1 + 0.9 / 255, -1 + 1.1 / 255, 1 - 0.9 / 255, 1 - 1.1 / 255])
    assert to_uint8(near).tolist() == [127, 128, 0, 1, 255, 254]
    np.testing.assert_array_equal(to_uint8(x.half()).numpy(), out.numpy())
    np.testing.assert_array_equal(to_uint8(x.bfloat16()).numpy(), out.numpy())


@pytest.fixture(scope="module")
def inception(random_inception_weights):
    return load_feature_extractor("inception", inception_weights=random_inception_weights)


def test_inception_features_images_and_clips(inception):
    assert inception.metric == "FID" and not inception.video and len(inception.fingerprint) == 16
    clip = random_uint8(2, 3, 2, 32, 32, seed=30)  # (B, 3, T, H, W)
    per_frame = [inception(clip[:, :, t]) for t in range(2)]  # images (B, 3, H, W)
    for f in per_frame:
        assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert not torch.allclose(per_frame[0][0], per_frame[0][1])  # features depend on the image
    rows = inception(clip)
    assert rows.shape == (4, 2048)
    expected = torch.stack(per_frame, 1).flatten(0, 1)  # row b * T + t is frame t of clip b
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)


def test_inception_rejects_float_and_non_rgb(inception):
    with pytest.raises(TypeError, match="uint8"):
        inception(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        inception(random_uint8(1, 1, 32, 32))


def manual_transformers_features(folder, x, size):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(folder).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as in dgm-eval
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y = F.interpolate(x.float() / 255, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    with torch.no_grad():
        return model(pixel_values=(y.clamp(0, 1) - mean) / std).pooler_output


@pytest.mark.parametrize("hw", [(20, 24), (224, 224)])
def test_dinov2_features_match_manual_preprocessing(tiny_feature_models, hw):
    folder = tiny_feature_models["dinov2"]
    extractor = load_feature_extractor("dinov2", dinov2_model=folder)
    assert extractor.metric == "FDD" and extractor.image_size == 224 and not extractor.video
    x = random_uint8(3, 3, *hw, seed=31)
    out = extractor(x)
    assert out.shape == (3, 16)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out, manual_transformers_features(folder, x, 224), rtol=1e-4, atol=1e-5)
    clip = torch.stack([x, x.flip(-1)], 2)  # (3, 3, 2, H, W)
    torch.testing.assert_close(extractor(clip).view(3, 2, -1)[:, 0], out, rtol=1e-4, atol=1e-5)


def test_local_transformers_folder_uses_its_image_size(tiny_feature_models, tmp_path):
    folder = tiny_feature_models["dinov2"]
    extractor = load_feature_extractor(folder)
    assert extractor.metric == "FD-tiny_dinov2" and extractor.image_size == 28
    x = random_uint8(2, 3, 40, 36, seed=32)
    torch.testing.assert_close(extractor(x), manual_transformers_features(folder, x, 28), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="config.json"):
        load_feature_extractor(str(tmp_path))


def test_i3d_features_match_the_torchscript(tiny_feature_models):
    extractor = load_feature_extractor("i3d", i3d_model=tiny_feature_models["i3d"])
    assert extractor.metric == "FVD" and extractor.video
    clip = random_uint8(2, 3, 4, 16, 20, seed=33)
    out = extractor(clip)
    net = torch.jit.load(tiny_feature_models["i3d"])
    with torch.no_grad():
        expected = net(clip.float(), rescale=True, resize=True, return_features=True)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="video metric"):
        extractor(clip[:, :, 0])
    with pytest.raises(TypeError, match="uint8"):
        extractor(clip.float())


@pytest.fixture
def torchscript_extractor(tiny_feature_models):
    return load_feature_extractor(tiny_feature_models["torchscript"])


def test_local_torchscript_features(tiny_feature_models, torchscript_extractor):
    extractor = torchscript_extractor
    assert extractor.metric.startswith("FD-") and extractor.metric == "FD-tiny_features" and not extractor.video
    net = torch.jit.load(tiny_feature_models["torchscript"])
    x = random_uint8(3, 3, 16, 16, seed=34)
    with torch.no_grad():
        expected = net(x.float() / 255)
    torch.testing.assert_close(extractor(x), expected)
    clip = random_uint8(2, 3, 3, 16, 16, seed=35)
    with torch.no_grad():
        frames = torch.stack([net(clip[:, :, t].float() / 255) for t in range(3)], 1).flatten(0, 1)
    torch.testing.assert_close(extractor(clip), frames)


def test_unknown_feature_extractor_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        load_feature_extractor(str(tmp_path / "no_such_model.pt"))
    for name in ("inception", "dinov2", "i3d", "no_such_model.pt"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="inception"):
        load_feature_extractor("clip")


def test_missing_inception_and_i3d_weights_name_their_flags(empty_torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        load_feature_extractor("inception")
    with pytest.raises(FileNotFoundError, match="--i3d_model"):
        load_feature_extractor("i3d")


def test_extract_features_quantises_and_batches(torchscript_extractor):
    x = uniform(5, 3, 16, 16, seed=36, dtype=torch.float32) * 1.2  # some values out of [-1, 1]
    out = extract_features(torchscript_extractor, x, batch_size=2)
    torch.testing.assert_close(out, torchscript_extractor(to_uint8(x)))
    assert out.shape == (5, 6)
    # quantisation: a perturbation below half a level changes nothing
    torch.testing.assert_close(extract_features(torchscript_extractor, to_uint8(x).float() / 127.5 - 1 + 1e-3), out)
    clips = uniform(2, 3, 3, 16, 16, seed=37, dtype=torch.float32)
    torch.testing.assert_close(
        extract_features(torchscript_extractor, clips, batch_size=1), torchscript_extractor(to_uint8(clips))
    )


def test_feature_statistics_merge_equals_one_pass_and_leaves_parts_alone():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(23, 5))
    parts = [FeatureStatistics().update(feats[:7]), FeatureStatistics(), FeatureStatistics().update(feats[7:])]
    before = parts[0].total.copy()
    merged = FeatureStatistics.merge(parts)
    np.testing.assert_allclose(merged.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(feats, rowvar=False), rtol=1e-10)
    assert merged.n == 23 and np.array_equal(parts[0].total, before)


# ----------------------------------------------------------------------------------------------------------------
# An AE's reconstruction and latent spectrum on validation pixels (what train_ae_se.py measures before and after)


def _tiny_kl():
    return tiny_autoencoder_kl()


def test_reconstruction_metrics_match_their_definitions_and_leave_the_rng_alone():
    from diffusability_hf import autoencoders as ae
    from diffusability_hf.metrics.reconstruction import reconstruction_metrics
    from diffusability_hf.spectral import energy_profile, frequency_profile, high_frequency_share

    vae, x = _tiny_kl().train(), torch.rand(3, 3, 16, 16) * 2 - 1
    state = torch.random.get_rng_state()
    out = reconstruction_metrics(vae, x, dct_block_size=4, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state) and vae.training  # both as they were
    with torch.no_grad():
        z = ae.encode(vae, x).mode()
        recon = vae.decode(z).sample.clamp(-1, 1)
    assert out["psnr"] == pytest.approx(psnr(recon, x).mean().item(), rel=1e-5)
    assert out["hf_share"] == pytest.approx(high_frequency_share(z, 4).item(), rel=1e-5)
    assert out["profile"] == pytest.approx(frequency_profile(z, 4).tolist(), rel=1e-5)
    assert out["energy"] == pytest.approx(energy_profile(z, 4).tolist(), rel=1e-5)
    assert out["recon"].shape == x.shape and "frame_profiles" not in out


def test_rgb_spectrum_and_cross_decoding():
    from diffusability_hf.losses import downsample
    from diffusability_hf.metrics.reconstruction import cross_decoding, reconstruction_metrics, rgb_spectrum
    from diffusability_hf.spectral import frequency_profile

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert rgb_spectrum(x, 2, 4)["profile"] == frequency_profile(downsample(x, 2, "area"), 4).tolist()
    vae, other = _tiny_kl(), _tiny_kl()
    with torch.no_grad():
        other.decoder.conv_out.weight.mul_(0.5)  # another decoder, the same encoder
    before = {"image": reconstruction_metrics(vae, x, dct_block_size=4)}
    after = {"image": reconstruction_metrics(other, x, dct_block_size=4)}
    cross = cross_decoding(vae, other, {"image": x}, before, after, dct_block_size=4)["image"]
    assert cross["base_encoder_base_decoder"] == before["image"]["psnr"]
    assert cross["new_encoder_new_decoder"] == after["image"]["psnr"]
    assert cross["base_encoder_new_decoder"] == pytest.approx(after["image"]["psnr"])  # same encoders
    assert cross["new_encoder_base_decoder"] == pytest.approx(before["image"]["psnr"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_inception_weights_are_read_as_data_a_payload_never_runs(tmp_path, random_inception_weights, inception):
    """torch-fidelity unpickles --inception_weights with weights_only=False; the toolkit reads them as tensors first."""
    import pickle

    marker, bad = tmp_path / "pwned", tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="is not a plain state dict of tensors") as err:
        load_feature_extractor("inception", inception_weights=str(bad))
    assert not marker.exists() and "\n" not in str(err.value)
    again = load_feature_extractor("inception", inception_weights=random_inception_weights)  # the real format loads
    x = random_uint8(1, 3, 32, 32, seed=3)
    assert torch.equal(again(x), inception(x))
