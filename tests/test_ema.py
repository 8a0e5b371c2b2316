"""EMA with a half-life in optimizer steps (paper Appendix B), checked against closed forms."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusability_hf.training.ema import EMA, ema_beta


@pytest.mark.parametrize("half_life", [1.0, 10.0, 500.0, 5000.0])
def test_ema_beta_half_life_meaning(half_life):
    beta = ema_beta(1, half_life)
    assert 0.0 < beta < 1.0
    assert beta**half_life == pytest.approx(0.5, rel=1e-9)  # a unit impulse halves after h steps
    assert beta ** (2 * half_life) == pytest.approx(0.25, rel=1e-9)
    # without a ramp, beta does not depend on the step
    assert ema_beta(1, half_life) == ema_beta(10**6, half_life)


def test_ema_beta_simulated_impulse_decays_to_half():
    h = 37
    weight = 1.0
    for step in range(1, h + 1):
        weight *= ema_beta(step, h)
    assert weight == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("step", [1, 7, 100, 1000, 99_999, 100_000, 100_001, 10**7])
def test_ema_beta_ramp(step):
    half_life, ratio = 5000.0, 0.05
    h_eff = min(half_life, ratio * step)
    beta = ema_beta(step, half_life, ramp_ratio=ratio)
    assert beta == pytest.approx(math.exp(math.log(0.5) / h_eff), rel=1e-12)
    assert beta**h_eff == pytest.approx(0.5, rel=1e-9)


def test_ema_beta_ramp_is_non_decreasing_and_saturates():
    betas = [ema_beta(s, 5000.0, 0.05) for s in range(1, 200_001, 997)]
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:]))
    assert ema_beta(100_000, 5000.0, 0.05) == ema_beta(1, 5000.0)  # ramp reaches the half-life at step h / ratio
    assert ema_beta(50_000, 5000.0, 0.05) < ema_beta(1, 5000.0)


def test_ema_beta_degenerate_cases():
    assert ema_beta(10, 0.0) == 0.0
    assert ema_beta(10, -5.0) == 0.0
    assert ema_beta(0, 5000.0, ramp_ratio=0.05) == 0.0  # effective half-life 0: follow the weights
    assert ema_beta(-3, 5000.0, ramp_ratio=0.05) == 0.0


def make_param(value, shape=(3,), dtype=torch.float32):
    return nn.Parameter(torch.full(shape, float(value), dtype=dtype))


def test_ema_jump_to_constant_target_matches_closed_form():
    """Parameter jumps from p0 to a constant T: shadow_n = T + (p0 - T) * beta ** n."""
    p0, target, h = 2.0, -1.0, 20.0
    p = make_param(p0)
    ema = EMA([p], half_life=h)
    with torch.no_grad():
        p.fill_(target)
    beta = 0.5 ** (1 / h)
    for n in range(1, 61):
        used = ema.update([p])
        assert used == pytest.approx(beta, rel=1e-12)
        expected = target + (p0 - target) * beta**n
        np.testing.assert_allclose(ema.shadow[0].numpy(), np.full(3, expected), rtol=1e-5)
    assert ema.num_updates == 60
    # after exactly one half-life (20 updates) the shadow would be halfway; after three, 1/8 of the gap remains
    np.testing.assert_allclose(ema.shadow[0].numpy(), target + (p0 - target) / 8, rtol=1e-5)


def test_ema_of_geometrically_converging_parameter_matches_closed_form():
    """p_k = T + (p0 - T) r^k (gradient descent on a quadratic); e_n = beta e_{n-1} + (1 - beta) p_n, e_0 = p0 gives
    e_n - T = (p0 - T) [beta^n + (1 - beta) r (beta^n - r^n) / (beta - r)]."""
    p0, target, r, h = 1.5, 0.25, 0.9, 10.0
    beta = 0.5 ** (1 / h)
    p = make_param(p0, shape=(2, 2))
    ema = EMA([p], half_life=h)
    for n in range(1, 41):
        with torch.no_grad():
            p.fill_(target + (p0 - target) * r**n)
        ema.update([p])
        expected = target + (p0 - target) * (beta**n + (1 - beta) * r * (beta**n - r**n) / (beta - r))
        np.testing.assert_allclose(ema.shadow[0].numpy(), np.full((2, 2), expected), rtol=1e-5)


def test_ema_with_ramp_matches_product_of_betas():
    p0, target, h, ratio = 1.0, 0.0, 8.0, 0.5
    p = make_param(p0)
    ema = EMA([p], half_life=h, ramp_ratio=ratio)
    with torch.no_grad():
        p.fill_(target)
    remaining = 1.0
    for n in range(1, 31):
        h_eff = min(h, ratio * n)
        beta = 0.5 ** (1 / h_eff)
        remaining *= beta
        assert ema.update([p]) == pytest.approx(beta, rel=1e-12)
        np.testing.assert_allclose(ema.shadow[0].numpy(), np.full(3, remaining), rtol=1e-5, atol=1e-12)


def test_ema_explicit_step_overrides_update_count():
    p = make_param(0.0)
    ema = EMA([p], half_life=100.0, ramp_ratio=0.05)
    assert ema.update([p], step=40) == pytest.approx(0.5 ** (1 / 2.0))  # h_eff = 0.05 * 40 = 2
    assert ema.update([p]) == pytest.approx(0.5 ** (1 / 0.1))  # num_updates = 2 -> h_eff = 0.1
    assert ema.num_updates == 2


def test_ema_shadow_is_float32_and_copy_to_writes_back():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    ema = EMA(model.parameters(), half_life=1.0)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    original = [p.detach().float().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema.update(model.parameters())  # beta = 0.5: halfway to zero
    for s, o in zip(ema.shadow, original):
        torch.testing.assert_close(s, 0.5 * o)
    ema.copy_to(model.parameters())
    for p, o in zip(model.parameters(), original):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), (0.5 * o).bfloat16().float())


def test_ema_shadow_is_a_copy_of_the_initial_weights():
    p = make_param(1.0)
    ema = EMA([p], half_life=10.0)
    with torch.no_grad():
        p.fill_(5.0)
    torch.testing.assert_close(ema.shadow[0], torch.ones(3))


def test_ema_parameter_count_mismatch_raises():
    ema = EMA([make_param(0.0), make_param(1.0)], half_life=10.0)
    with pytest.raises(ValueError):
        ema.update([make_param(0.0)])


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = EMA(model.parameters(), half_life=7.0, ramp_ratio=0.25)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model.parameters())

    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    other_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    restored = EMA(other_model.parameters(), half_life=1.0, ramp_ratio=None)
    restored.load_state_dict(state)
    assert restored.half_life == 7.0 and restored.ramp_ratio == 0.25 and restored.num_updates == 5
    for a, b in zip(ema.shadow, restored.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.data_ptr() != b.data_ptr()

    # both continue identically
    assert ema.update(model.parameters()) == restored.update(model.parameters())
    for a, b in zip(ema.shadow, restored.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ema_state_dict_is_a_snapshot():
    p = make_param(1.0)
    ema = EMA([p], half_life=1.0)
    state = ema.state_dict()
    with torch.no_grad():
        p.fill_(0.0)
    ema.update([p])
    torch.testing.assert_close(state["shadow"][0], torch.ones(3))
    assert state["num_updates"] == 0


def test_ema_load_state_dict_mismatch_raises():
    ema = EMA([make_param(0.0)], half_life=1.0)
    other = EMA([make_param(0.0), make_param(0.0)], half_life=1.0)
    with pytest.raises(ValueError):
        ema.load_state_dict(other.state_dict())


def test_swapped_in_holds_the_ema_weights_inside_and_restores_the_training_weights_exactly():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net.parameters(), half_life=1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net.parameters(), step=1)
    training = [p.detach().clone() for p in net.parameters()]
    with ema.swapped_in(net.parameters()):
        for p, s in zip(net.parameters(), ema.shadow):
            assert torch.equal(p, s) and not torch.equal(s, training[0] if p.ndim == 2 else training[1])
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), training))
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_in(net.parameters()):
            raise RuntimeError("inside")
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), training))  # restored on an exception too
