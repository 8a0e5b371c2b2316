"""The diffusability score: each proxy against what it must give on constructed inputs, the rank statistics against
scipy, and the script on two tiny autoencoders (in-process, plus one subprocess for the exit-code contract)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from diffusability_hf.flow import held_out_flow_loss
from diffusability_hf.metrics import diffusability as dm
from diffusability_hf.models.selfcond_dit import SelfConditionedDiT

from testing_utils import ROOT, load_script


def smooth(n, c=4, size=16, seed=0):
    """Smooth random fields: white noise blurred by a 5x5 box, so most energy sits at low frequencies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size + 4, size + 4, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, stride=1)


def test_spectral_proxies_tell_white_noise_from_smooth_fields():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 4, 16, 16, generator=g)
    white, soft = dm.spectral_proxies(noise, noise), dm.spectral_proxies(smooth(64), noise)
    assert white["hf_share"] == pytest.approx(0.5, abs=0.03)  # flat spectrum: half the AC energy in the upper half
    assert abs(white["spectral_slope"]) < 0.1 and white["rgb_profile_distance"] == pytest.approx(0.0, abs=1e-12)
    assert soft["hf_share"] < 0.05 and soft["spectral_slope"] < -1.0 and soft["rgb_profile_distance"] > 0.5


def test_dct_cut_and_noise_robustness_with_an_identity_decoder():
    z = smooth(32)
    cut = dm.dct_cut_curve(lambda x: x, z, z, [0.0, 0.5])
    assert cut["psnr"][0.0] > 100 and cut["psnr"][0.5] < 60  # nothing cut: (near) exact
    cut = dm.dct_cut_curve(lambda x: x, z, z, [0.25, 0.5, 0.75])
    noisy = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cut_noisy = dm.dct_cut_curve(lambda x: x, noisy, noisy, [0.25, 0.5, 0.75])
    assert cut["dct_cut_slope"] < 0 and cut_noisy["dct_cut_slope"] < 0
    assert cut["psnr"][0.5] > cut_noisy["psnr"][0.5]  # a smooth latent loses little when its highs are cut
    # identity decoding of z + s sigma eps: MSE = s^2 sigma^2 E[eps^2] per channel, PSNR = 10 log10(4 / MSE)
    z = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.1
    robust = dm.noise_robustness(lambda x: x, z, z, [0.1, 1.0], torch.Generator().manual_seed(3))
    for s, value in robust["psnr"].items():
        assert value == pytest.approx(10 * math.log10(4 / (s * 0.1) ** 2), abs=0.1)
    assert robust["noise_psnr"] == pytest.approx(np.mean(list(robust["psnr"].values())))


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 32, generator=g) * 3
    x = centres[labels] + torch.randn(200, 32, generator=g)
    assert dm.linear_probe_accuracy(x[:150].double(), labels[:150], x[150:].double(), labels[150:]) == 1.0
    shuffled = labels[torch.randperm(200, generator=g)]
    chance = dm.linear_probe_accuracy(x[:150].double(), shuffled[:150], x[150:].double(), shuffled[150:])
    assert chance < 0.6
    # the dual form (fewer samples than features) is the primal ridge solution (push-through identity)
    wide, y = torch.randn(20, 64, generator=g).double(), torch.arange(20) % 3
    train, test = wide[:12], wide[12:]
    mean, std = train.mean(0), train.std(0)
    a = torch.cat([(train - mean) / std, torch.ones(12, 1, dtype=torch.float64)], 1)
    b = torch.cat([(test - mean) / std, torch.ones(8, 1, dtype=torch.float64)], 1)
    target = torch.nn.functional.one_hot(y[:12], 3).double()
    w = torch.linalg.solve(a.T @ a + torch.eye(65, dtype=torch.float64), a.T @ target)
    primal = float(((b @ w).argmax(1) == y[12:]).double().mean())
    assert dm.linear_probe_accuracy(train, y[:12], test, y[12:]) == primal
    assert dm.pooled(torch.ones(2, 3, 16, 16), 8).shape == (2, 3 * 64)


def tiny_dit(num_classes=3, channels=4, size=8):
    torch.manual_seed(0)
    return SelfConditionedDiT(num_attention_heads=2, attention_head_dim=8, in_channels=channels, num_layers=1,
                              sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes,
                              pos_embed="rope+sincos", class_embed_init_std=1.0)  # fmt: skip


def test_held_out_flow_loss_does_not_depend_on_the_batch_size_and_restores_the_mode():
    model = tiny_dit()
    model.train()
    x0 = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 3
    a = held_out_flow_loss(model, x0, labels, 3, [0.25, 0.75], torch.Generator().manual_seed(5), batch_size=3)
    b = held_out_flow_loss(model, x0, labels, 3, [0.25, 0.75], torch.Generator().manual_seed(5), batch_size=64)
    assert model.training and a["num_samples"] == 10 and a["sigma"] == [0.25, 0.75]
    for key in ("loss", "loss_null_class"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    # by hand at one level, without self-conditioning's auxiliary pass for a model without it
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    plain = SelfConditionedDiT(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=3, self_conditioning=False)  # fmt: skip
    got = held_out_flow_loss(plain, x0, labels, 3, [0.5], torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_t = 0.5 * x0 + 0.5 * noise
        pred = plain(x_t, torch.full((10,), 500.0), labels).sample[:, :4]
    expected = float((pred - (noise - x0)).square().flatten(1).mean(1).mean())
    assert got["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_flow_probe_learns_and_its_class_gain_sees_the_label():
    """Two classes whose latents differ only by their mean: trained, the probe's loss falls and, at high noise (where
    only the label tells the classes apart), the true label is worth far more than a shuffled one."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 2
    x = torch.randn(96, 4, 8, 8, generator=g) * 0.3 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    shuffled = labels[torch.randperm(96, generator=g)]
    untrained = dm.flow_probe(tiny_dit(2), x[:64], labels[:64], x[64:], labels[64:], 2, steps=1, noise_levels=4)
    probes = [dm.flow_probe(tiny_dit(2), x[:64], y[:64], x[64:], y[64:], 2, steps=150, batch_size=16,
                            learning_rate=3e-3, noise_levels=4) for y in (labels, shuffled)]  # fmt: skip
    trained, blind = probes
    assert trained["flow_loss_auc"] < untrained["flow_loss_auc"] and trained["steps"] == 150
    assert trained["class_gain"][-1] > 0.1 and trained["class_gain"][-1] > 2 * blind["class_gain"][-1]
    assert trained["flow_class_gain"] > blind["flow_class_gain"]
    assert trained["flow_loss_auc"] == pytest.approx(np.mean(trained["loss"]))


def test_rank_statistics_against_scipy_and_by_hand():
    from scipy import stats

    proxy, fd = [0.1, 0.4, 0.2, 0.9, 0.5], [10.0, 7.0, 9.0, 2.0, 8.0]
    r = dm.rank_correlations(proxy, fd)
    assert r["spearman"] == pytest.approx(stats.spearmanr(proxy, fd).statistic) and r["spearman"] < -0.8
    assert r["kendall"] == pytest.approx(stats.kendalltau(proxy, fd).statistic)
    # pairs: FD gaps of 1 (10 vs 9, 9 vs 8, 8 vs 7) are within noise (2 * sqrt(0.5^2 + 0.5^2) = 1.41), 7 of the
    # 10 pairs are separated, and the proxy (higher = better) orders all 7 as FD does; lowering one value flips some
    pa = dm.pair_agreement([0.1, 0.4, 0.2, 0.9, 0.5], fd, [0.5] * 5, +1)
    assert pa["separated"] == 7 and pa["agree"] == 7 and pa["agreement"] == 1.0
    flipped = dm.pair_agreement([0.1, 0.4, 0.2, 0.9, 0.05], fd, [0.5] * 5, +1)
    assert flipped["agree"] < flipped["separated"]
    scores = {"a": {"hf_share": 0.3}, "b": {"hf_share": 0.1}, "c": {"hf_share": float("nan")}}
    assert dm.predicted_ranking(scores, "hf_share") == ["b", "a", "c"]  # lower share predicted better; NaN last
    rng = np.random.default_rng(0)
    per_seed = np.array([[10.0], [8.0], [6.0], [4.0], [2.0], [1.0]]) + rng.normal(0, 0.1, (6, 3))
    ci = dm.bootstrap_spearman(np.arange(6.0), per_seed, draws=300)
    assert ci["low"] <= ci["high"] <= -0.5 and ci["draws"] > 200


# ----------------------------------------------------------------------------------------------------------------
# The script


TINY = ["--resolution", "32", "--train_crops", "24", "--reference_crops", "12", "--heldout_crops", "6",
        "--probe_steps", "3", "--probe_batch_size", "8", "--dit_width", "16", "--dit_depth", "1", "--noise_levels", "3",
        "--cut_ratios", "0", "0.5"]  # fmt: skip


def test_scores_two_autoencoders_on_the_bench_data_and_on_image_folders(tmp_path, tiny_vae_dir):
    from diffusers import AutoencoderKL

    from diffusability_hf import autoencoders as ae

    other = tmp_path / "other"
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    vae.save_pretrained(other)
    script = load_script("diffusability_score")
    out = tmp_path / "out"
    args = script.parse_args(["--models", f"tiny={tiny_vae_dir}", f"half={other}", *TINY, "--output_dir", str(out)])
    script.main(args)
    report = json.loads((out / "scores.json").read_text())
    assert list(report["models"]) == ["tiny", "half"]
    for label, path in (("tiny", tiny_vae_dir), ("half", str(other))):
        entry = report["models"][label]
        assert entry["weights_fingerprint"] == ae.weights_fingerprint(AutoencoderKL.from_pretrained(path))
        for proxy in dm.PROXIES:
            assert math.isfinite(entry[proxy]), (label, proxy)
        assert entry["seconds"]["total"] > 0 and len(entry["flow_probe"]["loss"]) == 3
    # the encoder is shared: the spectrum and the probes match, the decoder's scale changes the pixel proxies
    tiny, half = report["models"]["tiny"], report["models"]["half"]
    assert tiny["hf_share"] == half["hf_share"] and tiny["linear_probe"] == half["linear_probe"]
    assert tiny["noise_psnr"] != half["noise_psnr"]
    for proxy in dm.PROXIES:
        assert sorted(report["rankings"][proxy]) == ["half", "tiny"]
    text = (out / "scores.md").read_text()
    assert "| tiny |" in text and "Predicted ranking" in text and (out / "scores.png").stat().st_size > 0
    with pytest.raises(Exception, match="--overwrite_output_dir"):  # results are never overwritten silently
        script.main(args)

    # image folders whose subfolders are the classes; the reference folder's classes map onto the training ones
    photo = skimage.data.astronaut()
    for split, n in (("train", 6), ("reference", 3)):
        for k, name in enumerate(("astronaut", "coffee")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = photo[30 * i : 30 * i + 32, 200 * k : 200 * k + 32]
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "reference" / "chelsea").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "reference" / "chelsea" / "0.png")
    folders = ["--train_data_dir", str(tmp_path / "train"), "--reference_data_dir", str(tmp_path / "reference")]
    with pytest.raises(Exception, match="class 'chelsea', which the training folder lacks"):
        script.main(
            script.parse_args(["--models", tiny_vae_dir, *TINY, *folders, "--output_dir", str(tmp_path / "f")])
        )
    os.remove(tmp_path / "reference" / "chelsea" / "0.png")
    os.rmdir(tmp_path / "reference" / "chelsea")
    script.main(script.parse_args(["--models", tiny_vae_dir, *TINY, *folders, "--output_dir", str(tmp_path / "f")]))
    folder = json.loads((tmp_path / "f" / "scores.json").read_text())
    assert "(12 images)" in folder["data"] and math.isfinite(next(iter(folder["models"].values()))["flow_loss_auc"])


def test_bad_arguments_get_one_line_before_anything_loads(tmp_path, capsys):
    script = load_script("diffusability_score")
    for argv, message in (
        (["--models", "a=x", "a=y"], "share a label"),
        (["--models", "a=x", "--train_data_dir", str(tmp_path)], "together"),
        (["--models", "a=x", "--cut_ratios", "0.5"], "two distinct ratios"),
        (["--models", "a=x", "--dit_width", "15"], "multiple of --dit_heads"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_scripts", "diffusability_score.py"), "--models",
         f"a={tmp_path / 'missing'}", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
