"""Diagnostics of a DiT pipeline: the pipeline's step-end callback (latents and x0 predictions), eval_dit.py's
denoising trajectory (the paper's Fig. 6) and its flow-matching loss per noise level on held-out latents, each
checked against an independent computation on tiny models (CPU, offline)."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from diffusability_hf.autoencoders import EMBEDDED_AE, weights_fingerprint
from diffusability_hf.figures import labelled_image_grid
from diffusability_hf.flow import time_shift
from diffusability_hf.pipelines import DiTFlowMatchPipeline

from testing_utils import ROOT, load_script, run_script_in_process, tiny_autoencoder_kl

NUM_CLASSES = 7  # the embedded photographs' classes (the classes of the extracted latents)
CHANNELS = 16  # the embedded autoencoder's latent channels (8x down: 64 px images, 8x8 latents)


def run_in_process(monkeypatch, capsys, args):
    """``python train_scripts/eval_dit.py args`` in this process (its ``__main__`` block); returns its stdout."""
    path = os.path.join(ROOT, "train_scripts", "eval_dit.py")
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    capsys.readouterr()
    runpy.run_path(path, run_name="__main__")
    return capsys.readouterr().out


def run_refused(monkeypatch, capsys, args):
    """Expect eval_dit.py to refuse: exit code 2 and one ``error: ...`` line, no traceback; returns that line."""
    path = os.path.join(ROOT, "train_scripts", "eval_dit.py")
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def extract(out, *extra):
    """extract_latents.py on the embedded photographs (64 px: 16x8x8 latents), 6 images in shards of 4."""
    args = ["--output_dir", out, "--max_samples", 6, "--shard_size", 4, "--batch_size", 4, *extra]
    proc = run_script_in_process("extract_latents.py", args)  # as its command line runs it, in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def perturbed(model, seed, scale):
    """Move every weight (DiT's zero-initialised output layers and self-conditioning projection predict 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_pipeline(path, self_conditioning=False, provenance=None, seed=0):
    """A pipeline over the embedded AE with a tiny random DiT (diffusers' or the paper's self-conditioned one) and
    normalisation statistics of its own (not the extracted latents')."""
    from diffusability_hf.models.factory import build_dit, build_selfcond_dit

    vae = AutoencoderKL.from_pretrained(EMBEDDED_AE)
    torch.manual_seed(seed)
    if self_conditioning:
        dit = build_selfcond_dit("DiT-tiny/2", CHANNELS, 8, NUM_CLASSES)
    else:
        dit = build_dit("DiT-tiny/2", in_channels=CHANNELS, sample_size=8, num_classes=NUM_CLASSES)
    perturbed(dit, seed, 0.2)  # large enough that the velocity depends on x_t: x0 predictions differ per step
    pipe = DiTFlowMatchPipeline(
        transformer=dit, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        id2label={str(i): f"class{i}, synonym" for i in range(NUM_CLASSES)},
        latents_mean=[0.05 * c - 0.3 for c in range(CHANNELS)], latents_std=[0.8 + 0.1 * c for c in range(CHANNELS)],
        provenance=provenance,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def embedded_fingerprint():
    return weights_fingerprint(AutoencoderKL.from_pretrained(EMBEDDED_AE))


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Held-out latents of the embedded autoencoder (the pipelines' vae)."""
    return extract(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def other_latents(tmp_path_factory):
    """Latents of the same shape from other autoencoder weights (the embedded AE, every weight moved)."""
    root = tmp_path_factory.mktemp("other_ae")
    perturbed(AutoencoderKL.from_pretrained(EMBEDDED_AE), 1, 1e-3).save_pretrained(root / "ae")
    return extract(root / "latents", "--pretrained_model_name_or_path", root / "ae")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, embedded_fingerprint):
    """Saved pipelines: diffusers' DiT and the self-conditioned DiT recording the embedded AE as the autoencoder of
    their training latents, and one recording no provenance."""
    root = tmp_path_factory.mktemp("pipelines")
    provenance = {"latents_ae_weights_fingerprint": embedded_fingerprint, "vae_weights_fingerprint": embedded_fingerprint,
                  "latents_ae": EMBEDDED_AE}  # fmt: skip
    return {
        "stock": save_pipeline(root / "stock", False, provenance),
        "selfcond": save_pipeline(root / "selfcond", True, provenance, seed=1),
        "no_provenance": save_pipeline(root / "no_provenance", False, None, seed=2),
    }


def eval_args(pipeline, out, features, *extra):
    return [
        "--pipeline", pipeline, "--num_samples", 3, "--num_inference_steps", 2, "--feature_extractor", features,
        "--stats_cache_dir", out / "cache", "--output_dir", out / "eval", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- pipeline callback


def tiny_pipe(self_cond_module=None):
    vae = tiny_autoencoder_kl().eval()  # torch seeded 0 first
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=3, norm_num_groups=4,
    ).eval()  # fmt: skip
    pipe = DiTFlowMatchPipeline(
        transformer=dit, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 3.0],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_calls(model):
    """Every forward call's hidden_states, class labels and output velocity; returns (calls, hook handle)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"].clone(), kwargs["class_labels"].clone(), output.sample.clone()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_callback_gets_x0_prediction_and_latents_after_each_step(guidance_scale):
    pipe = tiny_pipe()
    steps, shift, labels = 4, 2.0, [2, 0]
    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents", "x0_pred"}
        seen.append((step_index, float(timestep), {k: v.clone() for k, v in callback_kwargs.items()}))
        return {}

    calls, handle = record_calls(pipe.transformer)
    final = pipe(
        labels, num_inference_steps=steps, guidance_scale=guidance_scale, shift=shift, output_type="latent",
        generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "x0_pred"],
    ).images  # fmt: skip
    handle.remove()
    assert [s[0] for s in seen] == list(range(steps)) and len(calls) == steps
    # Independently: the eq. 3 sigma grid, the guided velocity from the model's raw outputs, x0 = x_t - sigma v
    sigmas = [time_shift(1 - i / steps, shift) for i in range(steps)] + [0.0]
    for i, (_, timestep, tensors) in enumerate(seen):
        x_t, call_labels, v = calls[i]
        if guidance_scale > 1:
            assert call_labels.tolist() == labels + [3, 3]  # the null class for the unconditional half
            x_t, (v_cond, v_uncond) = x_t[:2], v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        assert timestep == pytest.approx(sigmas[i] * 1000, rel=1e-5)
        torch.testing.assert_close(tensors["x0_pred"], x_t - sigmas[i] * v, rtol=1e-5, atol=1e-5)
        # "latents": after the scheduler step, i.e. the next step's input (and the pipeline's result at the end)
        expected_next = calls[i + 1][0][:2] if i + 1 < steps else final
        torch.testing.assert_close(tensors["latents"], x_t + (sigmas[i + 1] - sigmas[i]) * v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tensors["latents"], expected_next, rtol=0, atol=0)
    # The last step lands on sigma = 0: its x0 prediction is the sample
    torch.testing.assert_close(seen[-1][2]["x0_pred"], final, rtol=1e-5, atol=1e-5)


def test_callback_defaults_to_latents_and_can_replace_them():
    pipe = tiny_pipe()
    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        seen.append(sorted(callback_kwargs))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 0 else {}

    calls, handle = record_calls(pipe.transformer)
    pipe([1], num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    handle.remove()
    assert seen == [["latents"]] * 3
    assert calls[1][0].abs().max() == 0  # the replaced latents are the next step's input


@pytest.mark.parametrize(
    "inputs, match",
    [(["noise"], r"has to be in \['latents', 'x0_pred'\], but found \['noise'\]"), ("x0_pred", "list of names")],
)
def test_bad_callback_tensor_inputs_raise_before_sampling(inputs, match):
    pipe = tiny_pipe()
    calls, handle = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match=match):
        pipe([0], num_inference_steps=2, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=inputs)
    with pytest.raises(ValueError, match="must be callable"):
        pipe([0], num_inference_steps=2, callback_on_step_end="not a function")
    handle.remove()
    assert calls == []


# ------------------------------------------------------------------------------------------ eval_dit: trajectory


def test_trajectory_step_indices_are_evenly_spaced_with_both_ends():
    script = load_script("eval_dit")
    assert script.trajectory_step_indices(4, 3) == [0, 2, 3]
    assert script.trajectory_step_indices(256, 2) == [0, 255]
    assert script.trajectory_step_indices(5, 5) == [0, 1, 2, 3, 4]
    assert script.trajectory_step_indices(1, 1) == [0]
    assert script.trajectory_step_indices(80, 6) == [0, 16, 32, 47, 63, 79]


def test_eval_dit_trajectory_decodes_the_x0_predictions(tmp_path, pipelines, tiny_feature_models, monkeypatch, capsys):
    path = pipelines["stock"]
    steps, shift, guidance, seed = 4, 2.0, 2.0, 5
    extra = ("--num_inference_steps", steps, "--shift", shift, "--guidance_scale", guidance, "--seed", seed,
             "--trajectory_steps", 3, "--trajectory_samples", 2, "--batch_size", 2)  # fmt: skip
    with monkeypatch.context() as patched:
        stdout = run_in_process(patched, capsys, eval_args(path, tmp_path, tiny_feature_models["torchscript"], *extra))
    out = tmp_path / "eval"
    assert "samples_grid.png, trajectory.png, trajectory.json, samples" in stdout
    info = json.loads((out / "trajectory.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["trajectory"] == info
    assert info["step_indices"] == [0, 2, 3] and info["sample_indices"] == [0, 1]
    labels = json.loads((out / "samples" / "labels.json").read_text())
    assert info["class_labels"] == [labels["000000.png"], labels["000001.png"]]
    expected_sigmas = [time_shift(1 - i / steps, shift) for i in (0, 2, 3)]
    assert info["sigmas"] == pytest.approx(expected_sigmas, rel=1e-6)
    assert info["sigmas"][-1] == pytest.approx(time_shift(1 / steps, shift), rel=1e-6)  # the final step's sigma
    assert info["labels"] == [f"sigma={s:.2f}" for s in expected_sigmas] == ["sigma=1.00", "sigma=0.67", "sigma=0.40"]

    # Independently: the same noise (generator of sample i) and class, the model's velocities from a forward hook,
    # x0 = x_t - sigma v (guided) at the kept steps, denormalised by hand and decoded by the vae
    pipe = DiTFlowMatchPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, kw, o: calls.append((kw["hidden_states"].clone(), o.sample.clone())), with_kwargs=True
    )
    sigmas = [time_shift(1 - i / steps, shift) for i in range(steps)]
    mean = torch.tensor(pipe.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(pipe.config.latents_std).view(1, -1, 1, 1)
    rows = []
    for i in range(2):
        calls.clear()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        pipe([info["class_labels"][i]], num_inference_steps=steps, guidance_scale=guidance, shift=shift,
             generator=generator, output_type="latent")  # fmt: skip
        tiles = []
        for step in (0, 2, 3):
            x_t, v = calls[step]
            v_cond, v_uncond = v.chunk(2)
            x0 = x_t[:1] - sigmas[step] * (v_uncond + guidance * (v_cond - v_uncond))
            with torch.no_grad():
                tiles.append(pipe.vae.decode(x0 * std + mean).sample.clamp(-1, 1)[0])
        rows.append(torch.stack(tiles))
    handle.remove()
    names = [f"class{k} ({k})" for k in info["class_labels"]]
    assert info["row_labels"] == names
    expected = labelled_image_grid(rows, names, info["labels"], padding=1)
    got = Image.open(out / "trajectory.png").convert("RGB")
    assert got.size == expected.size
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(expected).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # The first column is the first step's prediction (a blurry mean at sigma = 1), not the sample: it differs
    # from the last column, which is the sample itself (the last step lands on sigma = 0)
    tile = rows[0].shape[-1]
    width, height = got.size
    left, top = width - 3 * (tile + 1), height - 2 * (tile + 1)  # the label margin and band (see labelled_image_grid)
    grid = np.asarray(got).astype(int)
    first = grid[top : top + tile, left : left + tile]
    last = grid[top : top + tile, left + 2 * (tile + 1) : left + 2 * (tile + 1) + tile]
    sample = np.asarray(Image.open(out / "samples" / "000000.png").convert("RGB")).astype(int)
    assert np.abs(last - sample).max() <= 1 and np.abs(first - sample).mean() > 5


# -------------------------------------------------------------------------------- eval_dit: loss per noise level


def expected_losses(pipeline, latents_dir, seed, levels, max_samples, self_conditioning=True, null_class=False):
    """The flow-matching loss per noise level recomputed from the shards with the transformer directly (with every
    label replaced by the null class when ``null_class``)."""
    meta = json.loads(open(os.path.join(latents_dir, "metadata.json")).read())
    shards = [load_file(os.path.join(latents_dir, name)) for name in meta["shards"]]
    mean = torch.cat([s["mean"] for s in shards])[:max_samples].float()
    std = torch.cat([s["std"] for s in shards])[:max_samples].float()
    labels = torch.cat([s["labels"] for s in shards])[:max_samples]
    pipe = DiTFlowMatchPipeline.from_pretrained(pipeline)
    if null_class:
        labels = torch.full_like(labels, pipe.num_classes)
    model = pipe.transformer.eval()
    lat_mean = torch.tensor(pipe.config.latents_mean).view(1, -1, 1, 1)
    lat_std = torch.tensor(pipe.config.latents_std).view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    x0 = (mean + std * torch.randn(mean.shape, generator=generator) - lat_mean) / lat_std
    uses_self_cond = self_conditioning and getattr(model.config, "self_conditioning", False)
    out = []
    for k in range(levels):
        sigma = (k + 0.5) / levels
        noise = torch.randn(mean.shape, generator=generator)
        x_t = (1 - sigma) * x0 + sigma * noise
        t = torch.full((len(x0),), sigma * 1000)
        with torch.no_grad():
            kwargs = {"self_cond": model(x_t, t, labels).last_hidden_state} if uses_self_cond else {}
            v = model(x_t, t, labels, **kwargs).sample
        out.append(((v - (noise - x0)) ** 2).flatten(1).mean(1).mean().item())
    return out


@pytest.mark.parametrize("kind", ["selfcond", "stock"])
def test_eval_dit_loss_per_noise_level_equals_a_recomputation(
    kind, tmp_path, pipelines, latents, tiny_feature_models, monkeypatch, capsys
):
    seed, levels, max_samples = 3, 4, 5  # 5 of the 6 latents, across both shards, in batches of 2
    extra = ("--loss_latents_dir", latents, "--loss_noise_levels", levels, "--loss_max_samples", max_samples,
             "--seed", seed, "--batch_size", 2)  # fmt: skip
    with monkeypatch.context() as patched:
        run_in_process(
            patched, capsys, eval_args(pipelines[kind], tmp_path, tiny_feature_models["torchscript"], *extra)
        )
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["loss_per_noise_level"]
    assert set(result) == {"sigma", "loss", "loss_null_class", "class_gain", "num_samples", "latents_dir"}
    assert result["sigma"] == pytest.approx([0.125, 0.375, 0.625, 0.875]) and len(result["loss"]) == levels
    assert (result["num_samples"], result["latents_dir"]) == (max_samples, latents)
    expected = expected_losses(pipelines[kind], latents, seed, levels, max_samples)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    null = expected_losses(pipelines[kind], latents, seed, levels, max_samples, null_class=True)
    assert result["loss_null_class"] == pytest.approx(null, rel=1e-5) and null != pytest.approx(expected, rel=1e-6)
    assert result["class_gain"] == pytest.approx([b - a for a, b in zip(expected, null)], rel=1e-4, abs=1e-7)
    if kind == "selfcond":  # the auxiliary pass matters: without it the numbers differ
        plain = expected_losses(pipelines[kind], latents, seed, levels, max_samples, self_conditioning=False)
        assert result["loss"] != pytest.approx(plain, rel=1e-3)
    assert expected_losses(pipelines[kind], latents, seed + 1, levels, max_samples) != pytest.approx(expected)
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "Flow-matching loss per noise level" in table
    assert f"| 0.125 | {result['loss'][0]:.5f} | {result['class_gain'][0]:+.5f} |" in table


def test_eval_dit_refuses_latents_of_another_autoencoder_before_loading(
    tmp_path, pipelines, other_latents, tiny_feature_models, embedded_fingerprint, monkeypatch, capsys
):
    import accelerate

    other = json.loads(open(os.path.join(other_latents, "metadata.json")).read())["ae_weights_fingerprint"]
    assert other != embedded_fingerprint
    features = tiny_feature_models["torchscript"]
    with monkeypatch.context() as patched:  # recorded provenance: refused from the JSON files, nothing loads
        patched.setattr(accelerate, "Accelerator", lambda *a, **k: pytest.fail("started accelerate"))
        patched.setattr(DiTFlowMatchPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the pipeline"))
        line = run_refused(patched, capsys, eval_args(pipelines["stock"], tmp_path, features,
                                                      "--loss_latents_dir", other_latents))  # fmt: skip
    assert f"--loss_latents_dir {other_latents} holds latents of other autoencoder weights" in line
    assert (
        other in line and embedded_fingerprint in line and "extract the held-out latents with that autoencoder" in line
    )
    # No recorded provenance: compared with the pipeline's vae once it loads, before any sampling
    with monkeypatch.context() as patched:
        patched.setattr(DiTFlowMatchPipeline, "__call__", lambda *a, **k: pytest.fail("sampled"))
        line = run_refused(patched, capsys, eval_args(pipelines["no_provenance"], tmp_path, features,
                                                      "--loss_latents_dir", other_latents))  # fmt: skip
    assert "other autoencoder weights" in line and "the pipeline's vae" in line and embedded_fingerprint in line
    assert not (tmp_path / "eval" / "samples").exists()


def test_loss_latents_of_another_shape_are_refused():
    script = load_script("eval_dit")
    args = script.parse_args(["--samples_dir", ROOT])  # only its loss_latents_dir is read
    args.loss_latents_dir = "held_out"
    config = {"in_channels": 16, "sample_size": 8}
    script.check_loss_latent_shape({"latent_shape": [16, 8, 8], "resolution": 64}, config, args)
    with pytest.raises(script.UsageError, match=r"16x4x4 latents.*16x8x8 ones.*--resolution 64"):
        script.check_loss_latent_shape({"latent_shape": [16, 4, 4], "resolution": 32}, config, args)
    with pytest.raises(script.UsageError, match=r"4x8x8 latents.*with the autoencoder the DiT was trained on"):
        script.check_loss_latent_shape({"latent_shape": [4, 8, 8], "resolution": 32}, config, args)
    video = {"in_channels": 8, "num_frames": 3, "sample_size": 4}  # a video DiT: (C, T', h, w) latents
    script.check_loss_latent_shape({"latent_shape": [8, 3, 4, 4], "resolution": 32}, video, args)
    with pytest.raises(script.UsageError, match=r"8x2x4x4 latents.*8x3x4x4 ones.*training --num_frames"):
        script.check_loss_latent_shape({"latent_shape": [8, 2, 4, 4], "resolution": 32}, video, args)
    with pytest.raises(script.UsageError, match=r"8x4x4 latents.*8x3x4x4 ones.*held-out video latents"):
        script.check_loss_latent_shape({"latent_shape": [8, 4, 4], "resolution": 32}, video, args)
    with pytest.raises(script.UsageError, match=r"8x3x8x8 latents.*--resolution 32"):
        script.check_loss_latent_shape({"latent_shape": [8, 3, 8, 8], "resolution": 64}, video, args)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples_dir", ROOT, "--trajectory_steps", "2"], "--trajectory_steps needs --pipeline"),
        (["--samples_dir", ROOT, "--loss_latents_dir", ROOT], "--loss_latents_dir needs --pipeline"),
        (["--num_inference_steps", "4", "--trajectory_steps", "5"], "between 2 (the first and the last step)"),
        (["--num_inference_steps", "4", "--trajectory_steps", "1"], "between 2 (the first and the last step)"),
        (["--num_samples", "4", "--trajectory_steps", "2", "--trajectory_samples", "5"], "at most --num_samples"),
        (["--loss_noise_levels", "0"], "--loss_noise_levels must be positive"),
    ],
)
def test_diagnostics_argument_errors(extra, message, tmp_path, capsys):
    script = load_script("eval_dit")
    (tmp_path / "model_index.json").write_text("{}")
    base = [] if "--samples_dir" in extra else ["--pipeline", str(tmp_path)]
    with pytest.raises(SystemExit):
        script.parse_args(base + extra)
    assert message in capsys.readouterr().err
