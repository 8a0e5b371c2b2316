"""The paper's Table 2 chain end to end, offline and on tiny models: ``extract_latents.py`` (the embedded camera pans)
-> ``train_dit_flow.py`` (the video DiT) -> ``eval_dit.py`` sampling the saved ``DiTFlowMatchVideoPipeline`` and
scoring its clips with FVD and, frame by frame, FID and FDD; for a CogVideoX-class AE (DiT-tiny/2) and an LTX-class
one with a timestep-conditioned, noise-injecting decoder (DiT-tiny/1: the paper's /1 patches for LTX-AE)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusability_hf import autoencoders as ae
from diffusability_hf.data.evaluation import evaluation_samples
from diffusability_hf.data.latents import read_latents_metadata
from diffusability_hf.metrics import to_uint8

from testing_utils import ROOT, load_script

TINY_CONFIGS = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")


def frames_of(folder):
    """A written clip sample: ``(T, H, W, 3)`` uint8 from its PNG frames."""
    return np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))])


def frechet_numpy(a, b):
    """Frechet distance of two feature sets, by eigendecomposition (independent of the toolkit's sqrtm)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def i3d_features(path, clips):
    """Features of ``[-1, 1]`` clips ``(N, 3, T, H, W)`` with the I3D-convention TorchScript, as FVD calls it."""
    net = torch.jit.load(path)
    with torch.no_grad():
        return net(to_uint8(clips).float(), rescale=True, resize=True, return_features=True).numpy()


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Built lazily, once per autoencoder: ``{name: (vae folder, latents folder, pipeline folder)}``."""
    return {}


def build_chain(chains, name, model, tmp_path_factory, run_script):
    """Random-init tiny AE -> latents of 12 embedded 9-frame pans at 32 px -> a video DiT trained for 2 steps."""
    if name in chains:
        return chains[name]
    root = tmp_path_factory.mktemp(f"chain_{name}")
    torch.manual_seed(0)
    ae.load_autoencoder(ae.read_config(os.path.join(TINY_CONFIGS, f"{name}.json")), None).save_pretrained(root / "vae")
    run_script(
        "extract_latents.py",
        ["--pretrained_model_name_or_path", root / "vae", "--output_dir", root / "latents", "--resolution", 32,
         "--max_samples", 12, "--batch_size", 4],
    )  # fmt: skip
    meta = read_latents_metadata(str(root / "latents"))
    assert meta["video"] and meta["num_frames"] == 9 and meta["num_samples"] == 12
    run_script(
        "train_dit_flow.py",
        ["--latents_dir", root / "latents", "--output_dir", root / "dit", "--model", model,
         "--pretrained_vae_model_name_or_path", root / "vae", "--train_batch_size", 4, "--max_train_steps", 2,
         "--learning_rate", 1e-3, "--lr_warmup_steps", 1, "--report_to", "none", "--num_inference_steps", 2,
         "--validation_steps", 100],
    )  # fmt: skip
    chains[name] = (str(root / "vae"), str(root / "latents"), str(root / "dit"))
    return chains[name]


@pytest.mark.parametrize(
    "name, model, extractors",
    [
        ("cogvideox", "DiT-tiny/2", "default"),  # Table 2's columns: FVD (I3D), FID and FDD on frames
        ("ltx_timestep", "DiT-tiny/1", "i3d"),
    ],
)
def test_extract_train_sample_and_score_a_video_dit(
    name,
    model,
    extractors,
    tmp_path,
    tmp_path_factory,
    chains,
    run_script,
    tiny_feature_models,
    random_inception_weights,
):
    from diffusers import DiffusionPipeline

    vae, latents, pipeline = build_chain(chains, name, model, tmp_path_factory, run_script)
    index = json.loads(open(os.path.join(pipeline, "model_index.json")).read())
    assert index["_class_name"] == ["pipeline", "DiTFlowMatchVideoPipeline"]
    config = json.loads(open(os.path.join(pipeline, "transformer", "config.json")).read())
    assert config["patch_size"] == int(model[-1]) and config["num_frames"] == ae.latent_num_frames(
        ae.read_config(vae), 9
    )

    out, cache = tmp_path / "eval", tmp_path / "cache"
    features = ["--i3d_model", tiny_feature_models["i3d"]]
    if extractors == "default":  # no --feature_extractor: i3d, inception and dinov2, all from local weights
        features += ["--inception_weights", random_inception_weights, "--dinov2_model", tiny_feature_models["dinov2"]]
    else:
        features += ["--feature_extractor", "i3d"]
    args = ["--pipeline", pipeline, "--num_samples", 6, "--batch_size", 4, "--num_inference_steps", 2,
            "--class_sampling", "balanced", "--stats_cache_dir", cache, "--output_dir", out, *features]  # fmt: skip
    proc = run_script("eval_dit.py", args)
    assert f"Wrote to {out}: metrics.json, metrics.md, samples_grid.png, samples" in proc.stdout

    # Six clips of 9 frames at 32 px, each a lossless frame folder, with their classes and provenance
    samples = out / "samples"
    names = sorted(n for n in os.listdir(samples) if n.isdigit())
    assert names == [f"{i:06d}" for i in range(6)]
    clips = [frames_of(samples / n) for n in names]
    assert all(c.shape == (9, 32, 32, 3) and c.dtype == np.uint8 for c in clips)
    labels = json.loads((samples / "labels.json").read_text())
    num_classes = len(index["id2label"])
    assert [labels[n] for n in names] == [i % num_classes for i in range(6)]
    settings = json.loads((samples / "provenance.json").read_text())["settings"]
    assert settings["num_frames"] == 9 and settings["resolution"] == 32
    timestep_decoder = ae.read_config(vae).get("timestep_conditioning", False)
    assert ("decode_timestep" in settings) == timestep_decoder

    # Sample i is what the pipeline (loaded by stock diffusers as remote code) makes from sample i's own generator
    pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True)
    for i in (0, 5):
        expected = pipe(
            [labels[names[i]]], num_inference_steps=2, generator=[torch.Generator().manual_seed(i)], output_type="np"
        ).frames[0]
        assert np.abs(np.round(expected * 255).astype(int) - clips[i].astype(int)).max() <= 1

    # FVD recomputed independently: I3D features of the written frames against the embedded training pans
    metrics = json.loads((out / "metrics.json").read_text())
    expected_metrics = {"FVD", "FID", "FDD"} if extractors == "default" else {"FVD"}
    assert set(metrics["metrics"]) == expected_metrics and metrics["num_frames"] == 9
    fake = torch.stack([torch.from_numpy(c).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    reference = evaluation_samples(32, 6, num_frames=9, embedded_split="train")
    real = torch.stack([reference[i][0] for i in range(6)])
    fvd = metrics["metrics"]["FVD"]
    assert (fvd["num_samples"], fvd["num_reference"]) == (6, 6)
    ts = tiny_feature_models["i3d"]
    assert fvd["value"] == pytest.approx(frechet_numpy(i3d_features(ts, fake), i3d_features(ts, real)), rel=1e-4)
    for metric in expected_metrics - {"FVD"}:  # image features of every frame: 6 clips x 9 frames
        assert metrics["metrics"][metric]["num_samples"] == 54 and metrics["metrics"][metric]["value"] > 0

    if extractors == "default":
        return  # (the resume below is the same for any extractor: once, with the cheap one)
    # Interrupted while sampling: a rerun makes exactly the missing clips again (the same noise), and a half-written
    # frame folder is cleared; the reference statistics come from the cache
    for n in ("metrics.json", "metrics.md", "samples_grid.png"):
        (out / n).unlink()
    for n in names[2:4]:
        for f in (samples / n).iterdir():
            f.unlink()
        (samples / n).rmdir()
    (samples / "000002.tmp").mkdir()
    (samples / "000002.tmp" / "000.png").write_bytes(b"half a png")
    proc = run_script("eval_dit.py", [*args[:5], 3, *args[6:]])  # another batch size
    assert "4 samples already in" in proc.stderr and "cached reference statistics" in proc.stderr
    assert not (samples / "000002.tmp").exists()
    for n, before in zip(names, clips):
        assert np.abs(frames_of(samples / n).astype(int) - before.astype(int)).max() <= 1
    again = json.loads((out / "metrics.json").read_text())["metrics"]["FVD"]["value"]
    assert again == pytest.approx(fvd["value"], rel=1e-3)


def test_video_pipeline_frame_counts_are_checked_before_anything_loads(tmp_path, capsys):
    """``--num_frames`` scores the first frames of each clip: more than the pipeline makes, or fewer than I3D takes,
    are refused by the argument parser (from the saved JSON files alone); an image pipeline takes no frame count."""
    script = load_script("eval_dit")
    video, image = tmp_path / "video", tmp_path / "image"
    for folder, transformer in ((video, {"num_frames": 3, "in_channels": 4}), (image, {"in_channels": 4})):
        (folder / "transformer").mkdir(parents=True)
        (folder / "vae").mkdir()
        (folder / "model_index.json").write_text("{}")
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    (video / "vae" / "config.json").write_text(open(os.path.join(TINY_CONFIGS, "cogvideox.json")).read())
    args = script.parse_args(["--pipeline", str(video)])
    assert (args.num_frames, args.pipeline_frames) == (9, 9)  # 1 + 4 (3 - 1) frames: all of them are scored
    assert args.feature_extractor == ["i3d", "inception", "dinov2"]
    for extra, message in [
        (["--pipeline", str(video), "--num_frames", "10"], "does not fit the 9 frames per clip"),
        (["--pipeline", str(video), "--num_frames", "5"], "needs clips of at least 9 frames, not 5"),
        (["--pipeline", str(image), "--num_frames", "9"], "makes images (its transformer has no num_frames)"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(extra)
        assert message in capsys.readouterr().err
    assert script.parse_args(["--pipeline", str(video), "--num_frames", "5", "--feature_extractor", "x.pt"])


def test_video_pipeline_diagnostics_trajectory_and_loss_per_noise_level(
    tmp_path, tmp_path_factory, chains, run_script, tiny_feature_models
):
    """Fig. 6's decoded x0 predictions (the middle frame of each clip) and the flow-matching loss per noise level on
    held-out video latents, recomputed here with the transformer directly."""
    from safetensors.torch import load_file

    from diffusability_hf.pipelines import DiTFlowMatchVideoPipeline

    vae, latents, pipeline = build_chain(chains, "ltx_timestep", "DiT-tiny/1", tmp_path_factory, run_script)
    out = tmp_path / "eval"
    run_script(
        "eval_dit.py",
        ["--pipeline", pipeline, "--num_samples", 2, "--num_inference_steps", 3, "--feature_extractor", "i3d",
         "--i3d_model", tiny_feature_models["i3d"], "--stats_cache_dir", tmp_path / "cache", "--output_dir", out,
         "--trajectory_steps", 2, "--loss_latents_dir", latents, "--loss_noise_levels", 2, "--loss_max_samples", 5,
         "--seed", 4],
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    trajectory = json.loads((out / "trajectory.json").read_text())
    assert trajectory["step_indices"] == [0, 2] and "frame 4 of each clip's 9" in trajectory["prediction"]
    # The last column is the sample's middle frame (the last step lands on sigma = 0)
    grid = np.asarray(Image.open(out / "trajectory.png").convert("RGB")).astype(int)
    middle = frames_of(out / "samples" / "000000")[4].astype(int)
    width, height = grid.shape[1], grid.shape[0]
    tile = middle.shape[0]
    last = grid[height - (tile + 1) : height - 1, width - (tile + 1) : width - 1]
    assert np.abs(last - middle).max() <= 1

    meta = read_latents_metadata(latents)
    shards = [load_file(os.path.join(latents, name)) for name in meta["shards"]]
    mean, std, labels = (torch.cat([s[k] for s in shards])[:5].float() for k in ("mean", "std", "labels"))
    labels = labels.long()
    pipe = DiTFlowMatchVideoPipeline.from_pretrained(pipeline)
    model = pipe.transformer.eval()
    view = (1, -1, 1, 1, 1)  # per-channel statistics over (B, C, T', h, w)
    lat_mean, lat_std = (torch.tensor(pipe.config[k]).view(view) for k in ("latents_mean", "latents_std"))
    generator = torch.Generator().manual_seed(4)
    x0 = (mean + std * torch.randn(mean.shape, generator=generator) - lat_mean) / lat_std
    expected = []
    for sigma in (0.25, 0.75):
        noise = torch.randn(mean.shape, generator=generator)
        x_t, t = (1 - sigma) * x0 + sigma * noise, torch.full((5,), sigma * 1000)
        with torch.no_grad():
            aux = model(x_t, t, labels).last_hidden_state  # self-conditioning, as at inference
            v = model(x_t, t, labels, self_cond=aux).sample[:, : x0.shape[1]]
        expected.append(((v - (noise - x0)) ** 2).flatten(1).mean(1).mean().item())
    loss = metrics["loss_per_noise_level"]
    assert loss["sigma"] == [0.25, 0.75] and loss["num_samples"] == 5
    assert loss["loss"] == pytest.approx(expected, rel=1e-5)
