"""Rectified-flow math (paper Section 4, Appendix B eq. 3) against hand values, scipy and diffusers' scheduler, and the
training objective built from it."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import stats

from diffusability_hf.flow import (
    FlowMatchingLoss,
    euler_sample,
    flow_matching_loss,
    interpolate,
    sample_sigmas,
    sampling_sigmas,
    time_shift,
    timesteps_from_sigmas,
    velocity_target,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 2, 4, 4)])
def test_interpolate_and_target_by_hand(shape):
    x0, noise = randn(*shape, seed=0), randn(*shape, seed=1)
    sigma = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, noise, sigma)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(xt[1], noise[1])  # sigma = 1 is pure noise
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)
    # The target is the derivative of the path in sigma.
    eps = 1e-3
    finite_diff = (interpolate(x0, noise, sigma * 0 + 0.5 + eps) - interpolate(x0, noise, sigma * 0 + 0.5)) / eps
    torch.testing.assert_close(finite_diff, noise - x0, atol=1e-2, rtol=1e-2)


def test_interpolate_rejects_bad_sigma_shape():
    x = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        interpolate(x, x, torch.ones(3))


def test_loss_zero_for_exact_target_and_per_sample():
    x0, noise = randn(3, 4, 8, 8, seed=0), randn(3, 4, 8, 8, seed=1)
    loss = flow_matching_loss(noise - x0, x0, noise)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3))
    pred = noise - x0
    pred[1] += 2.0
    torch.testing.assert_close(flow_matching_loss(pred, x0, noise), torch.tensor([0.0, 4.0, 0.0]))


def test_logit_normal_sigmas_match_their_distribution():
    mean, std, n = 0.5, 0.8, 20000
    s = sample_sigmas(n, "logit_normal", logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(0))
    assert s.shape == (n,) and s.dtype == torch.float32
    assert bool(((s > 0) & (s < 1)).all())
    logit = torch.logit(s.double())
    assert abs(logit.mean().item() - mean) < 0.03
    assert abs(logit.std().item() - std) < 0.03
    assert abs(s.median().item() - 1 / (1 + math.exp(-mean))) < 0.01
    assert stats.kstest(logit.numpy(), "norm", args=(mean, std)).pvalue > 1e-3


def test_uniform_sigmas_and_bad_mode():
    s = sample_sigmas(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert bool(((s > 0) & (s < 1)).all())
    assert s.min() < 0.01 and s.max() > 0.99
    assert abs(s.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="logit_normal"):
        sample_sigmas(4, "cosine")


@pytest.mark.parametrize("shift", [0.25, 1.0, 3.0, 6.0])
def test_time_shift_is_the_scheduler_shift(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, shift), shift * t / (1 + (shift - 1) * t))
    assert time_shift(1.0, shift) == pytest.approx(1.0) and time_shift(0.0, shift) == pytest.approx(0.0)

    # The scheduler's own unshifted grid for 28 steps, then shifted by the scheduler and by eq. 3.
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    plain.set_timesteps(num_inference_steps=28)
    grid = plain.sigmas[:-1]
    shifted = FlowMatchEulerDiscreteScheduler(shift=shift)
    shifted.set_timesteps(sigmas=grid.tolist())
    torch.testing.assert_close(shifted.sigmas[:-1], time_shift(grid, shift), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(shifted.timesteps, timesteps_from_sigmas(time_shift(grid, shift)), atol=1e-3, rtol=1e-5)


def test_sampling_sigmas_grid():
    s = sampling_sigmas(10, shift=3.0)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(s, time_shift(torch.linspace(1, 0, 11), 3.0))


def gaussian_velocity(mu: torch.Tensor, var: torch.Tensor):
    """Exact v(x, s) = E[noise - x0 | x_t = x] for x0 ~ N(mu, diag(var)), noise ~ N(0, I), x_t = (1-s) x0 + s n.

    Per dimension (x_t, x0, n) are jointly Gaussian: Var[x_t] = (1-s)^2 var + s^2, Cov[x0, x_t] = (1-s) var,
    Cov[n, x_t] = s, so E[x0 | x] = mu + (1-s) var (x - (1-s) mu) / Var[x_t]
    and E[n | x] = s (x - (1-s) mu) / Var[x_t].
    """

    def v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma[:, None].double()
        den = (1 - s) ** 2 * var + s**2
        r = (x.double() - (1 - s) * mu) / den
        return (s * r - (mu + (1 - s) * var * r)).to(x.dtype)

    return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_with_exact_velocity_recovers_gaussian(shift):
    mu = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    var = torch.tensor([0.25, 2.0, 1.0], dtype=torch.float64)
    noise = randn(40000, 3, seed=0)
    x = euler_sample(gaussian_velocity(mu, var), noise, sampling_sigmas(100, shift=shift))
    assert x.shape == noise.shape and x.dtype == noise.dtype
    torch.testing.assert_close(x.double().mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(x.double().var(0), var, atol=0, rtol=0.05)


def test_euler_step_matches_scheduler_step():
    x, v = randn(2, 4, 4, 4, seed=0), randn(2, 4, 4, 4, seed=1)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_inference_steps=4)
    ours = euler_sample(lambda x_, s_: v, x, sched.sigmas[:2])
    theirs = sched.step(v, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(ours, theirs)


def test_euler_rejects_increasing_sigmas():
    with pytest.raises(ValueError, match="decreasing"):
        euler_sample(lambda x, s: x, randn(2, 3), torch.tensor([0.0, 1.0]))


class LinearVelocity(torch.nn.Module):
    """A stand-in DiT: a 1x1 convolution of ``x_t`` plus a learned vector per timestep and class, recording its
    calls; ``last_hidden_state`` (B, N, D) is the input's tokens, and ``self_cond`` is added back onto the input."""

    def __init__(self, channels=4, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.label = torch.nn.Embedding(num_classes + 1, channels)  # the null class is the last row
        self.calls = []

    def forward(self, x, timestep, labels, self_cond=None):
        from types import SimpleNamespace

        self.calls.append({"x": x, "timestep": timestep, "labels": labels, "self_cond": self_cond})
        if self_cond is not None:
            x = x + self_cond.transpose(1, 2).reshape(x.shape)  # (B, N, C) -> (B, C, h, w)
        v = self.conv(x) + self.label(labels)[:, :, None, None] + timestep.view(-1, 1, 1, 1) / 1000
        return SimpleNamespace(sample=v, last_hidden_state=x.flatten(2).transpose(1, 2))  # (B, N = h * w, C)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform"])
@pytest.mark.parametrize("self_conditioning_prob", [0.0, 0.6])
def test_flow_matching_objective_is_the_tested_formula(scheme, self_conditioning_prob):
    """FlowMatchingLoss on a fixed batch and seed equals the loss assembled by hand from the functions tested above,
    with the same draws in the same order from one generator: noise, sigma, label drop, self-conditioning keep."""
    b, c, num_classes = 6, 4, 3
    x0, labels = randn(b, c, 4, 4, seed=2), torch.tensor([0, 1, 2, 0, 1, 2])
    model = LinearVelocity(c, num_classes)
    objective = FlowMatchingLoss(
        model, num_classes, weighting_scheme=scheme, logit_mean=0.3, logit_std=0.7, class_dropout_prob=0.5,
        self_conditioning_prob=self_conditioning_prob,
    )  # fmt: skip
    loss = objective(x0, labels, torch.Generator().manual_seed(7))
    assert loss.shape == (b,) and loss.dtype == torch.float32

    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    sigma = sample_sigmas(b, scheme, 0.3, 0.7, generator=g)
    x_t = interpolate(x0, noise, sigma)
    dropped = torch.rand(b, generator=g) < 0.5
    y = torch.where(dropped, torch.tensor(num_classes), labels)
    t = timesteps_from_sigmas(sigma)
    self_cond = None
    if self_conditioning_prob > 0:
        with torch.no_grad():
            aux = model(x_t, t, y).last_hidden_state
        self_cond = aux * (torch.rand(b, generator=g) < self_conditioning_prob).view(-1, 1, 1).float()
    expected = flow_matching_loss(model(x_t, t, y, self_cond=self_cond).sample, x0, noise)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    # What the DiT saw: x_t, 1000 sigma, the null class for the dropped labels (and some of both kinds)
    main = model.calls[1 if self_conditioning_prob > 0 else 0]
    torch.testing.assert_close(main["x"], x_t, rtol=0, atol=0)
    torch.testing.assert_close(main["timestep"], 1000 * sigma)
    assert main["labels"].tolist() == y.tolist() and 0 < int(dropped.sum()) < b
    assert (main["self_cond"] is None) == (self_conditioning_prob == 0)
    if self_conditioning_prob > 0:  # the auxiliary pass saw the same inputs, its output conditioned some samples
        assert torch.equal(model.calls[0]["x"], x_t) and not model.calls[0]["x"].requires_grad
        kept = main["self_cond"].flatten(1).abs().sum(1) > 0
        assert 0 < int(kept.sum()) < b


def test_flow_matching_objective_trains_and_refuses_bad_settings():
    model = LinearVelocity()
    x0 = randn(3, 4, 4, 4, seed=1)
    loss = FlowMatchingLoss(model, 3)(x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert model.conv.weight.grad is not None and torch.isfinite(model.conv.weight.grad).all()
    for kwargs, match in [
        ({"weighting_scheme": "cosine"}, "logit_normal"),
        ({"class_dropout_prob": 1.0}, r"class_dropout_prob must be in \[0, 1\)"),
        ({"self_conditioning_prob": 1.5}, r"self_conditioning_prob in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            FlowMatchingLoss(model, 3, **kwargs)
