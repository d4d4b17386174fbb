"""EDM-style preconditioning: exactness with an oracle network, score consistency, loss."""

import math

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


def test_training_loss_runs_the_objectives_loss_with_its_options(sde):
    """objective "denoiser" is denoiser_loss with the yaml's options (same draws, same numbers; p_T, shuffle
    and pit_above reach it), objective "score" is score_matching_loss on the model's score output."""
    from speechbrain_diffsep.losses import score_matching_loss

    s = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    model = PreconditionedScoreModel(None, sde, sigma_data=0.5)
    model.net = OracleF(s[:, [1, 0]], model)  # returns the sources swapped: perfect under PIT only

    def gen():
        return torch.Generator().manual_seed(2)

    opts = dict(p_T=0.25, shuffle=False)
    loss, info = training_loss(model, sde, s, y, objective="denoiser", pit_above=0.5, generator=gen(), **opts)
    direct, used = denoiser_loss(model, sde, s, y, pit_above=0.5, generator=gen(), **opts)
    assert torch.equal(loss, direct) and torch.equal(info["use_prior"], used)
    no_pit, prior = denoiser_loss(model, sde, s, y, generator=gen(), **opts)
    pit_only = used & ~prior  # t >= 0.5 off the prior branch: the PIT minimum only through pit_above
    assert int(pit_only.sum()) >= 3 and int(prior.sum()) >= 1 and int((~used).sum()) >= 3
    assert float(loss[used].detach().max()) < 1e-18 and float(no_pit[pit_only].detach().min()) > 1.0
    assert float(loss[~used].detach().min()) > 1.0  # the given order, no minimum, below pit_above
    score_loss, info = training_loss(model, sde, s, y, objective="score", generator=gen(), **opts)
    assert torch.equal(score_loss, score_matching_loss(model, sde, s, y, generator=gen(), **opts)[0])
    assert torch.equal(info["use_prior"], prior)
    assert float((score_loss - no_pit)[~prior].detach().abs().min()) > 1e-3  # not the denoiser's numbers
    loss.mean().backward()
    assert torch.isfinite(loss).all() and model.net.w.grad is not None
    with pytest.raises(ValueError, match="PreconditionedScoreModel"):
        training_loss(torch.nn.Conv1d(2, 2, 3), sde, s, y, objective="denoiser")
    with pytest.raises(ValueError, match="unknown objective"):
        training_loss(model, sde, s, y, objective="v")
    with pytest.raises(ValueError, match="output must be"):
        model(s, torch.ones(16) * 0.5, y, output="noise")


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


# ------------------------------------------------------------------ exact denoiser of Gaussian sources
class GaussianOracleF(torch.nn.Module):
    """The network output that makes ``D(x) = E[s | x_t, y]`` for sources ``s_k ~ N(0, c^2)`` iid per sample.

    ``P s = y/K`` is known from the mixture and ``Pbar x_t = a Pbar s + sqrt(lambda_2) Pbar z`` with
    ``Pbar s ~ N(0, c^2 Pbar)``, so ``E[s | x_t, y] = y/K + a c^2 / (a^2 c^2 + lambda_2) Pbar x_t``: linear.
    At ``t = T`` training only sees the prior branch (``x_T`` independent of ``s`` given ``y``): ``E = y/K``.
    ``lambda_2`` and EDM's scalings are written out here (module docstring of precond.py, MATH.md), not taken
    from the code under test; ``forward`` returns F such that ``y/K + c_skip xb + c_out Pbar F`` is that mean.
    """

    def __init__(self, sde, c, sigma_data):
        super().__init__()
        self.sde, self.c, self.sd = sde, float(c), float(sigma_data)
        self.seen_t = None

    def terms(self, t):
        sde = self.sde
        rho = sde.sigma_max / sde.sigma_min
        lam2 = sde.sigma_min**2 * (rho ** (2 * t) - torch.exp(-2 * sde.gamma * t)) / (1 + sde.gamma / math.log(rho))
        a = torch.exp(-sde.gamma * t)
        sigma = lam2.sqrt() / a
        norm = torch.sqrt(sigma**2 + self.sd**2)
        return lam2, a, 1 / norm, self.sd**2 / norm**2, sigma * self.sd / norm  # ..., c_in, c_skip, c_out

    def forward(self, x_in, t, y):
        self.seen_t = t.clone()
        lam2, a, c_in, c_skip, c_out = self.terms(t)
        gain = torch.where(t == self.sde.T, torch.zeros_like(t), a**2 * self.c**2 / (a**2 * self.c**2 + lam2))
        return ((gain - c_skip) / (c_in * c_out))[:, None, None] * x_in

    def expected_loss(self, s, t, prior):
        """Per example ``E_z[|Pbar (D - s)|^2 / c_out^2 | s, t]`` off the prior branch; exactly
        ``|Pbar s|^2 / c_out(T)^2`` on it (``D = y/K``, every source order alike).

        Off it ``Pbar (D - s) = -(lambda_2 / v) Pbar s + (a c^2 sqrt(lambda_2) / v) Pbar z``, ``v = a^2 c^2 + lambda_2``.
        """
        lam2, a, _, _, c_out = self.terms(t)
        K, c = self.sde.num_sources, self.c
        S = (s - s.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2))
        v = a**2 * c**2 + lam2
        off = ((lam2 / v) ** 2 * S + a**2 * c**4 * lam2 * (K - 1) / K / v**2) / c_out**2
        return torch.where(prior, S / c_out**2, off)


def gaussian_denoiser_loss(sde, K, c=0.35, sigma_data=0.5, **kw):
    s = c * torch.randn(32, K, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    net = GaussianOracleF(sde, c, sigma_data)
    model = PreconditionedScoreModel(net, sde, sigma_data=sigma_data)
    loss, used = denoiser_loss(model, sde, s, y, p_T=0.25, generator=torch.Generator().manual_seed(1), **kw)
    prior = net.seen_t == sde.T
    return loss, prior, net.expected_loss(s, net.seen_t, prior)


@pytest.mark.parametrize("K", [2, 3])
def test_exact_denoiser_of_gaussian_sources_reaches_the_closed_form_minimum(K):
    """The posterior mean E[s | x_t, y] (linear for Gaussian sources, sigma_data != c so F != 0) gets the
    irreducible loss: exactly on the prior branch, within 25 % per example (Monte-Carlo std about 4.5 % at
    n = 1000; the worst of 20 seeds: 14 %) and 2 % on average elsewhere."""
    sde = MixingSDE(num_sources=K)
    loss, prior, expected = gaussian_denoiser_loss(sde, K)
    assert 0 < int(prior.sum()) < len(prior)
    assert torch.allclose(loss[prior], expected[prior], rtol=1e-9, atol=0)
    ratio = loss[~prior] / expected[~prior]
    assert float((ratio - 1).abs().max()) < 0.25, ratio
    assert abs(float(ratio.mean()) - 1) < 0.02


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("bug", ["source order", "time"])
def test_input_built_from_other_sources_or_time_than_the_target_is_caught(K, bug, monkeypatch):
    """The network input x_t built from the sources in another order than the target (e.g. before the
    shuffle), or at another t than the network and the weighting are told, moves the exact denoiser's
    loss off its closed form: more than a third of the examples leave the 25 % band that the exact pairing
    keeps (source order: the median loss doubles at least; time: examples move both ways)."""
    sde = MixingSDE(num_sources=K)
    marginal = sde.sample_marginal

    def wrong(s, t, generator=None, z=None, y=None):
        if bug == "source order":
            return marginal(s.flip(1), t, z=z, y=y)
        return marginal(s, 0.5 * t, z=z, y=y)

    monkeypatch.setattr(sde, "sample_marginal", wrong)
    loss, prior, expected = gaussian_denoiser_loss(sde, K, shuffle=bug == "time")
    ratio = loss[~prior] / expected[~prior]
    assert float(((ratio - 1).abs() > 0.25).double().mean()) > 1 / 3, ratio
    if bug == "source order":
        assert float(ratio.median()) > 2.0, ratio


# ------------------------------------------------------------------ denoiser_loss: its draws, wrappers, pit_above
class Recording(PreconditionedScoreModel):
    """Records what training feeds the model (x, t) and answers with a fixed network output."""

    def forward(self, x, t, y, output="score"):
        self.seen = dict(x=x, t=t, output=output)
        return super().forward(x, t, y, output=output)


class FixedF(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x_in, t, y):
        return self.f


def _batch(B=64, K=2, n=6, seed=51):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, n, generator=g, dtype=torch.float64)
    return s, s.sum(1, keepdim=True), torch.randn(B, K, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(shuffle=False), dict(t_sampling="power"), dict(t_sampling="power", t_power=3.0), dict(t_max=0.4),
     dict(mismatch_p=0.5), dict(mismatch_p=0.5, mismatch_above=0.8), dict(p_T=0.3, pit_above=0.6)],
    ids=["defaults", "no-shuffle", "power-default", "power-3", "t_max", "mismatch", "mismatch-above", "pit"],
)
def test_denoiser_loss_draws_what_draw_training_inputs_draws(sde, kw):
    """Same seed, same options: the model sees draw_training_inputs's (x, t) (defaults included: p_T 0.1,
    shuffle on, power 1, mismatch_above 0.5) and the loss is ``mean(|Pbar (D - s_pi)|^2) / c_out(t)^2``, in the
    given order or, on the prior branch and at t >= pit_above, the best order."""
    from speechbrain_diffsep.losses import draw_training_inputs

    s, y, f = _batch()
    model = Recording(FixedF(f), sde, sigma_data=0.5)
    loss, used = denoiser_loss(model, sde, s, y, generator=torch.Generator().manual_seed(52), **kw)
    pit_above = kw.pop("pit_above", None)
    s2, t, z, x, prior = draw_training_inputs(sde, s, y, generator=torch.Generator().manual_seed(52), **kw)
    assert torch.equal(model.seen["x"], x) and torch.equal(model.seen["t"], t) and model.seen["output"] == "denoised"
    expected_used = prior if pit_above is None else prior | (t >= pit_above)
    assert torch.equal(used, expected_used)
    d = model.denoise(x, t, y)
    _, _, c_out, _ = model.scalings(t)
    per = torch.stack([((d - s2[:, p]) - (d - s2[:, p]).mean(1, keepdim=True)).div(c_out).pow(2).mean(dim=(1, 2))
                       for p in ([0, 1], [1, 0])], 1)
    assert torch.allclose(loss, torch.where(used, per.min(1).values, per[:, 0]), rtol=1e-12, atol=0)
    if pit_above is not None:
        assert bool((used & ~prior).any()) and bool((per[used, 1] < per[used, 0]).any())


def test_denoiser_loss_reaches_the_model_inside_a_ddp_wrapper(sde):
    """A DistributedDataParallel-like wrapper (the model under ``.module``, no ``scalings`` of its own): the loss
    calls the wrapper and weights by the inner model's c_out, the same numbers as without the wrapper."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    s, y, f = _batch(B=8)
    model = PreconditionedScoreModel(FixedF(f), sde, sigma_data=0.5)
    wrapped = Wrapper(model)
    loss, used = denoiser_loss(wrapped, sde, s, y, p_T=0.25, generator=torch.Generator().manual_seed(53))
    direct, used2 = denoiser_loss(model, sde, s, y, p_T=0.25, generator=torch.Generator().manual_seed(53))
    assert wrapped.calls == 1 and torch.equal(loss, direct) and torch.equal(used, used2)


def test_pit_above_includes_its_own_time(sde):
    """``pit_above=t0`` takes the permutation minimum for every example with ``t >= t0``: t0 set to a drawn t."""
    from speechbrain_diffsep.losses import draw_training_inputs

    s, y, f = _batch(B=16)
    _, t, _, _, prior = draw_training_inputs(sde, s, y, p_T=0.0, generator=torch.Generator().manual_seed(54))
    t0 = float(t[5])
    model = PreconditionedScoreModel(FixedF(f), sde, sigma_data=0.5)
    _, used = denoiser_loss(model, sde, s, y, p_T=0.0, pit_above=t0, generator=torch.Generator().manual_seed(54))
    assert bool(used[5]) and torch.equal(used, t >= t0) and 0 < int(used.sum()) < 16


# ------------------------------------------------------------------ restart-aware training (restart_p)
class LinearF(torch.nn.Module):
    """A network with a weight whose output depends on its input (so a gradient could reach it)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x_in, t, y):
        return self.w * x_in + 0.1 * t.view(-1, 1, 1)


def test_restart_states_closed_form(sde):
    """``x = mu_{t_r}(D(x_T, T)) + L_{t_r} z`` with ``x_T = y/K + L_T z'`` and the draws z', t_r, z in that
    order from the generator; ``t_r`` uniform in the range; no gradient flows into the model."""
    from speechbrain_diffsep.precond import restart_states

    s, y, _ = _batch(B=400, n=5)
    model = PreconditionedScoreModel(LinearF(), sde, sigma_data=0.5)
    t = torch.full((400,), 0.5, dtype=torch.float64)
    x, t_r, est = restart_states(model, sde, y, t, torch.Generator().manual_seed(61), (0.2, 0.4))
    g = torch.Generator().manual_seed(61)
    z_prior = torch.randn(s.shape, generator=g, dtype=torch.float64)
    u = torch.rand(400, generator=g, dtype=torch.float64)
    z = torch.randn(s.shape, generator=g, dtype=torch.float64)
    tT = torch.full((400,), sde.T, dtype=torch.float64)
    # the prior draw and the denoiser written out: y/K + L_T z' and y/K + c_skip Pbar x/a + c_out Pbar F(c_in Pbar x/a)
    x_T = y / 2 + sde.mult_std(z_prior, tT)
    a, c_skip, c_out, c_in = model.scalings(tT)
    xb = (x_T - x_T.mean(1, keepdim=True)) / a
    f = 0.3 * c_in * xb + 0.1
    expected_est = y / 2 + c_skip * xb + c_out * (f - f.mean(1, keepdim=True))
    assert torch.allclose(est, expected_est, rtol=0, atol=1e-12)
    assert torch.equal(t_r, 0.2 + 0.2 * u) and 0.2 <= float(t_r.min()) and float(t_r.max()) <= 0.4
    assert float(t_r.std()) == pytest.approx(0.2 / math.sqrt(12), rel=0.1)
    assert torch.allclose(x, sde.mean(expected_est, t_r) + sde.mult_std(z, t_r), rtol=0, atol=1e-12)
    assert not x.requires_grad and not est.requires_grad


@pytest.mark.parametrize("restart_p", [0.5, 1.0])
def test_denoiser_loss_trains_restart_states_with_the_permutation_min(sde, restart_p):
    """``restart_p``: after the usual draws, a mask (``rand < restart_p``, never on the prior branch) picks the
    examples that get :func:`restart_states` (drawn next from the same generator); the model sees those (x, t),
    and their loss is the permutation minimum."""
    from speechbrain_diffsep.losses import draw_training_inputs
    from speechbrain_diffsep.precond import restart_states

    s, y, f = _batch()
    model = Recording(FixedF(f), sde, sigma_data=0.5)
    loss, used = denoiser_loss(model, sde, s, y, p_T=0.2, restart_p=restart_p, restart_range=(0.3, 0.5),
                               generator=torch.Generator().manual_seed(62))
    seen = model.seen
    g = torch.Generator().manual_seed(62)
    s2, t, z, x, prior = draw_training_inputs(sde, s, y, p_T=0.2, generator=g)
    mask = (torch.rand(64, generator=g) < restart_p) & ~prior
    x_r, t_r, _ = restart_states(model, sde, y, t, g, (0.3, 0.5))
    assert 0 < int(prior.sum()) and int(mask.sum()) > 10 and not bool((mask & prior).any())
    if restart_p == 1.0:
        assert torch.equal(mask, ~prior)
    x_exp = torch.where(mask[:, None, None], x_r, x)
    t_exp = torch.where(mask, t_r, t)
    assert torch.equal(seen["x"], x_exp) and torch.equal(seen["t"], t_exp) and seen["output"] == "denoised"
    assert torch.equal(used, prior | mask)
    d = model.denoise(x_exp, t_exp, y)
    c_out = model.scalings(t_exp)[2]
    per = torch.stack([((d - s2[:, p]) - (d - s2[:, p]).mean(1, keepdim=True)).div(c_out).pow(2).mean(dim=(1, 2))
                       for p in ([0, 1], [1, 0])], 1)
    assert torch.allclose(loss, torch.where(used, per.min(1).values, per[:, 0]), rtol=1e-12, atol=0)


def test_restart_training_with_an_oracle_reaches_zero_and_its_gradient_skips_the_first_call(sde):
    """An oracle network (D = s exactly) has zero loss on restart states whatever order its first estimate took;
    the gradient reaches the network only through the second call (the first is under no_grad)."""
    s, y, _ = _batch(B=16)
    model = PreconditionedScoreModel(None, sde, sigma_data=0.5)
    model.net = OracleF(s, model)
    loss, used = denoiser_loss(model, sde, s, y, p_T=0.0, restart_p=1.0, generator=torch.Generator().manual_seed(63))
    assert bool(used.all()) and float(loss.detach().abs().max()) < 1e-20
    calls = []
    model.net.register_forward_hook(lambda m, inp, out: calls.append(torch.is_grad_enabled()))
    loss, _ = denoiser_loss(model, sde, s, y, p_T=0.0, restart_p=1.0, generator=torch.Generator().manual_seed(63))
    assert calls == [False, True]


@pytest.mark.parametrize(
    "kw, message",
    [(dict(restart_p=1.5), r"^restart_p must be a probability in \[0, 1\], got 1.5$"),
     (dict(restart_p=-0.1), r"^restart_p must be a probability"),
     (dict(restart_p=0.5, restart_range=(0.5, 0.2)), r"^restart_range must be \[lo, hi\] with t_eps=0.03 < lo <= hi < T=1"),
     (dict(restart_p=0.5, restart_range=(0.01, 0.2)), r"^restart_range must be"),
     (dict(restart_p=0.5, restart_range=(0.2, 1.0)), r"^restart_range must be")],
    ids=["p-above-1", "p-negative", "range-reversed", "range-below-t_eps", "range-at-T"],
)
def test_restart_options_are_checked(sde, kw, message):
    s, y, f = _batch(B=4)
    model = PreconditionedScoreModel(FixedF(f[:4]), sde, sigma_data=0.5)
    with pytest.raises(ValueError, match=message):
        denoiser_loss(model, sde, s, y, generator=torch.Generator().manual_seed(0), **kw)


def test_restart_p_is_rejected_by_the_score_objective(sde):
    s, y, f = _batch(B=4)
    with pytest.raises(ValueError, match=r"^restart_p needs objective 'denoiser'"):
        training_loss(lambda x, t, yy: torch.zeros_like(x), sde, s, y, objective="score", restart_p=0.3)
    # zero (the yamls' default) passes, with its range, to the score objective
    loss, _ = training_loss(lambda x, t, yy: torch.zeros_like(x), sde, s, y, objective="score", restart_p=0.0,
                            restart_range=[0.15, 0.6])
    assert loss.shape == (4,)


# ------------------------------------------------------------------ the wrapper's SDE, defaults and dtypes
def test_model_copies_the_given_sde_and_defaults_to_the_papers():
    """The scalings follow the given SDE (all six parameters copied, into a new object); without one the paper's
    MixingSDE() and sigma_data = 0.5."""
    custom = dict(num_sources=3, gamma=1.5, sigma_min=0.04, sigma_max=0.6, t_eps=0.02, T=0.9)
    sde = MixingSDE(**custom)
    model = PreconditionedScoreModel(torch.nn.Identity(), sde, sigma_data=0.3)
    assert model.sde is not sde and model.sde_kwargs == custom
    assert {k: getattr(model.sde, k) for k in custom} == custom
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    lam2 = GaussianOracleF(sde, 1.0, 0.3).terms(t)[0]
    a, c_skip, c_out, c_in = [v.flatten() for v in model.scalings(t)]
    sigma = lam2.sqrt() / torch.exp(-1.5 * t)
    assert torch.allclose(a, torch.exp(-1.5 * t), rtol=1e-14)
    assert torch.allclose(c_skip, 0.09 / (sigma**2 + 0.09), rtol=1e-12)
    assert torch.allclose(c_out, 0.3 * sigma / (sigma**2 + 0.09).sqrt(), rtol=1e-12)
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.09).sqrt(), rtol=1e-12)
    default = PreconditionedScoreModel(torch.nn.Identity())
    assert default.sigma_data == 0.5
    assert default.sde_kwargs == dict(num_sources=2, gamma=2.0, sigma_min=0.05, sigma_max=0.5, t_eps=0.03, T=1.0)
    paper = PreconditionedScoreModel(torch.nn.Identity(), MixingSDE(), sigma_data=0.5)
    assert all(torch.equal(u, v) for u, v in zip(default.scalings(t), paper.scalings(t)))


class RecordingF(torch.nn.Module):
    """Records its inputs; answers with a fixed output in a chosen dtype (a network run in lower precision)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x_in, t, y):
        self.seen = (x_in, t, y)
        return self.f


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_denoise_formula_with_low_precision_times_and_network(sde, out_dtype):
    """``D = y/K + c_skip Pbar x / a + c_out Pbar F(c_in Pbar x / a, t, y)``, evaluated in x's dtype: a float32 t is
    read in float64 (its exact value) before the scalings, and a network answering in float32 or bfloat16 has its
    output cast to x's dtype before the projection. The network gets t in x's dtype and the mixture itself."""
    s, y, f = _batch(B=3, n=16)
    x = s + 0.3 * f
    f_low = f.to(out_dtype)
    net = RecordingF(f_low)
    model = PreconditionedScoreModel(net, sde, sigma_data=0.5)
    t32 = torch.tensor([0.1, 0.45, 0.9], dtype=torch.float32)
    t = t32.double()
    lam2 = GaussianOracleF(sde, 1.0, 0.5).terms(t)[0]
    a = torch.exp(-2.0 * t)
    sigma = lam2.sqrt() / a
    norm = (sigma**2 + 0.25).sqrt()
    c_skip, c_out, c_in = 0.25 / norm**2, 0.5 * sigma / norm, 1 / norm
    col = lambda v: v[:, None, None]  # noqa: E731
    xb = (x - x.mean(1, keepdim=True)) / col(a)
    fd = f_low.double()
    expected = y / 2 + col(c_skip) * xb + col(c_out) * (fd - fd.mean(1, keepdim=True))
    d = model.denoise(x, t32, y)
    assert d.dtype == torch.float64
    assert torch.allclose(d, expected, rtol=1e-12, atol=1e-12)
    x_in, t_seen, y_seen = net.seen
    assert t_seen.dtype == torch.float64 and torch.equal(t_seen, t) and y_seen is y
    assert torch.allclose(x_in, col(c_in) * xb, rtol=1e-12, atol=1e-14)
    # the score from it, -Sigma_t^{-1}(x - mu_t(D)), with the same exact t
    lam1 = sde.sigma_min**2 * ((sde.sigma_max / sde.sigma_min) ** (2 * t) - 1)  # MATH.md
    r = x - (expected.mean(1, keepdim=True) + col(a) * (expected - expected.mean(1, keepdim=True)))
    score = -(r.mean(1, keepdim=True) / col(lam1) + (r - r.mean(1, keepdim=True)) / col(lam2))
    assert torch.allclose(model(x, t32, y), score, rtol=1e-10, atol=1e-10)
