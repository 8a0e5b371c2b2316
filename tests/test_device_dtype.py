"""Device and dtype contracts under CUDA-style training (bf16 autocast, bf16 weights, generators on another device),
checked on the CPU: CPU autocast stands in for CUDA's, the meta device for "a device that is not the generator's"."""

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from diffusability_hf import autoencoders as ae
from diffusability_hf import spectral
from diffusability_hf.flow import FlowMatchingLoss, sample_sigmas
from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss, chf_loss, load_lpips
from diffusability_hf.models.factory import build_transformer, transformer_config
from diffusability_hf.pipelines import DiTFlowMatchPipeline

from testing_utils import tiny_autoencoder_kl

TINY_CONFIGS = os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs")


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_vae():
    return tiny_autoencoder_kl()


# ------------------------------------------------------------------------------------ float32 code under autocast


def test_block_dct_stays_float32_under_bf16_autocast():
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    coeffs = spectral.blockwise_dct2d(x, 8)
    with bf16_autocast():  # autocast would run the kron(C, C) matmul in bf16 (errors ~1e-2)
        got = spectral.blockwise_dct2d(x, 8)
        back = spectral.blockwise_idct2d(got)
        chopped = spectral.chop_high_frequencies(x, 8, 0.5)
        penalty = spectral.soft_frequency_penalty(x, 8)
    assert got.dtype == back.dtype == chopped.dtype == penalty.dtype == torch.float32
    torch.testing.assert_close(got, coeffs, rtol=0, atol=1e-6)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(chopped, spectral.chop_high_frequencies(x, 8, 0.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(penalty, spectral.soft_frequency_penalty(x, 8), rtol=1e-6, atol=0)


def test_idct_of_bf16_coefficients_is_computed_in_float32_and_returned_in_bf16():
    coeffs = spectral.blockwise_dct2d(torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)), 8)
    low = coeffs.bfloat16()
    got = spectral.blockwise_idct2d(low)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, spectral.blockwise_idct2d(low.float()).bfloat16(), rtol=0, atol=0)


def test_block_dct_on_the_meta_device():
    x = torch.empty(2, 4, 16, 16, device="meta")
    assert spectral.blockwise_dct2d(x, 8).shape == (2, 4, 2, 2, 8, 8)
    assert spectral.chop_high_frequencies(x, 8, 0.25).device.type == "meta"


def test_lpips_runs_its_frozen_trunk_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    distance = ReconstructionDistance(0.0, 1.0, lpips_model=load_lpips("alex", pretrained_trunk=False))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = distance(x, y)
    with bf16_autocast():  # a bf16 trunk moves the distance by about 1%
        got = distance(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_se_objective_with_every_term_under_bf16_autocast_gives_float32_terms_and_finite_gradients():
    vae = tiny_vae().train()
    objective = SEAutoencoderLoss(
        vae, ReconstructionDistance(1.0, 0.0), se_weight=0.25, kl_weight=1e-3, chf_weight=0.5, soft_penalty_weight=0.01
    )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with bf16_autocast():
        loss, terms = objective(x, None, 2, chf_ratio=0.3, generator=torch.Generator().manual_seed(0))
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        chf = chf_loss(x, z, lambda v: vae.decode(v).sample, 0.5)
    assert loss.dtype == chf.dtype == torch.float32 and set(terms) == {"rec", "se", "kl", "chf", "soft"}
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


@pytest.mark.parametrize("stock_dit", [False, True])
def test_flow_matching_under_bf16_autocast_and_with_bf16_weights(stock_dit):
    torch.manual_seed(0)
    transformer = build_transformer(transformer_config((4, 8, 8), 3, "DiT-tiny/2"), stock_dit=stock_dit)
    objective = FlowMatchingLoss(transformer, 3, self_conditioning_prob=0.0 if stock_dit else 0.9)
    x0, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    with bf16_autocast():
        loss = objective(x0, labels, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    transformer.to(torch.bfloat16)
    loss = objective(x0.bfloat16(), labels, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


# ------------------------------------------------------------------------------- generators on another device


class MetaVelocity(nn.Module):
    """A velocity model that works on any device (meta included): returns zeros and a last hidden state."""

    def forward(self, x_t, timestep, labels, self_cond=None):
        @dataclass
        class Out:
            sample: torch.Tensor
            last_hidden_state: torch.Tensor

        return Out(torch.zeros_like(x_t), torch.zeros(x_t.shape[0], 4, 8, device=x_t.device))


def test_a_generator_on_another_device_draws_on_its_own_device():
    """A CPU generator serving non-CPU tensors (CUDA in training; meta here) draws its numbers on the CPU (as
    diffusers' randn_tensor does) instead of being refused by torch (CUDA) or silently not drawn from (meta):
    afterwards it is exactly where the same run on CPU tensors leaves it."""
    objective = FlowMatchingLoss(MetaVelocity(), 3, self_conditioning_prob=0.9)
    cpu_run, meta_run = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    objective(torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), cpu_run)
    loss = objective(
        torch.zeros(2, 4, 8, 8, device="meta"), torch.tensor([0, 1], device="meta"), meta_run
    )  # noise, sigma, label drop and self-conditioning draws, all from the CPU generator
    assert loss.device.type == "meta"
    assert torch.equal(meta_run.get_state(), cpu_run.get_state())
    g, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample_sigmas(4, "uniform", generator=g, device="meta").device.type == "meta"
    torch.rand(4, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_same_device_draws_are_unchanged():
    g = torch.Generator().manual_seed(3)
    got = sample_sigmas(5, "logit_normal", generator=g, device="cpu")
    expect = torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(3))).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


# ---------------------------------------------------------------------------- bf16 transformer in the pipeline


@dataclass
class ConstantOutput(BaseOutput):
    sample: torch.Tensor = None


class ConstantVelocity(ModelMixin, ConfigMixin):
    """v = ``velocity`` everywhere (so the Euler integral is closed-form: x_0 = x_1 - velocity), in the model's dtype;
    records the dtype of what it is fed."""

    @register_to_config
    def __init__(self, in_channels=4, sample_size=8, num_embeds_ada_norm=3, velocity=1e-3):
        super().__init__()
        self.one = nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        self.seen.append(hidden_states.dtype)
        return ConstantOutput(sample=torch.full_like(hidden_states, self.config.velocity) * self.one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_integrates_in_float32_and_feeds_the_transformer_its_dtype(dtype):
    """bf16 latents would lose every one of the 50 updates of 2e-5 against |x| ~ 1 (bf16 spacing there: 2^-7)."""
    transformer = ConstantVelocity().to(dtype)
    pipe = DiTFlowMatchPipeline(transformer, tiny_vae().eval(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe([0, 1], num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="latent")
    latents = out.images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the same noise in any dtype
    assert latents.dtype == torch.float32 and set(transformer.seen) == {dtype}
    torch.testing.assert_close(latents, noise - 1e-3, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- posterior and decoder noise (autoencoders)


def bf16_posterior(mean_scale=8.0, std=0.01):
    """A posterior as the encoder gives it under bf16 autocast: bf16 mean and logvar, with ``|mean| >> std`` (bf16
    spacing at 8 is 2^-4, six times the std)."""
    g = torch.Generator().manual_seed(11)
    mean = (mean_scale + torch.rand(2, 4, 16, 16, generator=g)).bfloat16()
    return ae.Posterior(mean, torch.full_like(mean, 2 * math.log(std)))


def test_a_bf16_posterior_draws_float32_noise_and_sums_in_float32():
    """bf16 noise added in bf16 rounds ``std * eps`` to the mean's spacing: most samples came back as the mean."""
    post = bf16_posterior()
    z = post.sample(torch.Generator().manual_seed(0))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))  # the float32 draw
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, post.mean.float() + post.logvar.float().mul(0.5).exp() * eps, rtol=0, atol=0)
    assert abs(float((z - post.mean.float()).std()) / 0.01 - 1) < 0.05  # the posterior's std, not rounding's


def test_posterior_samples_under_bf16_autocast_are_float32_and_decodable():
    vae = tiny_vae().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad(), bf16_autocast():
        post = ae.encode(vae, x)
        z = post.sample(torch.Generator().manual_seed(1))
        recon = ae.decode(vae, z)
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    assert post.mean.dtype == torch.bfloat16 and z.dtype == torch.float32 and recon.shape == x.shape
    torch.testing.assert_close(z, post.mean.float() + post.logvar.float().mul(0.5).exp() * eps, rtol=0, atol=0)


def test_float32_posterior_samples_are_unchanged():
    """Same device, float32: the draw and the sum are today's, bit for bit (seeded runs and resumes rely on it)."""
    g = torch.Generator().manual_seed(4)
    mean, logvar = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) - 3
    z = ae.Posterior(mean, logvar).sample(torch.Generator().manual_seed(5))
    expect = mean + torch.exp(0.5 * logvar) * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    assert z.dtype == torch.float32 and torch.equal(z, expect)
    double = ae.Posterior(mean.double(), logvar.double()).sample(torch.Generator().manual_seed(5))
    assert double.dtype == torch.float64  # wider than float32: kept


def test_a_cpu_generator_draws_posterior_noise_for_latents_on_another_device():
    """A CUDA mean with a CPU generator made torch refuse the draw; a meta mean (its stand-in here) left the
    generator untouched. Now the noise is drawn on the generator's device and moved."""
    mean = torch.empty(2, 4, 8, 8, device="meta")
    g, reference = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    z = ae.Posterior(mean, torch.empty_like(mean)).sample(g)
    torch.randn(mean.shape, generator=reference)
    assert z.device.type == "meta" and z.shape == mean.shape
    assert torch.equal(g.get_state(), reference.get_state())


def ltx_recording_decoder(stem, **overrides):
    """A tiny LTX / LTX-2 with ``timestep_conditioning`` whose ``decode`` records its input (and runs on any
    device: it returns that input)."""
    torch.manual_seed(0)
    config = {**ae.read_config(os.path.join(TINY_CONFIGS, f"{stem}.json")), **overrides}
    vae = ae.load_autoencoder(config, None).eval()
    seen = []

    def decode(v, temb):
        seen.append((v, temb))
        return ConstantOutput(sample=v)

    vae.decode = decode
    return vae, seen


@pytest.mark.parametrize("stem", ["ltx_timestep", "ltx2"])
def test_ltx_decode_noise_of_bf16_latents_is_drawn_and_mixed_in_float32(stem):
    vae, seen = ltx_recording_decoder(stem, timestep_conditioning=True)
    if stem == "ltx2":  # non-trivial statistics, so that the normalised-space mix is exercised
        vae.latents_mean.copy_(torch.linspace(-1, 1, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2, 8))
    z = (4 * torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(2))).bfloat16()
    ae.decode(vae, z, torch.Generator().manual_seed(3), decode_timestep=0.05, decode_noise_scale=0.025)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))  # the float32 draw
    if stem == "ltx2":
        expect = ae.denormalize_latents(vae, 0.975 * ae.normalize_latents(vae, z.float()) + 0.025 * noise)
    else:
        expect = 0.975 * z.float() + 0.025 * noise
    v, temb = seen[0]
    assert v.dtype == temb.dtype == torch.bfloat16  # the decoder gets z's dtype
    torch.testing.assert_close(v, expect.bfloat16(), rtol=0, atol=0)  # one rounding, of the float32 mixture


def test_ltx_decode_noise_comes_from_a_cpu_generator_for_latents_on_another_device():
    vae, seen = ltx_recording_decoder("ltx_timestep")
    z = torch.empty(1, 8, 2, 4, 4, device="meta")
    g, reference = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ae.decode(vae, z, g)
    torch.randn(z.shape, generator=reference)
    assert seen[0][0].device.type == seen[0][1].device.type == "meta"
    assert torch.equal(g.get_state(), reference.get_state())
