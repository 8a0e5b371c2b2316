"""End-to-end runs of eval_ae.py, analyze_spectrum.py and eval_dit.py on tiny models with tiny random feature
extractors, offline; every number that matters is recomputed here independently."""

import io
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image

from diffusability_hf.autoencoders import weights_fingerprint
from diffusability_hf.data.evaluation import EvalSamples, evaluation_samples
from diffusability_hf.errors import UsageError
from diffusability_hf.figures import labelled_image_grid
from diffusability_hf.losses import downsample
from diffusability_hf.metrics import frechet_distance
from diffusability_hf.spectral import (
    chop_high_frequencies,
    energy_profile,
    frequency_profile,
    share_of_high_frequencies,
)

from testing_utils import ROOT, Forked, load_script

TINY_CONFIGS = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")


def torchscript_features(path, pixels):
    """The local TorchScript feature model applied by hand: uint8 -> float [0, 1] -> features (float64)."""
    net = torch.jit.load(path)
    u8 = ((pixels.clamp(-1, 1) + 1) * 127.5).round()
    with torch.no_grad():
        return net(u8 / 255).double().numpy()


def mean_psnr(recon, pixels):
    mse = ((recon.double() - pixels.double()) ** 2).flatten(1).mean(1).numpy()
    return np.mean(10 * np.log10(4 / mse))


def snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_process(monkeypatch, capsys, name, args):
    """Run ``python train_scripts/<name> args`` in this process (its ``__main__`` block; no second interpreter to
    start: runs whose launcher behaviour other tests cover); returns its stdout."""
    path = os.path.join(ROOT, "train_scripts", name)
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    capsys.readouterr()
    runpy.run_path(path, run_name="__main__")
    return capsys.readouterr().out


def run_refused(monkeypatch, capsys, name, args, forbid_loading=True):
    """Run ``python train_scripts/<name> args`` in this process (its ``__main__`` block, as the command line does)
    and expect a refusal: exit code 2 and one ``error: ...`` line on stderr, no traceback; returns that line.

    ``forbid_loading``: anything that loads a model, data or a feature network, or starts accelerate, fails the test.
    """
    import accelerate

    from diffusability_hf import autoencoders, losses, metrics
    from diffusability_hf.data import evaluation
    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("something loaded before the output folder was checked")

    if forbid_loading:
        for module, attr in [
            (accelerate, "Accelerator"), (autoencoders, "load_pretrained"), (autoencoders, "check_model_specs"),
            (evaluation, "evaluation_samples"), (metrics, "load_feature_extractor"), (losses, "load_lpips"),
            (metrics.features, "load_feature_extractor"), (DiTFlowMatchPipeline, "from_pretrained"),
        ]:  # fmt: skip
            monkeypatch.setattr(module, attr, forbidden)
    path = os.path.join(ROOT, "train_scripts", name)
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def assert_grid_close(path, expected):
    """A PNG written by a script equals a grid built here, up to a rare pixel one level off (float round-off of
    other batch compositions)."""
    got = np.asarray(Image.open(path).convert("RGB")).astype(int)
    want = np.asarray(expected).astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def zigzag_numpy(b):
    """JPEG zigzag order as row-major indices, written out independently of the library."""
    return sorted(range(b * b), key=lambda k: (k // b + k % b, k // b if (k // b + k % b) % 2 else -(k // b)))


def ac_shares_numpy(z, b):
    """``E_k / sum_{j >= 1} E_j`` (DC 0) with scipy's DCT, one explicit loop over blocks."""
    from scipy.fft import dctn

    x = z.double().numpy()
    n, c, h, w = x.shape
    blocks = [x[..., i : i + b, j : j + b] for i in range(0, h, b) for j in range(0, w, b)]
    energy = np.mean([dctn(blk, norm="ortho", axes=(-2, -1)) ** 2 for blk in blocks], axis=(0, 1, 2)).reshape(-1)
    energy = energy[zigzag_numpy(b)]
    return energy, np.concatenate([[0.0], energy[1:] / energy[1:].sum()])


def frequency_distance_numpy(a, b):
    """Frechet distance from raw features with numpy's own mean and covariance."""
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Seven 40x48 photographs' crops (non-square: centre-cropped to 32) and one corrupt file."""
    from diffusability_hf.data.images import load_embedded_image

    folder = tmp_path_factory.mktemp("images")
    photo = load_embedded_image("astronaut")
    for i in range(7):
        Image.fromarray(photo[30 * i : 30 * i + 80, 40 * i : 40 * i + 96]).resize((48, 40)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png" * 20)
    return folder


@pytest.fixture(scope="module")
def second_vae_dir(tiny_vae_dir, tmp_path_factory):
    """The tiny AE with a perturbed decoder: a second, worse autoencoder to compare with."""
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae2")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_video_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX

    with open(os.path.join(TINY_CONFIGS, "cogvideox.json")) as fh:
        config = json.load(fh)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cogvideox")
    AutoencoderKLCogVideoX.from_config(config).save_pretrained(path)
    return str(path)


def write_gifs(folder, num=4, frames=12, size=40):
    folder.mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(num):
        clip = [
            np.stack([(xx + (k + 2) * t) % size * 6, (yy + 2 * t + k) % size * 6, (xx + yy) * 3], -1).astype(np.uint8)
            for t in range(frames)
        ]
        Image.fromarray(clip[0]).save(
            folder / f"{k}.gif", save_all=True, append_images=[Image.fromarray(c) for c in clip[1:]], duration=100
        )
    return folder


# ------------------------------------------------------------------------------------------------------ eval_ae


def test_eval_ae_images_metrics_match_an_independent_computation(
    run_script, tmp_path, tiny_vae_dir, second_vae_dir, image_dir, tiny_feature_models, monkeypatch, capsys
):
    out = tmp_path / "eval"
    ts = tiny_feature_models["torchscript"]
    args = [
        "--models", f"base={tiny_vae_dir}", f"noisy={second_vae_dir}", "--data_dir", image_dir,
        "--resolution", 32, "--batch_size", 3, "--lpips_trunk_path", os.path.join(tiny_vae_dir, "alexnet_trunk.pth"),
        "--feature_extractor", ts, "--dct_cut_ratios", 0, 0.5, "--output_dir", out,
    ]  # fmt: skip
    run_script("eval_ae.py", args)
    result = json.loads((out / "metrics.json").read_text())
    for name in ("metrics.md", "reconstructions.png", "dct_cut.png", "dct_cut_grid.png"):
        assert (out / name).is_file(), name
    md = (out / "metrics.md").read_text()
    assert "| base |" in md and "| noisy |" in md and "FD-tiny_features" in md

    samples = evaluation_samples(32, 512, data_dir=str(image_dir))
    pixels = torch.stack([samples[i][0] for i in range(len(samples)) if samples[i][1]])
    assert len(pixels) == 7
    grids = {}
    for label, path in (("base", tiny_vae_dir), ("noisy", second_vae_dir)):
        r = result["models"][label]
        assert (r["num_samples"], r["skipped"]) == (7, 1)
        vae = AutoencoderKL.from_pretrained(path).eval()
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mode()
            recon = vae.decode(z).sample.clamp(-1, 1)
            recon_cut = vae.decode(chop_high_frequencies(z, 8, 0.5)).sample.clamp(-1, 1)
        assert r["psnr"]["mean"] == pytest.approx(mean_psnr(recon, pixels), abs=1e-3)
        expected_fd = frequency_distance_numpy(torchscript_features(ts, pixels), torchscript_features(ts, recon))
        assert r["rFD-tiny_features"] == pytest.approx(expected_fd, rel=1e-3, abs=1e-7)
        assert -1 < r["ssim"]["mean"] < 1 and r["lpips"]["mean"] > 0 and r["samples_per_second"] > 0
        curves = result["dct_cut"]["curves"][label]
        assert curves["0.0"]["psnr"]["mean"] == pytest.approx(r["psnr"]["mean"], abs=1e-4)  # no cut = plain recon
        assert curves["0.5"]["psnr"]["mean"] == pytest.approx(mean_psnr(recon_cut, pixels), abs=1e-3)
        assert abs(curves["0.5"]["psnr"]["mean"] - curves["0.0"]["psnr"]["mean"]) > 1e-3
        assert r["weights_fingerprint"] == weights_fingerprint(vae)
        grids[label] = (recon, torch.stack([recon[0], recon_cut[0]]))  # the first sample cut by 0 and 0.5
    # Each model is scored with its own weights (the two rows differ)
    assert abs(result["models"]["noisy"]["psnr"]["mean"] - result["models"]["base"]["psnr"]["mean"]) > 0.05
    # The grids: a row of originals, then one row per AE; the cut grid has one column per ratio
    expected = labelled_image_grid(
        [pixels, grids["base"][0], grids["noisy"][0]], ["original", "base", "noisy"], padding=1
    )
    assert_grid_close(out / "reconstructions.png", expected)
    rgb_cut = torch.cat([chop_high_frequencies(pixels[:1], 8, r).clamp(-1, 1) for r in (0.0, 0.5)])
    expected = labelled_image_grid(
        [rgb_cut, grids["base"][1], grids["noisy"][1]],
        ["pixels cut", "base latents cut", "noisy latents cut"],
        col_labels=["0% cut", "50% cut"],
        padding=1,
    )
    assert_grid_close(out / "dct_cut_grid.png", expected)

    # A second run into the folder is refused before anything loads and leaves the first run's files as they were
    before = snapshot(out)
    with monkeypatch.context() as patched:
        line = run_refused(patched, capsys, "eval_ae.py", args)
    assert line.startswith(f"error: --output_dir {out} already holds the results of another run (metrics.json")
    assert "--overwrite_output_dir" in line and snapshot(out) == before
    # --overwrite_output_dir replaces them, and no plot of the earlier run stays
    args = [
        "--models", f"base={tiny_vae_dir}", "--data_dir", image_dir, "--resolution", 32, "--metrics", "psnr",
        "--output_dir", out, "--overwrite_output_dir",
    ]  # fmt: skip
    with monkeypatch.context() as patched:
        stdout = run_in_process(patched, capsys, "eval_ae.py", args)
    assert f"Wrote to {out}: metrics.json, metrics.md, reconstructions.png" in stdout
    assert list(json.loads((out / "metrics.json").read_text())["models"]) == ["base"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md", "reconstructions.png"]
    expected = labelled_image_grid([pixels, grids["base"][0]], ["original", "base"], padding=1)
    assert_grid_close(out / "reconstructions.png", expected)


def test_eval_ae_two_processes_give_the_one_process_numbers(
    run_script, tmp_path, tiny_vae_dir, image_dir, tiny_feature_models
):
    args = [
        "--models", tiny_vae_dir, "--data_dir", image_dir, "--resolution", 32, "--batch_size", 2,
        "--metrics", "psnr", "ssim", "fd", "--feature_extractor", tiny_feature_models["torchscript"],
    ]  # fmt: skip
    run_script("eval_ae.py", [*args, "--output_dir", tmp_path / "one"])
    launcher = Forked(29531)
    run_script(
        "eval_ae.py",
        [*args, "--output_dir", tmp_path / "two"],
        launcher=launcher,
        extra_env={"ACCELERATE_USE_CPU": "1"},
    )
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text())["models"] for d in ("one", "two"))
    (a,), (b,) = one.values(), two.values()
    assert a["num_samples"] == b["num_samples"] == 7
    for key in ("psnr", "ssim"):  # SSIM of the random tiny AE is near 0: a relative tolerance alone is too tight
        assert a[key]["mean"] == pytest.approx(b[key]["mean"], rel=1e-6, abs=1e-6)
    assert a["rFD-tiny_features"] == pytest.approx(b["rFD-tiny_features"], rel=1e-4)


def test_eval_ae_video_scores_clips_with_rfvd(run_script, tmp_path, tiny_video_vae_dir, tiny_feature_models):
    videos = write_gifs(tmp_path / "videos")
    out = tmp_path / "eval"
    args = [
        "--models", tiny_video_vae_dir, "--video_data_dir", videos, "--num_frames", 9, "--resolution", 32,
        "--batch_size", 2, "--metrics", "psnr", "ssim", "fd", "--feature_extractor", "i3d",
        tiny_feature_models["torchscript"], "--i3d_model", tiny_feature_models["i3d"], "--dct_cut_ratios", 0.25,
        "--dct_block_size", 4, "--output_dir", out,
    ]  # fmt: skip
    run_script("eval_ae.py", args)
    result = json.loads((out / "metrics.json").read_text())
    (r,) = result["models"].values()
    assert result["num_frames"] == 9 and r["num_samples"] == 4
    assert np.isfinite(r["rFVD"]) and r["rFVD"] > 0 and np.isfinite(r["rFD-tiny_features"])
    assert 5 < r["psnr"]["mean"] < 60
    assert (out / "dct_cut_grid.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_frames", 8, "--video_data_dir", "VIDEOS"], "takes 1 + 8k frames"),
        (["--resolution", 34], "--resolution 34 does not fit"),
        (["--metrics", "fd", "--feature_extractor", "inception"], "weights-inception-2015-12-05-6726825d.pth"),
        (["--metrics", "fd", "--feature_extractor", "dinov2"], "--dinov2_model"),
        (["--metrics", "lpips", "--lpips_net", "vgg"], "vgg16-397923af.pth"),
        (["--metrics", "fd", "--feature_extractor", "i3d"], "needs clips"),
    ],
)
def test_eval_ae_refuses_bad_input_before_any_weights_load(
    tmp_path, tiny_video_vae_dir, tiny_vae_dir, extra, message, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty weights cache
    script = load_script("eval_ae")
    model = tiny_video_vae_dir if "--num_frames" in extra else tiny_vae_dir
    videos = str(write_gifs(tmp_path / "videos")) if "VIDEOS" in extra else None
    extra = [videos if e == "VIDEOS" else str(e) for e in extra]
    args = [
        "--models",
        model,
        "--resolution",
        "32",
        "--num_samples",
        "4",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    loaded = []
    monkeypatch.setattr(script.ae, "load_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        script.main(script.parse_args(args))
    assert message in str(err.value)
    assert not loaded and not (tmp_path / "out" / "metrics.json").exists()


def test_missing_weights_message_names_the_file_the_folder_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    script = load_script("eval_dit")
    args = ["--samples_dir", str(tmp_path), "--num_frames", "9", "--feature_extractor", "i3d"]
    args = script.parse_args([*args, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError) as err:
        script.main(args)
    text = str(err.value)
    assert "i3d_torchscript.pt" in text and os.path.join(str(tmp_path / "th"), "hub", "checkpoints") in text
    assert "--i3d_model" in text and "dropbox" in text


# ------------------------------------------------------------------------------------------- analyze_spectrum


def test_analyze_spectrum_profiles_equal_the_whole_set_at_once(
    run_script, tmp_path, tiny_vae_dir, image_dir, monkeypatch, capsys
):
    out = tmp_path / "spec"
    args = [
        "--models", f"tiny={tiny_vae_dir}", "--data_dir", image_dir, "--resolution", 32, "--batch_size", 3,
        "--block_size", 4, "--per_channel", "--output_dir", out,
    ]  # fmt: skip
    run_script("analyze_spectrum.py", args)
    result = json.loads((out / "spectrum.json").read_text())
    for name in ("spectrum.png", "spectrum_channels.png", "spectrum.md"):
        assert (out / name).is_file(), name
    samples = evaluation_samples(32, 512, data_dir=str(image_dir))
    pixels = torch.stack([samples[i][0] for i in range(len(samples)) if samples[i][1]])
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
    entry = result["models"]["tiny"]
    # Batches of 3, 3 and 1 images are weighted by their size: the profile is that of all 7 images at once
    np.testing.assert_allclose(entry["profile"], frequency_profile(z, 4).numpy(), rtol=1e-5)
    assert entry["hf_share"] == pytest.approx(float(share_of_high_frequencies(energy_profile(z, 4))), rel=1e-5)
    assert len(entry["channels"]) == z.shape[1]
    np.testing.assert_allclose(entry["channels"][2]["profile"], frequency_profile(z[:, 2:3], 4).numpy(), rtol=1e-5)
    rgb_small = frequency_profile(downsample(pixels, 4, "area"), 4).numpy()
    np.testing.assert_allclose(result["rgb"]["4"]["profile"], rgb_small, rtol=1e-5)
    np.testing.assert_allclose(result["rgb"]["1"]["profile"], frequency_profile(pixels, 4).numpy(), rtol=1e-5)
    assert entry["weights_fingerprint"] == weights_fingerprint(vae)

    # The AC-energy shares (json: per zigzag index; md: by quarter of the zigzag order) against scipy
    md = (out / "spectrum.md").read_text()
    for key, signal in (("tiny", z), ("RGB at 8 px", downsample(pixels, 4, "area"))):
        r = entry if key == "tiny" else result["rgb"]["4"]
        energy, shares = ac_shares_numpy(signal, 4)
        np.testing.assert_allclose(r["energy"], energy, rtol=1e-5)
        np.testing.assert_allclose(r["ac_energy_shares"], shares, rtol=1e-5, atol=1e-12)
        (row,) = [line for line in md.splitlines() if line.startswith(f"| {key} |")]
        cells = [float(c) for c in row.strip("|").split("|")[2:]]
        quarters = [shares[1:4].sum(), shares[4:8].sum(), shares[8:12].sum(), shares[12:16].sum()]
        np.testing.assert_allclose(cells, [shares[8:].sum(), *quarters], atol=6e-5)
    assert "AC share, zigzag 1-3" in md and "AC share, zigzag 12-15" in md
    with Image.open(out / "spectrum.png") as im:  # two panels side by side
        assert im.width > 2 * im.height

    # A second run into the folder is refused; --overwrite_output_dir replaces the results (no stale channel plot)
    before = snapshot(out)
    with monkeypatch.context() as patched:
        line = run_refused(patched, capsys, "analyze_spectrum.py", args)
    assert line.startswith(f"error: --output_dir {out} already holds the results of another run (spectrum.json")
    assert "--overwrite_output_dir" in line and snapshot(out) == before
    args = [a for a in args if a != "--per_channel"] + ["--overwrite_output_dir"]
    with monkeypatch.context() as patched:
        stdout = run_in_process(patched, capsys, "analyze_spectrum.py", args)
    assert f"Wrote to {out}: spectrum.json, spectrum.md, spectrum.png" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["spectrum.json", "spectrum.md", "spectrum.png"]
    assert "channels" not in json.loads((out / "spectrum.json").read_text())["models"]["tiny"]


def test_analyze_spectrum_clips_per_frame(run_script, tmp_path, tiny_video_vae_dir):
    out = tmp_path / "spec"
    args = [
        "--models", tiny_video_vae_dir, "--num_frames", 9, "--num_samples", 3, "--resolution", 32,
        "--block_size", 4, "--per_frame", "--output_dir", out,
    ]  # fmt: skip
    run_script("analyze_spectrum.py", args)
    result = json.loads((out / "spectrum.json").read_text())
    (entry,) = result["models"].values()
    assert len(entry["frames"]) == 3  # 9 frames -> 1 + 8 / 4 latent frames
    assert (out / "spectrum_frames.png").is_file() and 0 <= entry["hf_share"] <= 1


# ---------------------------------------------------------------------------------------------------- eval_dit


def save_tiny_pipeline(path, seed, perturb=0.0):
    """A class-conditional pipeline over the embedded AE with a tiny random DiT (``seed``: its weights; ``perturb``:
    noise added to all of them)."""
    from diffusability_hf import autoencoders as ae
    from diffusability_hf.models.factory import build_dit
    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    vae = AutoencoderKL.from_pretrained(ae.EMBEDDED_AE)
    torch.manual_seed(seed)
    dit = build_dit("DiT-tiny/2", in_channels=vae.config.latent_channels, sample_size=8, num_classes=3)
    if perturb:  # DiT's zero-initialised output layers make every fresh DiT predict 0: move all weights
        with torch.no_grad():
            for param in dit.parameters():
                param.add_(perturb * torch.randn_like(param))
    channels = vae.config.latent_channels
    pipe = DiTFlowMatchPipeline(
        transformer=dit, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        id2label={"0": "a", "1": "b", "2": "c"}, latents_mean=[0.0] * channels, latents_std=[1.0] * channels,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path), {"transformer": weights_fingerprint(dit), "vae": weights_fingerprint(vae)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """``(path, {"transformer": fingerprint, "vae": fingerprint})`` of the tiny pipeline."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"), seed=0)


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tiny_pipeline):
    return tiny_pipeline[0]


def dit_args(pipeline, out, cache, ts, *extra):
    return [
        "--pipeline", pipeline, "--num_samples", 10, "--num_inference_steps", 2, "--feature_extractor", ts,
        "--stats_cache_dir", cache, "--output_dir", out, *extra,
    ]  # fmt: skip


def test_eval_dit_samples_scores_and_caches(
    run_script, tmp_path, tiny_pipeline, tiny_feature_models, monkeypatch, capsys
):
    tiny_pipeline_dir, fingerprints = tiny_pipeline
    ts, out, cache = tiny_feature_models["torchscript"], tmp_path / "eval", tmp_path / "cache"
    args = dit_args(tiny_pipeline_dir, out, cache, ts, "--batch_size", 4, "--class_sampling", "balanced")
    proc = run_script("eval_dit.py", args)
    assert f"Wrote to {out}: metrics.json, metrics.md, samples_grid.png, samples" in proc.stdout
    files = sorted((out / "samples").glob("*.png"))
    assert len(files) == 10 and (out / "samples_grid.png").is_file()
    labels = json.loads((out / "samples" / "labels.json").read_text())
    assert [labels[f.name] for f in files] == [i % 3 for i in range(10)]
    result = json.loads((out / "metrics.json").read_text())
    # Provenance: the weights that made the samples, next to them and in metrics.json
    provenance = json.loads((out / "samples" / "provenance.json").read_text())
    assert {k: provenance["pipeline"][k] for k in fingerprints} == fingerprints == result["pipeline_fingerprint"]
    assert provenance["settings"] == {
        "num_inference_steps": 2, "guidance_scale": 1.0, "guidance_interval": None, "shift": 1.0,
        "class_sampling": "balanced", "seed": 0, "num_classes": 3, "resolution": 64, "mixed_precision": "no",
    }  # fmt: skip
    assert "latents_autoencoder_fingerprint" in result  # None: this pipeline records no latents provenance
    # The grid: one row per class, named by id2label, with that class's samples in order
    rows = [[f for f in files if labels[f.name] == k] for k in range(3)]
    tiles = [torch.stack([EvalSamples([str(f)], 64)[0][0] for f in row]) for row in rows]
    assert_grid_close(out / "samples_grid.png", labelled_image_grid(tiles, ["a (0)", "b (1)", "c (2)"], padding=1))
    metric = result["metrics"]["FD-tiny_features"]
    assert (metric["num_samples"], metric["num_reference"]) == (10, 10)
    assert len(list(cache.glob("*.npz"))) == 1

    # Independently: features of the PNGs as written, against the embedded training crops (the default reference)
    fake = torch.stack([EvalSamples([str(f)], 64)[0][0] for f in files])
    reference = evaluation_samples(64, 10, embedded_split="train")
    real = torch.stack([reference[i][0] for i in range(10)])
    expected = frequency_distance_numpy(torchscript_features(ts, fake), torchscript_features(ts, real))
    assert metric["value"] == pytest.approx(expected, rel=1e-4)

    # A second run into the finished folder is refused before anything loads, and changes nothing
    before = snapshot(out)
    with monkeypatch.context() as patched:
        line = run_refused(patched, capsys, "eval_dit.py", args)
    assert line.startswith(f"error: --output_dir {out} already holds the results of another run (metrics.json")
    assert "--overwrite_output_dir" in line and f"--samples_dir {out / 'samples'} with a new --output_dir" in line
    assert snapshot(out) == before

    # A run interrupted while sampling (no results yet, some samples missing) resumes: a rerun remakes exactly the
    # missing samples, from the same noise, whatever the batch size; the reference statistics come from the cache
    # (the reference is never read again)
    before = {f.name: np.asarray(Image.open(f)) for f in files}
    for name in ("metrics.json", "metrics.md", "samples_grid.png"):
        (out / name).unlink()
    for f in files[3:7]:
        f.unlink()
    (out / "samples" / "000004.png.tmp.png").write_bytes(b"half a png")  # a write cut short by the interruption
    proc = run_script(
        "eval_dit.py", dit_args(tiny_pipeline_dir, out, cache, ts, "--batch_size", 3, "--class_sampling", "balanced")
    )
    assert "6 samples already in" in proc.stderr and "cached reference statistics" in proc.stderr
    for f in files:  # the same noise per sample; another batch composition may round a rare pixel the other way
        a, b = np.asarray(Image.open(f)).astype(int), before[f.name].astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert not any(f.name.endswith(".tmp.png") for f in (out / "samples").iterdir())
    assert json.loads((out / "samples" / "provenance.json").read_text()) == provenance
    assert json.loads((out / "metrics.json").read_text())["metrics"]["FD-tiny_features"]["value"] == pytest.approx(
        metric["value"], rel=1e-3
    )


def test_eval_dit_refuses_samples_of_another_pipeline_and_overwrite_replaces_them(
    tmp_path, tiny_pipeline, tiny_feature_models, monkeypatch, capsys
):
    """Two pipelines of the same config, other transformer weights: the second must not score the first's samples."""
    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    first, _ = tiny_pipeline
    second, second_fingerprints = save_tiny_pipeline(tmp_path / "other_pipeline", seed=1, perturb=0.05)
    ts, out, cache = tiny_feature_models["torchscript"], tmp_path / "eval", tmp_path / "cache"
    extra = ("--num_samples", 4, "--num_inference_steps", 1, "--class_sampling", "balanced")
    with monkeypatch.context() as patched:
        run_in_process(patched, capsys, "eval_dit.py", dit_args(first, out, cache, ts, *extra))
    for name in ("metrics.json", "metrics.md", "samples_grid.png"):  # as if interrupted after sampling
        (out / name).unlink()
    before = snapshot(out)
    with monkeypatch.context() as patched:  # the pipeline loads (its weights are compared), nothing is sampled
        patched.setattr(DiTFlowMatchPipeline, "__call__", lambda *a, **k: pytest.fail("sampled"))
        line = run_refused(patched, capsys, "eval_dit.py", dit_args(second, out, cache, ts, *extra), False)
    assert f"{out / 'samples'} holds 4 samples made by another pipeline" in line and "(transformer weights)" in line
    assert "new --output_dir" in line and "--overwrite_output_dir" in line and snapshot(out) == before
    # --overwrite_output_dir deletes them and samples the second pipeline
    args = dit_args(second, out, cache, ts, *extra, "--overwrite_output_dir")
    with monkeypatch.context() as patched:
        stdout = run_in_process(patched, capsys, "eval_dit.py", args)
    assert f"Wrote to {out}: metrics.json, metrics.md, samples_grid.png, samples" in stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["pipeline_fingerprint"] == second_fingerprints and result["pipeline"] == second
    for name in (f"samples/{i:06d}.png" for i in range(4)):  # other weights, other images
        new, old = np.asarray(Image.open(out / name)), np.asarray(Image.open(io.BytesIO(before[name])))
        assert np.abs(new.astype(int) - old.astype(int)).max() > 8, name
    provenance = json.loads((out / "samples" / "provenance.json").read_text())
    assert {k: provenance["pipeline"][k] for k in second_fingerprints} == second_fingerprints


def test_eval_dit_check_samples_refuses_other_settings_and_unknown_samples(tmp_path):
    script = load_script("eval_dit")
    folder = tmp_path / "samples"
    folder.mkdir()
    settings = {
        "num_inference_steps": 2, "guidance_scale": 1.0, "guidance_interval": None, "shift": 1.0,
        "class_sampling": "random", "seed": 0, "num_classes": 3, "resolution": 64, "mixed_precision": "no",
    }  # fmt: skip
    provenance = {"pipeline": {"transformer": "t", "vae": "v"}, "settings": settings}
    Image.new("RGB", (4, 4)).save(folder / "000000.png")
    Image.new("RGB", (4, 4)).save(folder / "000001.png")
    # Samples without provenance (made by hand, or by an earlier version of the script)
    with pytest.raises(UsageError, match="unknown origin.*--overwrite_output_dir"):
        script.check_samples(str(folder), provenance, [0, 1, 2], overwrite=False)
    (folder / "provenance.json").write_text(json.dumps(provenance))
    (folder / "labels.json").write_text(json.dumps({"000000.png": 0, "000001.png": 1}))
    script.check_samples(str(folder), provenance, [0, 1, 2], overwrite=False)  # the same: resumed
    script.check_samples(str(folder), provenance, [0, 1, 2, 0, 1], overwrite=False)  # more samples: resumed
    changes = [
        ({"pipeline": {"transformer": "t", "vae": "other"}}, "vae weights"),
        *(
            ({"settings": {**settings, key: value}}, f"{key} {settings[key]} -> {value}")
            for key, value in [("num_inference_steps", 3), ("guidance_scale", 1.5), ("shift", 3.0),
                               ("guidance_interval", [0.1, 0.9]),
                               ("class_sampling", "balanced"), ("seed", 1), ("resolution", 32),
                               ("mixed_precision", "bf16")]
        ),
    ]  # fmt: skip
    for change, message in changes:
        with pytest.raises(UsageError, match="--overwrite_output_dir") as err:
            script.check_samples(str(folder), {**provenance, **change}, [0, 1, 2], overwrite=False)
        assert message in str(err.value)
        script.check_samples(str(folder), {**provenance, **change}, [0, 1, 2], overwrite=True)
    with pytest.raises(UsageError, match="the classes of 1 samples"):
        script.check_samples(str(folder), provenance, [0, 2, 2], overwrite=False)


def test_eval_dit_inception_dinov2_random_classes_and_two_processes(
    run_script, tmp_path, tiny_pipeline_dir, tiny_feature_models, random_inception_weights
):
    """FID (torch-fidelity's Inception, random weights) and FDD (a tiny DINOv2) with the paper's random classes; two
    processes make the same PNGs and the same numbers as one."""
    args = [
        "--pipeline", tiny_pipeline_dir, "--num_samples", 8, "--batch_size", 3, "--num_inference_steps", 1,
        "--feature_extractor", "inception", "dinov2", "--inception_weights", random_inception_weights,
        "--dinov2_model", tiny_feature_models["dinov2"],
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("eval_dit.py", [*args, "--stats_cache_dir", tmp_path / "c1", "--output_dir", one])
    launcher = Forked(29533)
    two_args = [*args, "--stats_cache_dir", tmp_path / "c2", "--output_dir", two]
    run_script("eval_dit.py", two_args, launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})
    labels = json.loads((one / "samples" / "labels.json").read_text())
    assert [labels[f"{i:06d}.png"] for i in range(8)] == np.random.default_rng(0).integers(0, 3, size=8).tolist()
    for i in range(8):  # the same noise; batches of other composition may round a rare pixel the other way
        a, b = (np.asarray(Image.open(d / "samples" / f"{i:06d}.png")).astype(int) for d in (one, two))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    m1, m2 = (json.loads((d / "metrics.json").read_text())["metrics"] for d in (one, two))
    assert set(m1) == {"FID", "FDD"}
    for key in m1:
        assert np.isfinite(m1[key]["value"]) and m1[key]["value"] > 0
        assert m1[key]["value"] == pytest.approx(m2[key]["value"], rel=1e-3)
        assert m2[key]["num_samples"] == m2[key]["num_reference"] == 8


def test_eval_dit_scores_clip_folders_with_fvd(run_script, tmp_path, tiny_feature_models):
    fake, real = write_gifs(tmp_path / "fake", num=4), write_gifs(tmp_path / "real", num=5, frames=14)
    out = tmp_path / "eval"
    args = [
        "--samples_dir", fake, "--num_samples", 4, "--reference_video_dir", real, "--num_reference", 5,
        "--num_frames", 10, "--feature_extractor", "i3d", "--i3d_model", tiny_feature_models["i3d"],
        "--stats_cache_dir", tmp_path / "cache", "--output_dir", out,
    ]  # fmt: skip
    run_script("eval_dit.py", args)
    fvd = json.loads((out / "metrics.json").read_text())["metrics"]["FVD"]
    assert (fvd["num_samples"], fvd["num_reference"]) == (4, 5) and fvd["value"] > 0


def test_eval_dit_missing_feature_weights_fail_before_sampling(tmp_path, tiny_pipeline_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    script = load_script("eval_dit")
    out = tmp_path / "eval"
    args = script.parse_args(["--pipeline", tiny_pipeline_dir, "--num_samples", "4", "--output_dir", str(out)])
    with pytest.raises(FileNotFoundError) as err:
        script.main(args)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value) and "--inception_weights" in str(err.value)
    assert not (out / "samples").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Give --pipeline"),
        (["--samples_dir", "nowhere"], "is not a folder"),
        (["--pipeline", "."], "no model_index.json"),
    ],
)
def test_eval_dit_argument_errors(args, message, capsys):
    script = load_script("eval_dit")
    with pytest.raises(SystemExit):
        script.parse_args(args)
    assert message in capsys.readouterr().err


def test_eval_dit_defaults_are_the_papers_protocol(tmp_path, capsys):
    """Sec. 4, "Inference details": 256 steps without guidance, classes drawn at random; the guidance interval only
    with guidance."""
    script = load_script("eval_dit")
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    args = script.parse_args(["--pipeline", str(pipeline)])
    assert (args.num_inference_steps, args.guidance_scale, args.guidance_interval) == (256, 1.0, None)
    assert args.class_sampling == "random"
    guided = script.parse_args(
        ["--pipeline", str(pipeline), "--guidance_scale", "3", "--guidance_interval", "0.1", "0.9"]
    )
    assert guided.guidance_interval == [0.1, 0.9]
    for extra, message in [
        (["--guidance_interval", "0.1", "0.9"], "needs --guidance_scale > 1"),
        (["--guidance_scale", "3", "--guidance_interval", "0.9", "0.1"], "0 <= SIGMA_MIN <= SIGMA_MAX <= 1"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(["--pipeline", str(pipeline), *extra])
        assert message in capsys.readouterr().err
