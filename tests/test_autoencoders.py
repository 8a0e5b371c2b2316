"""The adapter table over diffusers autoencoders, on tiny models built in code."""

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

from diffusability_hf import autoencoders as ae


def tiny(name):
    torch.manual_seed(0)
    if name == "AutoencoderKL":
        return AutoencoderKL(
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            scaling_factor=0.5,
            shift_factor=0.1,
        )
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


@pytest.mark.parametrize("name", ae.supported_classes())
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
    z = torch.randn(2, 4, 8, 8)
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
    names = ae.frozen_module_names(vae, num_frozen_up_blocks=1)
    for n in names:
        vae.get_submodule(n)  # exists
    assert names[0].startswith("decoder.") and any(n.endswith("conv_out") for n in names)
    # The frozen up-block is the one that runs last: its output feeds the output norm
    feeds = {}
    last = names[-1]
    handle = vae.get_submodule(last).register_forward_hook(lambda m, i, o: feeds.__setitem__("shape", o.shape))
    ae.decode(vae, ae.encode(vae, torch.zeros(1, 3, 32, 32)).mean)
    handle.remove()
    assert feeds["shape"][-1] == 32, f"{last} should run at full resolution"
    with pytest.raises(ValueError, match="up-blocks"):
        ae.frozen_module_names(vae, num_frozen_up_blocks=99)


def test_unsupported_class_lists_supported_ones():
    with pytest.raises(ValueError, match="AutoencoderKL,"):
        ae.get_row("UNet2DModel")
    with pytest.raises(ValueError, match="Supported classes"):
        ae.model_class({"_class_name": "VQModel"})
