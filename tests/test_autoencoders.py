"""The adapter table over diffusers autoencoders, image and video, on tiny models built in code."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

from diffusability_hf import autoencoders as ae
from diffusability_hf.losses import downsample

from testing_utils import tiny_autoencoder_kl

TINY_CONFIGS = os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs")
# One tiny config per video class (the LTX timestep-conditioned decoder has its own file)
VIDEO_CONFIGS = {
    "AutoencoderKLCogVideoX": "cogvideox",
    "AutoencoderKLLTXVideo": "ltx",
    "AutoencoderKLLTX2Video": "ltx2",
    "AutoencoderKLWan": "wan",
    "AutoencoderKLHunyuanVideo": "hunyuan_video",
    "AutoencoderKLMochi": "mochi",
    "AutoencoderKLAllegro": "allegro",
    "AutoencoderKLCosmos": "cosmos",
}
VIDEO = sorted(VIDEO_CONFIGS)
CAUSAL = [n for n in VIDEO if ae.get_row(n).causal]
IMAGE_INPUT = [n for n in ae.supported_classes() if not ae.get_row(n).video] + CAUSAL  # take 4D images


def tiny_config(stem):
    with open(os.path.join(TINY_CONFIGS, f"{stem}.json")) as f:
        return json.load(f)


def tiny(name):
    torch.manual_seed(0)
    if name in VIDEO_CONFIGS or name in ("ltx_timestep",):
        cfg = tiny_config(VIDEO_CONFIGS.get(name, name))
        return ae.prepare_for_training(ae.model_class(cfg).from_config(cfg))
    if name == "AutoencoderKL":
        return tiny_autoencoder_kl((8, 16, 16), seed=None, scaling_factor=0.5, shift_factor=0.1)
    if name == "AutoencoderKLFlux2":
        return AutoencoderKLFlux2(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
        )
    if name == "AutoencoderDC":
        return AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=4,
            encoder_block_types=("ResBlock", "ResBlock"),
            decoder_block_types=("ResBlock", "ResBlock"),
            encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), ()),
            decoder_qkv_multiscales=((), ()),
        )
    if name == "AutoencoderKLQwenImage":
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, False],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.5, 2.0, 1.0],
        )
    raise KeyError(name)


@pytest.mark.parametrize("name", IMAGE_INPUT)
def test_encode_decode_shapes_and_compression(name):
    vae = tiny(name)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = ae.encode(vae, x)
    f = ae.spatial_compression(vae)
    assert post.mean.shape == (2, ae.latent_channels(vae), 32 // f, 32 // f)
    assert (post.logvar is None) == ae.get_row(vae).deterministic
    z = post.sample(torch.Generator().manual_seed(0))
    if post.logvar is not None:
        assert not torch.equal(z, post.mean)
    out = ae.decode(vae, z)
    assert out.shape == x.shape and torch.isfinite(out).all()
    config = {**vae.config, "_class_name": name}  # as read from config.json, before loading weights
    assert ae.spatial_compression(config) == f


@pytest.mark.parametrize("name", ae.supported_classes())
def test_latent_normalisation_round_trip(name):
    vae = tiny(name)
    if name == "AutoencoderKLFlux2":  # give the batch-norm statistics non-trivial values
        vae.bn.running_mean.uniform_(-1, 1)
        vae.bn.running_var.uniform_(0.5, 2)
    shape = (2, ae.latent_channels(vae), 8, 8) if name not in VIDEO else (2, ae.latent_channels(vae), 3, 8, 8)
    z = torch.randn(shape)
    back = ae.denormalize_latents(vae, ae.normalize_latents(vae, z))
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-5)


def test_autoencoderkl_normalisation_matches_flux_convention():
    vae = tiny("AutoencoderKL")
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(ae.normalize_latents(vae, z), (z - 0.1) * 0.5)


def test_qwen_normalisation_is_per_channel():
    vae = tiny("AutoencoderKLQwenImage")
    z = torch.randn(1, 4, 4, 4)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(ae.normalize_latents(vae, z), (z - mean) / std)


@pytest.mark.parametrize("name", ae.supported_classes())
def test_frozen_module_names_point_at_the_output_end(name):
    vae = tiny(name)
    row = ae.get_row(name)
    names = ae.frozen_module_names(vae, num_frozen_up_blocks=1)
    for n in names:
        vae.get_submodule(n)  # exists
    assert names[: len(row.output_layers)] == [f"decoder.{n}" for n in row.output_layers]
    # The frozen up-block is the one that runs last, and the output layers run after it
    calls = []
    ups = vae.decoder.up_blocks
    handles = [
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(f"decoder.up_blocks.{k}")) for k, b in enumerate(ups)
    ]
    for n in row.output_layers:
        handles.append(vae.get_submodule(f"decoder.{n}").register_forward_hook(lambda m, i, o, n=n: calls.append(n)))
    x = torch.zeros(1, 3, 32, 32) if row.causal else torch.zeros(1, 3, 4, 32, 32)
    with torch.no_grad():
        ae.decode(vae, ae.encode(vae, x).mean)
    for h in handles:
        h.remove()
    last_up = [c for c in calls if c.startswith("decoder.up_blocks")][-1]
    assert names[-1] == last_up
    assert calls.index(row.output_layers[-1]) > calls.index(last_up)
    with pytest.raises(ValueError, match="up-blocks"):
        ae.frozen_module_names(vae, num_frozen_up_blocks=99)


def test_unsupported_class_lists_supported_ones():
    with pytest.raises(ValueError, match="AutoencoderKL,"):
        ae.get_row("UNet2DModel")
    with pytest.raises(ValueError, match="Supported classes"):
        ae.model_class({"_class_name": "VQModel"})


# ----------------------------------------------------------------------------------------------------------------
# Video autoencoders


def valid_frames(name, k=2):
    cfg = {**tiny_config(VIDEO_CONFIGS[name])}
    m = ae.frame_multiple(cfg)
    return 1 + m * k if ae.get_row(name).causal else m * k


@pytest.mark.parametrize("name", VIDEO)
def test_video_compression_from_config_matches_the_model(name):
    vae = tiny(name)
    cfg = tiny_config(VIDEO_CONFIGS[name])
    s, t = ae.compression(cfg)
    assert (s, t) == ae.compression(vae)
    frames = valid_frames(name)
    res = 2 * s if s >= 16 else 32
    x = torch.rand(2, 3, frames, res, res) * 2 - 1
    with torch.no_grad():
        post = ae.encode(vae, x)
        z = post.sample(torch.Generator().manual_seed(0))
        out = ae.decode(vae, z, torch.Generator().manual_seed(1))
    assert z.shape == (2, ae.latent_channels(cfg), ae.latent_num_frames(cfg, frames), res // s, res // s)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (post.logvar is None) == ae.get_row(name).deterministic
    # The SE branch: a x2 spatially downsampled latent decodes to x2 smaller frames, same frame count
    with torch.no_grad():
        small = ae.decode(vae, downsample(z, 2), torch.Generator().manual_seed(1))
    assert small.shape == (2, 3, frames, res // 2, res // 2)


def test_compression_of_partial_configs_uses_class_defaults():
    # Only what differs from the class defaults, as in a hand-written config.json
    assert ae.compression({"_class_name": "AutoencoderKLCogVideoX"}) == (8, 4)
    assert ae.compression({"_class_name": "AutoencoderKLLTXVideo"}) == (32, 8)  # patch 4 x 2^3, 2^3
    assert ae.compression({"_class_name": "AutoencoderKLLTX2Video"}) == (32, 8)  # spatial, temporal, 2x spatiotemporal
    assert ae.compression({"_class_name": "AutoencoderKLWan"}) == (8, 4)
    assert ae.compression({"_class_name": "AutoencoderKLMochi"}) == (8, 6)
    assert ae.compression({"_class_name": "AutoencoderKLHunyuanVideo"}) == (8, 4)
    assert ae.compression({"_class_name": "AutoencoderKLAllegro"}) == (8, 4)
    assert ae.compression({"_class_name": "AutoencoderKLCosmos"}) == (8, 8)
    assert ae.temporal_compression({"_class_name": "AutoencoderKL", "block_out_channels": [1, 2]}) is None


@pytest.mark.parametrize("name", VIDEO)
def test_frame_rule_round_trips_and_rejects_the_rest(name):
    cfg = tiny_config(VIDEO_CONFIGS[name])
    vae = tiny(name)
    good = valid_frames(name, 1)
    bad = good + 1
    assert ae.valid_num_frames(cfg, good) and not ae.valid_num_frames(cfg, bad)
    with torch.no_grad():
        out = ae.decode(vae, ae.encode(vae, torch.zeros(1, 3, good, 32, 32)).mode())
    assert out.shape[2] == good
    with pytest.raises(ValueError) as err:
        ae.check_num_frames(cfg, bad)
    msg = str(err.value)
    assert ae.frame_rule(cfg) in msg and str(good) in msg and name in msg


def test_frame_rule_messages_name_the_paper_counts():
    with pytest.raises(ValueError, match=r"1 \+ 8k frames \(e\.g\. 9 or 17\)"):
        ae.check_num_frames({"_class_name": "AutoencoderKLCogVideoX"}, 16)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames \(e\.g\. 17 or 21\)"):
        ae.check_num_frames({"_class_name": "AutoencoderKLWan"}, 18)
    with pytest.raises(ValueError, match=r"4k \(k >= 1\) frames \(e\.g\. 4 or 8\)"):
        ae.check_num_frames({"_class_name": "AutoencoderKLAllegro"}, 1)
    ae.check_num_frames({"_class_name": "AutoencoderKLLTXVideo"}, 17)
    with pytest.raises(ValueError, match="image autoencoder"):
        ae.frame_multiple({"_class_name": "AutoencoderKL", "block_out_channels": [1, 2]})


def test_non_causal_autoencoder_refuses_single_images():
    vae = tiny("AutoencoderKLAllegro")
    with pytest.raises(ValueError, match="not causal"):
        ae.encode(vae, torch.zeros(1, 3, 32, 32))


def test_allegro_untiled_path_matches_its_tiled_diffusers_path():
    vae = tiny("AutoencoderKLAllegro").eval()  # eval: its temporal convs hold dropout layers
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = ae.encode(vae, x).mean
        recon = ae.decode(vae, mean)
        vae.enable_tiling()
        vae.kernel = vae.stride = (8, 32, 32)  # one tile covering the clip (in pixel units, also for decode)
        ref_mean = vae.encode(x).latent_dist.mean
        ref = vae.decode(mean).sample.permute(0, 2, 1, 3, 4)  # diffusers returns (B, T, C, H, W) here
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recon, ref, rtol=1e-4, atol=1e-4)


def test_ltx_timestep_decoder_gets_temb_and_seeded_noise_like_its_pipeline():
    vae = tiny("ltx_timestep").eval()
    z = torch.randn(2, 8, 3, 4, 4)
    with torch.no_grad():
        a = ae.decode(vae, z, torch.Generator().manual_seed(5), decode_timestep=0.05, decode_noise_scale=0.025)
        b = ae.decode(vae, z, torch.Generator().manual_seed(5), decode_timestep=0.05, decode_noise_scale=0.025)
        c = ae.decode(vae, z, torch.Generator().manual_seed(6), decode_timestep=0.05, decode_noise_scale=0.025)
        # What LTXPipeline does before vae.decode (raw latent space): mix noise, pass the timestep per sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        ref = vae.decode(0.975 * z + 0.025 * noise, torch.tensor([0.05, 0.05])).sample
        t_effect = ae.decode(vae, z, None, decode_timestep=0.5, decode_noise_scale=0.0)
        clean = ae.decode(vae, z, None, decode_timestep=0.05, decode_noise_scale=0.0)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t_effect, clean)  # the timestep reaches the decoder


@pytest.mark.parametrize("name", VIDEO)
def test_images_and_clips_train_through_the_adapter(name):
    vae = tiny(name).train()
    frames = valid_frames(name, 1)
    x = torch.rand(1, 3, frames, 32, 32) * 2 - 1
    loss = (ae.decode(vae, ae.encode(vae, x).sample()) - x).square().mean()
    if ae.get_row(name).causal:
        image = x[:, :, 0]
        loss = loss + (ae.decode(vae, ae.encode(vae, image).sample()) - image).square().mean()
    loss.backward()
    grads = [p.grad for p in vae.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_video_latent_normalisation_conventions():
    ltx = tiny("AutoencoderKLLTXVideo")
    ltx.latents_mean.copy_(torch.linspace(-1, 1, 8))
    ltx.latents_std.copy_(torch.linspace(0.5, 2, 8))
    z = torch.randn(1, 8, 2, 4, 4)
    mean, std = ltx.latents_mean.view(1, 8, 1, 1, 1), ltx.latents_std.view(1, 8, 1, 1, 1)
    torch.testing.assert_close(ae.normalize_latents(ltx, z), (z - mean) * ltx.config.scaling_factor / std)

    wan = tiny("AutoencoderKLWan")  # mean/std lists in the config
    z = torch.randn(1, 4, 2, 4, 4)
    mean = torch.tensor(wan.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(wan.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(ae.normalize_latents(wan, z), (z - mean) / std)

    cog = tiny("AutoencoderKLCogVideoX")
    torch.testing.assert_close(ae.normalize_latents(cog, z), z * cog.config.scaling_factor)

    # Cosmos: statistics per (channel, latent frame), times the EDM sigma_data 0.5, as its pipelines
    cfg = {**tiny_config("cosmos"), "latents_mean": list(range(4 * 16)), "latents_std": [2.0] * 64}
    cosmos = ae.model_class(cfg).from_config(cfg)
    z = torch.randn(1, 4, 3, 4, 4)
    mean = torch.arange(64.0).view(1, 4, 16, 1, 1)[:, :, :3]
    torch.testing.assert_close(ae.normalize_latents(cosmos, z), (z - mean) * 0.5 / 2.0)
    back = ae.denormalize_latents(cosmos, ae.normalize_latents(cosmos, z))
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-5)


def test_prepare_for_training_switches_off_framewise_tiling_and_slicing():
    vae = tiny("AutoencoderKLHunyuanVideo")
    vae.use_framewise_encoding = vae.use_framewise_decoding = True  # the class default
    vae.enable_tiling()
    vae.enable_slicing()
    ae.prepare_for_training(vae)
    assert not (vae.use_framewise_encoding or vae.use_framewise_decoding or vae.use_tiling or vae.use_slicing)


def test_weights_fingerprint_tells_weights_apart_where_the_config_cannot(tmp_path):
    """A vanilla AE and its fine-tune share a config; the fingerprint of the weights differs, and survives saving,
    sharding and a device round trip unchanged."""
    import hashlib

    vae = tiny("AutoencoderKL")
    tuned = AutoencoderKL.from_config(vae.config)
    tuned.load_state_dict(vae.state_dict())
    assert dict(tuned.config) == dict(vae.config) and ae.weights_fingerprint(tuned) == ae.weights_fingerprint(vae)
    with torch.no_grad():
        tuned.decoder.conv_out.bias[0] += 1e-3  # one number of the decoder
    assert ae.weights_fingerprint(tuned) != ae.weights_fingerprint(vae)

    vae.save_pretrained(tmp_path / "one")
    vae.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder in ("one", "sharded"):
        assert ae.weights_fingerprint(AutoencoderKL.from_pretrained(tmp_path / folder)) == ae.weights_fingerprint(vae)

    # What it hashes: name, dtype, shape and bytes of every state_dict tensor in name order (BLAKE2b-128, 20 hex)
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(vae.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    assert ae.weights_fingerprint(vae) == h.hexdigest()[:20]
    assert ae.weights_fingerprint(vae.to(torch.float16)) != h.hexdigest()[:20]  # another dtype: other weights


# SE fine-tuning's model facts: loading, what trains (App. B), and the checks before any weights load


def test_load_autoencoder_random_init_and_freeze_for_fine_tuning():
    cfg = tiny_config("cogvideox")
    vae = ae.load_autoencoder(cfg)  # no path: a random init of the config (App. C.5)
    assert type(vae).__name__ == cfg["_class_name"]
    frozen = ae.freeze_for_fine_tuning(vae, 1, True, freeze_encoder=True)
    paper = ae.frozen_module_names(vae, 1, True)  # output layers + the up-block nearest the output
    assert frozen[: len(paper)] == paper and "encoder" in frozen[len(paper) :]
    for name, p in vae.named_parameters():
        assert p.requires_grad != any(name.startswith(f"{n}.") for n in frozen), name
    assert ae.freeze_for_fine_tuning(vae, 0, False) == []  # everything trains again
    assert all(p.requires_grad for p in vae.parameters())


def test_check_se_geometry_returns_the_compression_and_says_what_to_change():
    cfg = tiny_config("cogvideox")  # 8x spatial compression
    assert ae.check_se_geometry(cfg, 64, [2, 4], 2) == 8
    with pytest.raises(ValueError, match="--resolution 60 is not divisible .* compression 8; use 56 or 64"):
        ae.check_se_geometry(cfg, 60, [2], 1)
    with pytest.raises(ValueError, match="SE scale factor 4 does not divide the latent size 6x6"):
        ae.check_se_geometry(cfg, 48, [2, 4], 1)
    with pytest.raises(ValueError, match="The latent size 12 is not divisible by --dct_block_size 8"):
        ae.check_se_geometry(cfg, 96, [2], 8)


def test_check_se_video_batches_and_refusals():
    video, image = tiny_config("cogvideox"), tiny_config("cogvideox") | {"_class_name": "AutoencoderKL"}
    assert ae.check_se_video(video, 8, None, 17) == 4  # half the image batch (Table 5's ratio)
    assert ae.check_se_video(video, 8, 3, 17) == 3
    assert ae.check_se_video(image, 8, None, 17) == 0
    with pytest.raises(
        ValueError, match="AutoencoderKL is an image autoencoder, but --video_data_dir need a video AE"
    ):
        ae.check_se_video(image, 8, None, 17, video_flags=["--video_data_dir"])
    with pytest.raises(ValueError, match="both 0: nothing to train on"):
        ae.check_se_video(video, 0, 0, 17)
    with pytest.raises(ValueError, match="--num_frames 16 does not fit"):
        ae.check_se_video(video, 8, None, 16)
    with pytest.raises(ValueError, match="Temporal SE factor 3 does not fit 17 frames"):
        ae.check_se_video(video, 8, None, 17, [3])
