"""analyze_spectrum.py on posterior samples (``--sample_posterior``, ``--seed``), with per-channel normalisation
(``--normalize_latents per_channel``) and the posterior variance ratio; every number is recomputed here from the
encoder's posterior, independently of the script's code paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffusability_hf.data.evaluation import evaluation_samples
from diffusability_hf.spectral import energy_profile, frequency_profile, share_of_high_frequencies

from testing_utils import ROOT, load_script

TINY_CONFIGS = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")
SEED_STRIDE = 1_000_003  # the documented rule: sample i of --seed s draws eps from a generator seeded s * 1000003 + i


SCRIPT = load_script("analyze_spectrum")


def run(out, *extra, models=None, data=None, batch_size=3):
    """One in-process run of the script (its ``main``) on the image folder; returns spectrum.json."""
    args = ["--models", *models, "--block_size", 4, "--output_dir", out, "--batch_size", batch_size]
    args += ["--data_dir", data, "--resolution", 32] if data is not None else []
    SCRIPT.main(SCRIPT.parse_args([str(a) for a in args + list(extra)]))
    with open(os.path.join(out, "spectrum.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Seven crops of a photograph and, second in file order, one unreadable file (so the sample indices of the
    readable images are not their positions in a batch)."""
    from diffusability_hf.data.images import load_embedded_image

    folder = tmp_path_factory.mktemp("images")
    photo = load_embedded_image("astronaut")
    for i in range(7):
        Image.fromarray(photo[30 * i : 30 * i + 80, 40 * i : 40 * i + 96]).resize((48, 40)).save(folder / f"{i}.png")
    (folder / "0a_broken.png").write_bytes(b"not a png" * 20)
    return folder


@pytest.fixture(scope="module")
def quiet_vae_dir(tiny_vae_dir, tmp_path_factory):
    """The tiny AE with a smaller posterior std, a different one per channel (its random init has std ~1, so that
    the posterior noise is 90-99% of every channel's variance)."""
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= torch.tensor([3.0, 2.0, 3.0, 4.0])  # logvar channels
    path = tmp_path_factory.mktemp("quiet_vae")
    vae.save_pretrained(path)
    return str(path)


def encode_all(vae_dir, image_dir):
    """An AE's posterior of every readable image, encoded here all at once: (indices, mean, std)."""
    samples = evaluation_samples(32, 256, data_dir=str(image_dir))
    items = [samples[i] for i in range(len(samples))]
    indices = [i for i, (_, ok) in enumerate(items) if ok]
    assert len(indices) == 7 and indices != list(range(7))  # the unreadable file sits among the images
    pixels = torch.stack([items[i][0] for i in indices])
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    return indices, dist.mean, dist.std


@pytest.fixture(scope="module")
def posterior(tiny_vae_dir, image_dir):
    return encode_all(tiny_vae_dir, image_dir)


def draw_samples(posterior, seed):
    indices, mean, std = posterior
    eps = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed * SEED_STRIDE + i)) for i in indices]
    )
    return mean + std * eps


def check_spectrum(entry, z):
    np.testing.assert_allclose(entry["profile"], frequency_profile(z, 4).numpy(), rtol=1e-5)
    np.testing.assert_allclose(entry["energy"], energy_profile(z, 4).numpy(), rtol=1e-5)
    assert entry["hf_share"] == pytest.approx(float(share_of_high_frequencies(energy_profile(z, 4))), rel=1e-5)


def variance_ratio_numpy(mean, std):
    m, s = mean.double().numpy(), std.double().numpy()
    posterior_var = (s**2).mean(axis=(0, 2, 3))
    return posterior_var / (m.var(axis=(0, 2, 3)) + posterior_var)


def test_posterior_samples_are_analysed_with_the_seed_rule_and_any_batch_size(
    tmp_path, tiny_vae_dir, image_dir, posterior
):
    models = [f"tiny={tiny_vae_dir}"]
    means = run(tmp_path / "means", models=models, data=image_dir)
    sampled = run(tmp_path / "s3", "--sample_posterior", "--seed", 3, models=models, data=image_dir)
    one_batch = run(tmp_path / "s3b", "--sample_posterior", "--seed", 3, models=models, data=image_dir, batch_size=8)
    other_seed = run(tmp_path / "s4", "--sample_posterior", "--seed", 4, models=models, data=image_dir)

    _, mean, _ = posterior
    check_spectrum(means["models"]["tiny"], mean)
    z = draw_samples(posterior, 3)
    for result in (sampled, one_batch):  # batches of 3 (one holding the unreadable file) or all at once
        check_spectrum(result["models"]["tiny"], z)
        assert result["latents"] == "posterior samples" and result["seed"] == 3
        assert result["models"]["tiny"]["latents"] == "posterior samples"
        assert result["models"]["tiny"]["normalization"] == "none"
    check_spectrum(other_seed["models"]["tiny"], draw_samples(posterior, 4))
    # The samples' spectrum is not the means': the tiny AE's posterior noise is a large part of its latents
    assert abs(sampled["models"]["tiny"]["hf_share"] - means["models"]["tiny"]["hf_share"]) > 0.02
    assert not np.allclose(sampled["models"]["tiny"]["profile"], means["models"]["tiny"]["profile"], rtol=1e-3)
    assert means["latents"] == "posterior means" and means["seed"] is None
    assert means["models"]["tiny"]["latents"] == "posterior means"
    assert means["skipped"] == sampled["skipped"] == 1


def test_posterior_variance_ratio_per_channel(tmp_path, quiet_vae_dir, image_dir):
    _, mean, std = encode_all(quiet_vae_dir, image_dir)
    expected = variance_ratio_numpy(mean, std)
    assert np.all((expected > 0.01) & (expected < 0.9)) and np.ptp(expected) > 0.1  # tells E[std^2] from Var(z)
    for extra in ([], ["--sample_posterior"], ["--normalize_latents", "per_channel"]):
        out = tmp_path / ("run" + "".join(extra))
        entry = run(out, *extra, models=[f"tiny={quiet_vae_dir}"], data=image_dir)["models"]["tiny"]
        np.testing.assert_allclose(entry["posterior_variance_ratio"], expected, rtol=1e-5)
        assert entry["posterior_variance_ratio_mean"] == pytest.approx(expected.mean(), rel=1e-5)
        md = (out / "spectrum.md").read_text()
        (row,) = [line for line in md.splitlines() if "| tiny |" in line and line.startswith("| posterior")]
        assert float(row.strip("|").split("|")[-1]) == pytest.approx(expected.mean(), abs=6e-5)
        assert "posterior variance ratio (mean over channels)" in md


def test_per_channel_normalisation_equals_normalising_first(tmp_path, tiny_vae_dir, image_dir, posterior):
    _, mean, std = posterior
    models = [f"tiny={tiny_vae_dir}"]
    dims = (0, 2, 3)
    m = mean.double().mean(dims)
    var_means = mean.double().var(dims, correction=0)
    posterior_var = std.double().square().mean(dims)

    def standardise(z, var):
        return ((z.double() - m[:, None, None]) / var.sqrt()[:, None, None]).float()

    # Posterior samples, standardised by the samples' statistics (E[z] = E[mean], Var(z) = Var(mean) + E[std^2])
    sampled = run(tmp_path / "pcs", "--sample_posterior", "--seed", 3, "--normalize_latents", "per_channel",
                  "--per_channel", models=models, data=image_dir)  # fmt: skip
    entry = sampled["models"]["tiny"]
    zn = standardise(draw_samples(posterior, 3), var_means + posterior_var)
    check_spectrum(entry, zn)
    check_spectrum(entry["channels"][1], zn[:, 1:2])
    np.testing.assert_allclose(entry["normalization_mean"], m.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(entry["normalization_std"], (var_means + posterior_var).sqrt().numpy(), rtol=1e-5)
    assert entry["normalization"] == sampled["normalization"] == "per_channel"
    assert entry["latents"] == "posterior samples"

    # Posterior means, standardised by the means' statistics
    means = run(tmp_path / "pcm", "--normalize_latents", "per_channel", models=models, data=image_dir)
    check_spectrum(means["models"]["tiny"], standardise(mean, var_means))
    np.testing.assert_allclose(means["models"]["tiny"]["normalization_std"], var_means.sqrt().numpy(), rtol=1e-5)

    # The normalisation changes the pooled spectrum (one scale per channel), unlike one global scale
    raw = run(tmp_path / "raw", "--sample_posterior", "--seed", 3, models=models, data=image_dir)["models"]["tiny"]
    assert not np.allclose(entry["profile"], raw["profile"], rtol=1e-3)
    assert "normalization_mean" not in raw


def test_deterministic_encoder_samples_are_its_means(tmp_path):
    """A deterministic AE (Cosmos) under --sample_posterior: the means' spectrum, a zero variance ratio, said so."""
    from diffusers import AutoencoderKLCosmos

    with open(os.path.join(TINY_CONFIGS, "cosmos.json")) as fh:
        config = json.load(fh)
    torch.manual_seed(0)
    AutoencoderKLCosmos.from_config(config).save_pretrained(tmp_path / "cosmos")
    clips = ["--num_frames", 9, "--num_samples", 2, "--resolution", 32]
    models = [f"cosmos={tmp_path / 'cosmos'}"]
    means = run(tmp_path / "m", *clips, models=models)["models"]["cosmos"]
    sampled = run(tmp_path / "s", *clips, "--sample_posterior", models=models)["models"]["cosmos"]
    assert sampled["profile"] == means["profile"] and sampled["energy"] == means["energy"]
    assert sampled["latents"] == "posterior means" and "deterministic" in sampled["latents_note"]
    assert sampled["posterior_std"] is False and means["posterior_std"] is False
    assert sampled["posterior_variance_ratio"] == [0.0] * 4 and sampled["posterior_variance_ratio_mean"] == 0.0


def test_flags_parse_backward_compatibly_and_are_documented(capsys):
    parse = SCRIPT.parse_args
    assert parse([]).normalize_latents == "none" and not parse([]).sample_posterior and parse([]).seed == 0
    assert parse(["--normalize_latents"]).normalize_latents == "config"  # the old on/off flag
    assert parse(["--normalize_latents", "--per_channel"]).normalize_latents == "config"
    args = parse(["--normalize_latents", "per_channel", "--sample_posterior", "--seed", "7"])
    assert (args.normalize_latents, args.sample_posterior, args.seed) == ("per_channel", True, 7)
    for bad, message in ((["--normalize_latents", "global"], "invalid choice"), (["--seed", "-1"], "--seed")):
        with pytest.raises(SystemExit) as exit_info:
            parse(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_scripts", "analyze_spectrum.py"), "--help"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    for text in ("--sample_posterior", "--seed SEED", "--normalize_latents [{none,config,per_channel}]",
                 "posterior samples z = mean + std * eps", "seed * 1000003 + i", "'per_channel'"):  # fmt: skip
        assert text in help_text, text
