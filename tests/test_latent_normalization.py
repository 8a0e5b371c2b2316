"""Latent normalisation re-estimated in each class's own convention (tiny models built in code)."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKLFlux2

from diffusability_hf import autoencoders as ae
from diffusability_hf.latent_normalization import (
    apply_latent_normalization,
    current_latent_normalization,
    estimate_latent_normalization,
    normalized_std,
    reestimate_latent_normalization,
    training_latents,
)

from testing_utils import tiny_autoencoder_kl

TINY_CONFIGS = os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs")


def kl(**kwargs):
    return tiny_autoencoder_kl(seed=None, **kwargs)


def from_tiny_config(stem, **overrides):
    with open(os.path.join(TINY_CONFIGS, f"{stem}.json")) as fh:
        cfg = {**json.load(fh), **overrides}
    return ae.model_class(cfg).from_config(cfg)


MODELS = {
    "flux-like (shift + scale)": lambda: kl(scaling_factor=0.5, shift_factor=0.1),
    "sd-like (scale only)": lambda: kl(scaling_factor=0.18215, shift_factor=None),
    "per-channel config": lambda: kl(scaling_factor=1.0, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "flux2 batch norm": lambda: AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ),
    "cogvideox": lambda: from_tiny_config("cogvideox"),
    "cogvideox inverted": lambda: from_tiny_config("cogvideox", invert_scale_latents=True),
    "ltx buffers": lambda: from_tiny_config("ltx"),
    "wan config lists": lambda: from_tiny_config("wan"),
}
CENTRED = {"flux-like (shift + scale)", "per-channel config", "flux2 batch norm", "ltx buffers", "wan config lists"}
PER_CHANNEL = {"per-channel config", "ltx buffers", "wan config lists"}


def latents(vae, video):
    c = ae.latent_channels(dict(vae.config))
    gen = torch.Generator().manual_seed(0)
    shape = (6, c, 3, 8, 8) if video else (6, c, 8, 8)
    z = torch.randn(shape, generator=gen)
    scale = torch.linspace(0.5, 3.0, c).view(1, c, *[1] * (len(shape) - 2))
    shift = torch.linspace(-1.0, 2.0, c).view(1, c, *[1] * (len(shape) - 2))
    return z * scale + shift


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reestimated_statistics_normalise_the_latents_and_survive_a_stock_reload(name, tmp_path):
    torch.manual_seed(0)
    vae = MODELS[name]()
    z = latents(vae, ae.get_row(type(vae).__name__).video)
    before = current_latent_normalization(vae)
    assert abs(normalized_std(vae, z) - 1) > 0.05  # the base's statistics do not fit these latents
    estimate = estimate_latent_normalization(vae, z)
    apply_latent_normalization(vae, estimate)
    assert current_latent_normalization(vae) != before
    normalized = ae.normalize_latents(vae, z).double()
    if name in PER_CHANNEL:  # every channel: mean 0, std 1
        flat = normalized.transpose(0, 1).flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(flat.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            flat.std(1, correction=0), torch.ones(flat.shape[0], dtype=torch.float64), atol=1e-4, rtol=0
        )
    else:
        assert normalized.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    if name in CENTRED:
        assert normalized.mean().item() == pytest.approx(0.0, abs=1e-4)
    # The stock class reads the new statistics back from the saved folder (config or buffers)
    vae.save_pretrained(tmp_path)
    reloaded = type(vae).from_pretrained(tmp_path)
    assert current_latent_normalization(reloaded) == current_latent_normalization(vae)
    assert normalized_std(reloaded, z) == pytest.approx(1.0, abs=1e-4) or name in PER_CHANNEL


def test_the_form_of_the_base_is_kept():
    z = latents(kl(), False)
    sd = kl(scaling_factor=0.18215, shift_factor=None)
    assert set(estimate_latent_normalization(sd, z)["config"]) == {"scaling_factor"}
    flux = kl(scaling_factor=0.3611, shift_factor=0.1159)
    got = estimate_latent_normalization(flux, z)["config"]
    assert got["shift_factor"] == pytest.approx(z.double().mean().item(), abs=1e-5)
    assert got["scaling_factor"] == pytest.approx(1 / z.double().std(correction=0).item(), rel=1e-5)
    cosmos = from_tiny_config("cosmos")
    assert estimate_latent_normalization(cosmos, latents(cosmos, True)) is None  # not re-estimated: said so


def test_training_latents_are_seeded_posterior_samples_of_the_first_items():
    torch.manual_seed(0)
    vae = kl(scaling_factor=0.5, shift_factor=0.1)
    data = [{"pixel_values": torch.rand(3, 16, 16) * 2 - 1} for _ in range(5)]
    z = training_latents(vae, data, 3, seed=1, device="cpu", batch_size=2)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, training_latents(vae, data, 3, seed=1, device="cpu", batch_size=2))
    gen = torch.Generator().manual_seed(1)
    first = ae.encode(vae.eval(), torch.stack([d["pixel_values"] for d in data[:2]])).sample(gen)
    assert torch.equal(z[:2], first)
    assert training_latents(vae, data, 99, seed=1, device="cpu").shape[0] == 5


@pytest.mark.parametrize("keep_base", [False, True])
def test_reestimate_latent_normalization_record(keep_base):
    vae = kl(scaling_factor=0.5, shift_factor=0.1)
    z = torch.randn(6, 4, 8, 8) * 3 + 1
    record = reestimate_latent_normalization(vae, z, "images", keep_base)
    assert record["num_samples"] == 6 and record["kind"] == "images"
    assert record["latent_mean"] == pytest.approx(float(z.double().mean()))
    assert record["reestimated"] is not keep_base
    assert record["saved"] == current_latent_normalization(vae)
    if keep_base:
        assert record["reason"] == "--keep_base_latent_scaling" and vae.config.scaling_factor == 0.5
        assert record["would_be"] == estimate_latent_normalization(vae, z)["config"]
    else:
        assert record["form"] == "global shift and scale"
        assert record["normalized_std_with_saved_values"] == pytest.approx(1.0, abs=1e-4)
