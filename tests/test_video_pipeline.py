"""DiTFlowMatchVideoPipeline: class-conditional video sampling (the image pipeline's loop on (B, C, T', h, w)
latents) with tiny video DiTs and tiny CogVideoX / LTX autoencoders, checked against the autoencoders called by hand,
across save / toolkit load / remote-code load in an interpreter that cannot import the toolkit."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.utils import export_to_gif, export_to_video
from diffusers.utils.torch_utils import randn_tensor

from diffusability_hf import autoencoders as ae
from diffusability_hf.models import SelfConditionedDiT, SelfConditionedVideoDiT, video_transformer_config
from diffusability_hf.pipelines import (
    DiTFlowMatchPipeline,
    DiTFlowMatchVideoPipeline,
    DiTFlowMatchVideoPipelineOutput,
)

from testing_utils import tiny_autoencoder_kl

TINY_CONFIGS = os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs")
NUM_CLASSES = 5
ID2LABEL = {0: "archery", 1: "bowling", 2: "juggling", 3: "surfing", 4: "yoga"}
FRAMES, SIZE = 3, 4  # latent T', h = w
PROVENANCE = {"latents_ae_weights_fingerprint": "feedbeef", "vae_weights_fingerprint": "feedbeef", "latents": "/v"}


@torch.no_grad()
def randomize_(model, std=0.1, seed=0):
    """Overwrite the DiT's (partly zero, adaLN-Zero) init so that the velocity depends on the inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_video_dit(channels=4, seed=1, self_conditioning=True):
    config = video_transformer_config([channels, FRAMES, SIZE, SIZE], NUM_CLASSES, "DiT-tiny/2")
    return randomize_(SelfConditionedVideoDiT(**{**config, "self_conditioning": self_conditioning}), seed=seed).eval()


def tiny_vae(name="cogvideox", seed=0, **overrides):
    torch.manual_seed(seed)
    config = {**ae.read_config(os.path.join(TINY_CONFIGS, f"{name}.json")), **overrides}
    return ae.load_autoencoder(config, None).eval()


def channel_stats(channels):
    mean = [0.1 * (i % 3) - 0.1 for i in range(channels)]
    std = [0.5 + 0.25 * (i % 4) for i in range(channels)]
    return mean, std


def position_stats(channels, seed=3):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, FRAMES, SIZE, SIZE, generator=g) * 0.3
    std = torch.rand(channels, FRAMES, SIZE, SIZE, generator=g) + 0.5
    return mean.tolist(), std.tolist()


def make_pipe(vae_name="cogvideox", transformer=None, vae=None, stats="channel", **config):
    vae = vae if vae is not None else tiny_vae(vae_name)
    channels = vae.config.latent_channels
    mean, std = channel_stats(channels) if stats == "channel" else position_stats(channels)
    config = {"id2label": ID2LABEL, "latents_mean": mean, "latents_std": std, **config}
    pipe = DiTFlowMatchVideoPipeline(
        transformer=transformer if transformer is not None else tiny_video_dit(channels),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=(0, 1), seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).frames


def decoded_size(vae):
    """(T, H, W) that the autoencoder itself decodes from (T', h, w) latents."""
    z = torch.zeros(1, vae.config.latent_channels, FRAMES, SIZE, SIZE)
    kwargs = {"temb": torch.zeros(1)} if getattr(vae.config, "timestep_conditioning", False) else {}
    with torch.no_grad():
        return tuple(vae.decode(z, **kwargs).sample.shape[2:])


def record_calls(model):
    """Every forward call's keyword inputs and output; returns (calls, hook handle)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({**{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, "output": output})

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def capture_decode(vae):
    """Replace ``vae.decode`` by a recorder of its inputs that still decodes."""
    inputs = []
    original = vae.decode

    def decode(z, *args, **kwargs):
        inputs.append({"z": z.clone(), "args": args, "kwargs": dict(kwargs)})
        return original(z, *args, **kwargs)

    vae.decode = decode
    return inputs


def to_unit(video):
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, 3, H, W) in [0, 1], the "pt" layout."""
    return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


# ------------------------------------------------------------------------------------------------------ outputs


def test_cogvideox_decodes_one_plus_four_frames_per_extra_latent_frame():
    assert decoded_size(tiny_vae("cogvideox")) == (1 + 4 * (FRAMES - 1), 8 * SIZE, 8 * SIZE)


@pytest.mark.parametrize("output_type", ["np", "pil", "pt", "latent"])
def test_output_types(output_type):
    pipe = make_pipe()
    frames, height, width = decoded_size(pipe.vae)
    out = pipe([0, 4, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type=output_type)
    assert isinstance(out, DiTFlowMatchVideoPipelineOutput)
    video = out.frames
    if output_type == "np":
        assert isinstance(video, np.ndarray) and video.shape == (3, frames, height, width, 3)
        assert video.dtype == np.float32 and video.min() >= 0.0 and video.max() <= 1.0
    elif output_type == "pil":
        assert isinstance(video, list) and len(video) == 3
        for clip in video:
            assert len(clip) == frames
            assert all(
                isinstance(im, PIL.Image.Image) and im.size == (width, height) and im.mode == "RGB" for im in clip
            )
    elif output_type == "pt":
        assert torch.is_tensor(video) and video.shape == (3, frames, 3, height, width)
        assert video.min() >= 0.0 and video.max() <= 1.0
    else:
        assert torch.is_tensor(video) and video.shape == (3, 4, FRAMES, SIZE, SIZE) and torch.isfinite(video).all()
    as_tuple = pipe([0], num_inference_steps=1, output_type=output_type, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1


def test_np_pt_pil_agree():
    pipe = make_pipe()
    np_frames = sample(pipe, output_type="np")
    pt_frames = sample(pipe, output_type="pt")
    pil_frames = sample(pipe, output_type="pil")
    np.testing.assert_allclose(pt_frames.permute(0, 1, 3, 4, 2).numpy(), np_frames, atol=1e-6)
    for b in range(2):
        for t in (0, np_frames.shape[1] - 1):
            expected = (np_frames[b, t] * 255).round().astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(pil_frames[b][t]), expected)


def test_same_generator_same_frames_other_seed_or_class_different():
    pipe = make_pipe()
    a = sample(pipe, labels=[1, 3])
    np.testing.assert_array_equal(a, sample(pipe, labels=[1, 3]))
    assert np.abs(a - sample(pipe, labels=[1, 3], seed=1)).max() > 1e-3
    other = sample(pipe, labels=[2, 3])  # same noise, first class changed
    assert np.abs(a[0] - other[0]).max() > 1e-3
    np.testing.assert_array_equal(a[1], other[1])
    by_name = sample(pipe, labels=["bowling", "surfing"])
    np.testing.assert_array_equal(by_name, a)


def test_generator_list_and_given_latents():
    pipe = make_pipe()
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    one = pipe([0, 1], num_inference_steps=2, generator=generators, output_type="latent").frames
    again = pipe([0, 1], num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                 output_type="latent").frames  # fmt: skip
    torch.testing.assert_close(one, again, rtol=0, atol=0)
    noise = randn_tensor((2, 4, FRAMES, SIZE, SIZE), generator=torch.Generator().manual_seed(9))
    given = pipe([0, 1], num_inference_steps=2, latents=noise.clone(), output_type="latent").frames
    seeded = sample(pipe, labels=[0, 1], seed=9, output_type="latent")
    torch.testing.assert_close(given, seeded, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- guidance and steps


def test_no_guidance_one_pass_per_step_guidance_two():
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[2, 0], num_inference_steps=3, guidance_scale=1.0)
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (2, 4, FRAMES, SIZE, SIZE)
        assert call["class_labels"].tolist() == [2, 0]
    calls.clear()
    sample(pipe, labels=[2, 0], num_inference_steps=3, guidance_scale=3.0)
    handle.remove()
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (4, 4, FRAMES, SIZE, SIZE)
        assert call["class_labels"].tolist() == [2, 0, NUM_CLASSES, NUM_CLASSES]  # the null class
        torch.testing.assert_close(call["hidden_states"][:2], call["hidden_states"][2:], rtol=0, atol=0)


def test_one_guided_euler_step_is_the_closed_form():
    """sigma 1 -> 0 in one step: x0 = noise - (v_uncond + g (v_cond - v_uncond)), on (B, C, T', h, w) latents."""
    pipe = make_pipe(transformer=tiny_video_dit(self_conditioning=False))
    g = 2.5
    got = sample(pipe, labels=[3, 1], num_inference_steps=1, guidance_scale=g, output_type="latent")
    noise = randn_tensor((2, 4, FRAMES, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 1000.0)
    with torch.no_grad():
        v_cond = pipe.transformer(noise, timestep=t, class_labels=torch.tensor([3, 1])).sample
        v_uncond = pipe.transformer(noise, timestep=t, class_labels=torch.full((2,), NUM_CLASSES)).sample
    torch.testing.assert_close(got, noise - (v_uncond + g * (v_cond - v_uncond)), rtol=1e-5, atol=1e-5)
    unguided = sample(pipe, labels=[3, 1], num_inference_steps=1, output_type="latent")
    torch.testing.assert_close(unguided, noise - v_cond, rtol=1e-5, atol=1e-5)


def test_guidance_interval_and_self_conditioning_per_branch():
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[1, 2], num_inference_steps=4, guidance_scale=2.0, guidance_interval=(0.0, 0.6))
    handle.remove()
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2, 4, 4]  # sigmas 1, 0.75 outside; 0.5, 0.25 inside
    assert calls[0]["self_cond"] is None
    torch.testing.assert_close(calls[1]["self_cond"], calls[0]["output"].last_hidden_state, rtol=0, atol=0)
    cond, uncond = calls[2]["self_cond"].chunk(2)
    torch.testing.assert_close(cond, calls[1]["output"].last_hidden_state, rtol=0, atol=0)
    assert torch.count_nonzero(uncond) == 0  # the unconditional branch has not run yet
    torch.testing.assert_close(calls[3]["self_cond"], calls[2]["output"].last_hidden_state, rtol=0, atol=0)
    assert calls[3]["self_cond"].shape == (4, FRAMES * (SIZE // 2) ** 2, 32)  # (2B, N, D) video tokens


def test_callback_sees_video_latents_and_x0_pred():
    pipe = make_pipe()
    seen = []

    def callback(p, i, t, kwargs):
        seen.append({k: v.shape for k, v in kwargs.items()})
        assert p.decode_latents(kwargs["x0_pred"]).shape[:3] == (2, 3, decoded_size(p.vae)[0])
        return {}

    sample(pipe, num_inference_steps=2, callback_on_step_end=callback,
           callback_on_step_end_tensor_inputs=["latents", "x0_pred"])  # fmt: skip
    assert seen == [{"latents": (2, 4, FRAMES, SIZE, SIZE), "x0_pred": (2, 4, FRAMES, SIZE, SIZE)}] * 2


# ------------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("stats", ["channel", "position"])
def test_frames_are_the_clamped_decode_of_the_denormalised_latents(stats):
    pipe = make_pipe(stats=stats)
    latents = sample(pipe, labels=[0, 2], output_type="latent")
    mean = torch.tensor(pipe.config.latents_mean)
    std = torch.tensor(pipe.config.latents_std)
    if stats == "channel":
        mean, std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)
    else:
        assert mean.shape == (4, FRAMES, SIZE, SIZE)
        mean, std = mean[None], std[None]  # (1, C, T', h, w): every latent element its own statistics
    inputs = capture_decode(pipe.vae)
    frames = sample(pipe, labels=[0, 2], output_type="pt")
    assert len(inputs) == 1 and inputs[0]["args"] == () and "temb" not in inputs[0]["kwargs"]
    torch.testing.assert_close(inputs[0]["z"], latents * std + mean)
    with torch.no_grad():
        video = pipe.vae.decode(latents * std + mean).sample
    assert video.min() < -1 or video.max() > 1  # the random tiny AE overshoots: the clamp matters
    torch.testing.assert_close(frames, to_unit(video), rtol=0, atol=1e-6)
    decoded = pipe.decode_latents(latents)  # (B, 3, T, H, W) in [-1, 1]
    torch.testing.assert_close(decoded, video.clamp(-1, 1), rtol=0, atol=1e-6)
    if stats == "position":  # a per-channel reading of the same numbers would decode something else
        assert not torch.allclose(inputs[0]["z"], latents * std.mean((2, 3, 4), keepdim=True) + mean, atol=1e-3)


def test_bad_statistics_are_refused():
    channels_mean, channels_std = channel_stats(4)
    with pytest.raises(ValueError, match="3 entries but the latents have 4 channels"):
        make_pipe(latents_mean=channels_mean[:3])([0])
    mean, std = position_stats(4)
    wrong = [channel[:2] for channel in mean]  # (C, 2, h, w) but the transformer samples T' = 3
    with pytest.raises(ValueError, match=r"per-position statistics of shape \(4, 2, 4, 4\).*\(4, 3, 4, 4\)"):
        make_pipe(latents_mean=wrong, latents_std=std)([0])
    std[1][0][0][0] = 0.0
    with pytest.raises(ValueError, match="`latents_std` must be positive, got a minimum of 0.0"):
        make_pipe(latents_mean=mean, latents_std=std)([0])
    with pytest.raises(ValueError, match="must be positive"):
        make_pipe(latents_std=[1.0, -1.0, 1.0, 1.0])([0])


def test_ltx_timestep_decoder_gets_temb_and_noise_from_the_generator():
    """As diffusers' LTXPipeline: noise = randn_tensor(latent shape, generator) after the sampling noise,
    z = (1 - s) z + s noise in the raw latent space, decode(z, temb=decode_timestep)."""
    pipe = make_pipe("ltx_timestep")
    assert pipe.vae.config.timestep_conditioning
    shape = (2, 8, FRAMES, SIZE, SIZE)
    latents = sample(pipe, labels=[0, 3], output_type="latent")
    z = pipe.denormalize_latents(latents)
    for kwargs, timestep, scale in [
        ({}, [0.05, 0.05], 0.025),  # the defaults
        ({"decode_timestep": [0.1, 0.4], "decode_noise_scale": None}, [0.1, 0.4], torch.tensor([0.1, 0.4])),
        ({"decode_timestep": 0.2, "decode_noise_scale": 0.5}, [0.2, 0.2], 0.5),
    ]:
        inputs = capture_decode(pipe.vae)
        frames = sample(pipe, labels=[0, 3], output_type="pt", **kwargs)
        del pipe.vae.decode
        generator = torch.Generator().manual_seed(0)
        randn_tensor(shape, generator=generator)  # the initial noise of the sampling
        noise = randn_tensor(shape, generator=generator)
        s = torch.as_tensor(scale).view(-1, 1, 1, 1, 1)
        mixed = (1 - s) * z + s * noise
        torch.testing.assert_close(inputs[0]["z"], mixed)
        torch.testing.assert_close(inputs[0]["kwargs"]["temb"], torch.tensor(timestep))
        with torch.no_grad():
            video = pipe.vae.decode(mixed, temb=torch.tensor(timestep)).sample
        torch.testing.assert_close(frames, to_unit(video), rtol=0, atol=1e-6)
    with torch.no_grad():
        clean = pipe.vae.decode(z, temb=torch.tensor([0.05, 0.05])).sample
    assert not torch.allclose(sample(pipe, labels=[0, 3], output_type="pt"), to_unit(clean), atol=1e-4)


def test_plain_ltx_decoder_gets_neither_temb_nor_noise():
    pipe = make_pipe("ltx")
    assert not pipe.vae.config.timestep_conditioning
    latents = sample(pipe, labels=[4], output_type="latent")
    inputs = capture_decode(pipe.vae)
    frames = sample(pipe, labels=[4], output_type="pt", decode_timestep=0.5, decode_noise_scale=0.5)
    assert inputs[0]["args"] == () and "temb" not in inputs[0]["kwargs"]
    z = pipe.denormalize_latents(latents)
    torch.testing.assert_close(inputs[0]["z"], z, rtol=0, atol=0)
    del pipe.vae.decode
    with torch.no_grad():
        video = pipe.vae.decode(z).sample
    assert frames.shape[1] == decoded_size(pipe.vae)[0] == 1 + 8 * (FRAMES - 1)
    torch.testing.assert_close(frames, to_unit(video), rtol=0, atol=1e-6)


def test_ltx2_timestep_decoder_mixes_noise_in_its_normalised_space():
    """As diffusers' LTX2Pipeline: the noise is mixed before `_denormalize_latents` with the VAE's own statistics."""
    vae = tiny_vae("ltx2", timestep_conditioning=True)
    with torch.no_grad():
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    vae.register_to_config(scaling_factor=0.7)
    pipe = make_pipe(vae=vae)
    latents = sample(pipe, labels=[0], output_type="latent")
    inputs = capture_decode(pipe.vae)
    sample(pipe, labels=[0], output_type="pt")
    shape = (1, 8, FRAMES, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    randn_tensor(shape, generator=generator)
    noise = randn_tensor(shape, generator=generator)
    vae_mean, vae_std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    normalised = (pipe.denormalize_latents(latents) - vae_mean) * 0.7 / vae_std
    expected = (0.975 * normalised + 0.025 * noise) * vae_std / 0.7 + vae_mean
    torch.testing.assert_close(inputs[0]["z"], expected)
    torch.testing.assert_close(inputs[0]["kwargs"]["temb"], torch.tensor([0.05]))


def test_decoder_noise_injection_is_seeded_and_leaves_the_global_rng_alone():
    """LTX decoders with decoder_inject_noise draw from torch's global RNG inside diffusers: the pipeline seeds it from
    the generator for the decode only, so the same generator gives the same frames."""
    vae = tiny_vae("ltx_timestep")
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "per_channel_scale" in name:
                p.fill_(0.5)  # zero at init: make the injected noise visible
    pipe = make_pipe(vae=vae)
    state = torch.get_rng_state()
    a = sample(pipe, labels=[1, 2])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG does not matter
    np.testing.assert_array_equal(sample(pipe, labels=[1, 2]), a)
    assert np.abs(sample(pipe, labels=[1, 2], seed=1) - a).max() > 1e-3
    unseeded = [pipe([1, 2], num_inference_steps=2, latents=torch.zeros(2, 8, FRAMES, SIZE, SIZE)).frames
                for _ in range(2)]  # fmt: skip
    assert np.abs(unseeded[0] - unseeded[1]).max() > 1e-4  # no generator: the global RNG as in diffusers


def test_with_a_generator_per_sample_a_noise_injecting_decoder_gives_each_sample_its_own_frames():
    """With one generator per sample, sample i's frames (initial noise, decode noise mixed in, noise injected inside
    the decoder) come from its generator alone: the same in any batch."""
    vae = tiny_vae("ltx_timestep")
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "per_channel_scale" in name:
                p.fill_(0.5)  # zero at init: make the injected noise visible
    pipe = make_pipe(vae=vae)

    def frames(labels, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(labels, num_inference_steps=2, generator=generators, output_type="np").frames

    batch = frames([1, 2, 3], [7, 8, 9])
    for i, (label, seed) in enumerate([(1, 7), (2, 8), (3, 9)]):
        np.testing.assert_allclose(frames([label], [seed])[0], batch[i], rtol=0, atol=1e-5)
    np.testing.assert_allclose(frames([3, 2], [9, 8])[1], batch[1], rtol=0, atol=1e-5)
    with torch.no_grad():  # the injected noise is visible: without it the frames differ
        for name, p in vae.named_parameters():
            if "per_channel_scale" in name:
                p.zero_()
    assert np.abs(frames([2], [8])[0] - batch[1]).max() > 1e-3


def test_unknown_classes_are_refused_before_sampling():
    pipe = make_pipe(id2label={str(k): f"class {k}" for k in range(NUM_CLASSES)})
    calls, handle = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match=f"{NUM_CLASSES} is the null class"):
        pipe([0, NUM_CLASSES])
    with pytest.raises(ValueError, match="Unknown class name 'zebra'"):
        pipe(["class 1", "zebra"])
    handle.remove()
    assert calls == []


def test_decode_arguments_are_checked_before_sampling():
    pipe = make_pipe("ltx_timestep")
    calls, handle = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match="`decode_timestep` has 3 values but 2 videos are sampled"):
        pipe([0, 1], decode_timestep=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="`decode_noise_scale` must be a number"):
        pipe([0, 1], decode_noise_scale="a lot")
    handle.remove()
    assert calls == []


# ------------------------------------------------------------------------------------------------------ exports


def test_pil_frames_export_to_gif_and_mp4(tmp_path):
    pipe = make_pipe()
    frames = sample(pipe, labels=[0, 1], output_type="pil")
    path = export_to_gif(frames[1], str(tmp_path / "clip.gif"))
    with PIL.Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(frames[1]) == decoded_size(pipe.vae)[0]
        assert gif.size == frames[1][0].size
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    path = export_to_video(frames[0], str(tmp_path / "clip.mp4"), fps=8)
    with imageio.get_reader(path) as reader:
        assert reader.count_frames() == len(frames[0])


# ------------------------------------------------------------------------------------------------------ refusals


def tiny_image_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                 sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=4)  # fmt: skip


def tiny_image_vae():
    return tiny_autoencoder_kl((8,))


@pytest.mark.parametrize("make_transformer", [tiny_image_dit, lambda: SelfConditionedDiT(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=SIZE, patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES)])  # fmt: skip
def test_image_transformer_is_refused(make_transformer):
    transformer = make_transformer()
    match = r"needs a video transformer, but the \w+ config has no `num_frames`.*DiTFlowMatchPipeline"
    with pytest.raises(ValueError, match=match):
        make_pipe(transformer=transformer)
    pipe = make_pipe()
    pipe.transformer = transformer  # swapped after construction: refused at the call
    decoded = capture_decode(pipe.vae)
    with pytest.raises(ValueError, match=match):
        pipe([0], num_inference_steps=1)
    assert decoded == []


def test_image_autoencoder_is_refused():
    match = r"needs a video autoencoder .* AutoencoderKL is an image autoencoder.*DiTFlowMatchPipeline"
    with pytest.raises(ValueError, match=match):
        make_pipe(vae=tiny_image_vae())
    pipe = make_pipe()
    pipe.vae = tiny_image_vae()
    calls, handle = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match=match):
        pipe([0], num_inference_steps=1)
    handle.remove()
    assert calls == []


def test_image_latents_are_refused():
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match=r"must be video latents \(B, C, T', h, w\).*DiTFlowMatchPipeline.*"
                                         r"\(1, 4, 3, 4, 4\)"):  # fmt: skip
        pipe([0], latents=torch.zeros(1, 4, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"`latents` must have shape \(2, 4, 3, 4, 4\)"):
        pipe([0, 1], latents=torch.zeros(1, 4, FRAMES, SIZE, SIZE))
    with pytest.raises(ValueError, match="Expected video latents"):
        pipe.decode_latents(torch.zeros(1, 4, SIZE, SIZE))
    handle.remove()
    assert calls == []


def test_the_image_pipeline_takes_per_position_statistics_too():
    """The shared denormalisation: image statistics (C, h, w) broadcast as (1, C, h, w)."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=4)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g) + 0.5
    pipe = DiTFlowMatchPipeline(transformer, tiny_image_vae(), FlowMatchEulerDiscreteScheduler(),
                                latents_mean=mean.tolist(), latents_std=std.tolist())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    latents = pipe([0, 1], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent")
    inputs = capture_decode(pipe.vae)
    pipe([0, 1], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
    torch.testing.assert_close(inputs[0]["z"], latents.images * std[None] + mean[None])


# ---------------------------------------------------------------------------------------------- save and load

SAMPLE_KWARGS = {"num_inference_steps": 2, "guidance_scale": 2.0, "shift": 2.0, "output_type": "np"}
LABELS = [0, 3]

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys


    class BlockToolkit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffusability_hf" or name.startswith("diffusability_hf."):
                raise ModuleNotFoundError(f"{name} is blocked in this interpreter")
            return None


    sys.meta_path.insert(0, BlockToolkit())
    try:
        import diffusability_hf  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    paths, labels, kwargs, out_file = json.loads(sys.argv[1])
    results, info = {}, {"blocked": blocked}
    for key, path in paths.items():
        pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(labels, generator=torch.Generator().manual_seed(0), **kwargs)
        results[key] = out.frames
        info[key] = [type(pipe).__module__, type(pipe).__name__, type(pipe.transformer).__module__,
                     type(pipe.vae).__name__, type(out).__name__]
        info[key + "_provenance"] = pipe.config.provenance
    info["toolkit_imported"] = sorted(m for m in sys.modules if m.startswith("diffusability_hf"))
    np.savez(out_file, **results)
    print(json.dumps(info))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_video")
    pipes = {
        "cogvideox": make_pipe("cogvideox", stats="position", provenance=PROVENANCE),
        "ltx_timestep": make_pipe("ltx_timestep"),
    }
    paths, expected = {}, {}
    for key, pipe in pipes.items():
        paths[key] = str(root / key)
        pipe.save_pretrained(paths[key])
        expected[key] = pipe(LABELS, generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).frames

    # Remote code in a fresh interpreter that cannot import the toolkit: a temporary working directory, no
    # PYTHONPATH, and an import blocker ahead of the editable install's finder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The same thread count as here: float sums reduce in another order on another count (1e-5 differences)
    env.update(
        HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()), HF_MODULES_CACHE=str(root / "modules")
    )
    out_file = str(root / "remote.npz")
    args = json.dumps([paths, LABELS, SAMPLE_KWARGS, out_file])
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"pipes": pipes, "paths": paths, "expected": expected, "remote": dict(np.load(out_file)), "info": info}


def test_saved_model_index_layout(saved):
    for key, vae_class in [("cogvideox", "AutoencoderKLCogVideoX"), ("ltx_timestep", "AutoencoderKLLTXVideo")]:
        path = saved["paths"][key]
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        assert index["_class_name"] == ["pipeline", "DiTFlowMatchVideoPipeline"]
        assert index["transformer"] == ["video_dit", "SelfConditionedVideoDiT"]
        assert index["vae"] == ["diffusers", vae_class]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert index["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
        pipe = saved["pipes"][key]
        assert index["latents_mean"] == pipe.config.latents_mean and index["latents_std"] == pipe.config.latents_std
        assert index["provenance"] == (PROVENANCE if key == "cogvideox" else None)
        assert np.shape(index["latents_mean"]) == ((4, FRAMES, SIZE, SIZE) if key == "cogvideox" else (8,))
        with open(os.path.join(path, "pipeline.py")) as f:
            code = f.read()
        assert "class DiTFlowMatchPipeline(DiffusionPipeline)" in code
        assert "class DiTFlowMatchVideoPipeline(DiTFlowMatchPipeline)" in code
        assert "diffusability_hf" not in code  # self-contained
        assert os.path.isfile(os.path.join(path, "transformer", "video_dit.py"))
        with open(os.path.join(path, "transformer", "config.json")) as f:
            assert json.load(f)["num_frames"] == FRAMES


@pytest.mark.parametrize("key", ["cogvideox", "ltx_timestep"])
def test_toolkit_class_loads_the_saved_pipeline(saved, key):
    pipe = DiTFlowMatchVideoPipeline.from_pretrained(saved["paths"][key])
    assert type(pipe) is DiTFlowMatchVideoPipeline
    assert type(pipe.transformer) is SelfConditionedVideoDiT
    assert pipe.config.latents_mean == saved["pipes"][key].config.latents_mean
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(LABELS, generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).frames
    np.testing.assert_array_equal(frames, saved["expected"][key])
    # DiffusionPipeline.from_pretrained with remote code, in this interpreter too
    remote = DiffusionPipeline.from_pretrained(saved["paths"][key], trust_remote_code=True)
    assert type(remote).__name__ == "DiTFlowMatchVideoPipeline" and type(remote).__module__.endswith("pipeline")
    remote.set_progress_bar_config(disable=True)
    frames = remote(LABELS, generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).frames
    np.testing.assert_allclose(frames, saved["expected"][key], rtol=0, atol=1e-6)


def test_remote_code_loads_in_a_fresh_interpreter_without_the_toolkit(saved):
    info = saved["info"]
    assert info["blocked"] is True and info["toolkit_imported"] == []
    for key, vae_class in [("cogvideox", "AutoencoderKLCogVideoX"), ("ltx_timestep", "AutoencoderKLLTXVideo")]:
        assert info[key] == [
            "diffusers_modules.local.pipeline",
            "DiTFlowMatchVideoPipeline",
            "diffusers_modules.local.video_dit",
            vae_class,
            "DiTFlowMatchVideoPipelineOutput",
        ]
        assert saved["remote"][key].shape == saved["expected"][key].shape
        np.testing.assert_allclose(saved["remote"][key], saved["expected"][key], rtol=0, atol=1e-6)
    assert info["cogvideox_provenance"] == PROVENANCE and info["ltx_timestep_provenance"] is None
