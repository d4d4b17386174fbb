"""EDM-style preconditioning: exactness with an oracle network, score consistency, loss."""

import pytest
import torch

from speechbrain_diffsep.objectives import training_loss
from speechbrain_diffsep.precond import PreconditionedScoreModel, denoiser_loss
from speechbrain_diffsep.sde import MixingSDE


class OracleF(torch.nn.Module):
    """The network output that makes D(x) equal the given sources exactly."""

    def __init__(self, s, owner):
        super().__init__()
        self.s, self.owner = s, owner
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_in, t, y):
        a, c_skip, c_out, c_in = self.owner.scalings(t)
        xb = x_in / c_in
        sb = self.s - self.s.mean(1, keepdim=True)
        return (sb - c_skip * xb) / c_out + self.w


@pytest.fixture
def sde():
    return MixingSDE(num_sources=2)


def test_oracle_network_gives_true_score(sde):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, 30, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    model = PreconditionedScoreModel(None, sde, sigma_data=0.5)
    model.net = OracleF(s, model)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    x, z = sde.sample_marginal(s, t, generator=g)
    assert torch.allclose(model.denoise(x, t, y), s, atol=1e-10)
    assert torch.allclose(model(x, t, y), sde.true_score(x, s, t), rtol=1e-8, atol=1e-8)
    loss, _ = denoiser_loss(model, sde, s, y, p_T=0.0, generator=g, shuffle=False)
    assert float(loss.detach().max()) < 1e-18


def test_scalings_follow_edm(sde):
    model = PreconditionedScoreModel(torch.nn.Identity(), sde, sigma_data=0.5)
    t = torch.tensor([0.03, 0.5, 1.0], dtype=torch.float64)
    a, c_skip, c_out, c_in = [v.flatten() for v in model.scalings(t)]
    _, lam2 = sde.eigenvalues(t)
    sigma = lam2.sqrt() / torch.exp(-2.0 * t)
    assert torch.allclose(c_skip + (c_out / 0.5) ** 2, torch.ones(3, dtype=torch.float64))  # EDM identity
    assert torch.allclose(c_in, 1 / torch.sqrt(sigma**2 + 0.25))
    assert c_skip[0] > 0.99 and c_skip[-1] < 0.05  # near t_eps keep x, at T predict from y


def test_zero_network_is_unit_loss_scale(sde):
    """With F = 0 the loss is c_skip-weighted and O(1) at every t (EDM's unit-variance target)."""

    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    model = PreconditionedScoreModel(Zero(), sde, sigma_data=0.5)
    g = torch.Generator().manual_seed(1)
    s = 0.5 * torch.randn(64, 2, 200, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    loss, _ = denoiser_loss(model, sde, s, y, p_T=0.0, generator=g)
    assert 0.3 < float(loss.mean()) < 2.0


def test_training_loss_dispatch_and_gradients(sde):
    net = torch.nn.Conv1d(2, 2, 3, padding=1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = net

        def forward(self, x, t, y):
            return self.conv(x)

    model = PreconditionedScoreModel(Net(), sde)
    s = torch.randn(4, 2, 32)
    y = s.sum(1, keepdim=True)
    loss, info = training_loss(model, sde, s, y, objective="denoiser", p_T=0.5, generator=torch.Generator().manual_seed(2))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and net.weight.grad is not None
    with pytest.raises(ValueError, match="PreconditionedScoreModel"):
        training_loss(net, sde, s, y, objective="denoiser")
    with pytest.raises(ValueError, match="unknown objective"):
        training_loss(model, sde, s, y, objective="v")
    with pytest.raises(ValueError, match="output must be"):
        model(s, torch.ones(4) * 0.5, y, output="noise")


def test_pit_above_takes_the_better_order_only_at_high_t(sde):
    """A denoiser that returns the sources swapped is perfect under PIT, penalized otherwise."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(64, 2, 40, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    model = PreconditionedScoreModel(None, sde, sigma_data=0.5)
    model.net = OracleF(s[:, [1, 0]], model)
    loss, used = denoiser_loss(model, sde, s, y, p_T=0.0, generator=torch.Generator().manual_seed(6), shuffle=False, pit_above=0.5)
    assert used.any() and (~used).any()
    assert float(loss[used].detach().max()) < 1e-18
    assert float(loss[~used].detach().min()) > 1.0


def test_mismatch_aware_training_builds_the_samplers_states(sde):
    """mismatch_p = 1: every example (off the prior branch) is the closed-form carried state at a
    t in [mismatch_above, T]; mismatch_p = 0 leaves the true marginals (same draws otherwise)."""
    from speechbrain_diffsep.losses import draw_training_inputs, mismatch_state

    g = torch.Generator().manual_seed(5)
    s = torch.randn(64, 2, 30, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    s2, t, z, x, use_prior = draw_training_inputs(
        sde, s, y, p_T=0.25, generator=torch.Generator().manual_seed(1), mismatch_p=1.0, mismatch_above=0.6
    )
    mm = ~use_prior
    assert 0 < int(mm.sum()) < 64
    assert bool((t[mm] >= 0.6).all()) and bool((t[mm] <= sde.T).all())
    assert torch.allclose(x[mm], mismatch_state(sde, s2[mm], t[mm], z[mm], y=y[mm]), atol=1e-12)
    assert torch.allclose(x[use_prior], sde.prior_sample(y[use_prior], z=z[use_prior]), atol=1e-12)
    # the carried states are not the true marginals
    true_x, _ = sde.sample_marginal(s2[mm], t[mm], z=z[mm])
    assert float((x[mm] - true_x).abs().max()) > 1e-3
    _, t0, z0, x0, _ = draw_training_inputs(sde, s, y, p_T=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x0[mm], sde.sample_marginal(s2[mm], t0[mm], z=z0[mm])[0], atol=1e-12)
    with pytest.raises(ValueError, match="mismatch_p must be a probability"):
        draw_training_inputs(sde, s, y, mismatch_p=1.5)
    with pytest.raises(ValueError, match="mismatch_above must lie"):
        draw_training_inputs(sde, s, y, mismatch_p=0.5, mismatch_above=1.0)
    with pytest.raises(ValueError, match="mismatch_p needs objective 'denoiser'"):
        training_loss(lambda x, t, y: torch.zeros_like(x), sde, s, y, objective="score", mismatch_p=0.5)
