"""MixingSDE against the closed forms, the authors' code (json) and simulation."""
import math

import pytest
import torch

from conftest import t64
from speechbrain_diffsep.sde import MixingSDE, PriorMixingSDE

TIMES = ["0.03", "0.25", "0.5", "1.0"]


@pytest.fixture
def sde():
    return MixingSDE(num_sources=2, gamma=2.0, sigma_min=0.05, sigma_max=0.5, t_eps=0.03)


def close(a, b, rtol=1e-10, atol=1e-12):
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a.double(), b, rtol=rtol, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("tkey", TIMES)
def test_marginals_match_reference(sde, ref_values, tkey):
    ref = ref_values["marginals_and_sde"][tkey]
    x0 = t64(ref_values["inputs"]["x0 (sources, shape (1,2,8))"])
    z = t64(ref_values["inputs"]["z (shape (1,2,8))"])
    t = t64([ref["t"]])
    lam1, lam2 = sde.eigenvalues(t)
    close(lam1, [ref["lambda1 (ev1)"]])
    close(lam2, [ref["lambda2 (ev2)"]])
    close(sde.mean(x0, t), ref["mean_mu_t (MixSDE.marginal_prob[0])"])
    close(sde.diffusion(t), [ref["diffusion g(t) (MixSDE.sde[1])"]])
    close(sde.drift(x0, t), ref["drift f(x0,t) (MixSDE.sde[0])"])
    x_t, z_out = sde.sample_marginal(x0, t, z=z)
    assert z_out is z
    close(x_t, ref["x_t = mu_t + L_t z"])
    close(sde.drift(x_t, t), ref["drift f(x_t,t) (MixSDE.sde[0])"])
    close(sde.true_score(x_t, x0, t), ref["true_score -L^{-1} z (MixSDE.mult_std_inv)"], rtol=1e-9)
    close(-sde.mult_std_inv(z, t), ref["true_score -L^{-1} z (MixSDE.mult_std_inv)"])
    # L_t and Sigma_t as matrices: apply to the unit vectors
    eye = torch.eye(2, dtype=torch.float64)[None].transpose(1, 2)  # columns as (1, K=2, n=2)
    close(sde.mult_std(eye, t).transpose(1, 2), ref["L_t (MixSDE.marginal_prob[1], shape (1,2,2))"])
    close(sde.mult_cov(eye, t).transpose(1, 2), ref["Sigma_t = L@L"])


def test_prior_matches_reference(sde, ref_values):
    ref = ref_values["prior_t_equals_T"]
    x0 = t64(ref_values["inputs"]["x0 (sources, shape (1,2,8))"])
    y = t64(ref_values["inputs"]["y (mixture = x0.sum(dim=1, keepdim=True), shape (1,1,8))"])
    z = t64(ref_values["inputs"]["z (shape (1,2,8))"])
    close(sde.prior_mean(y), ref["prior_mean (0.5*y broadcast)"])
    close(sde.prior_sample(y, z=z), ref["x_T = 0.5*y + L_T z (prior_sampling with noise z)"])
    tT = t64([1.0])
    close(sde.prior_mean(y) - sde.mean(x0, tT), ref["model mismatch y/K - mu_T = -exp(-gamma*T)*Pbar@x0"])
    close(
        sde.mult_std_inv(sde.prior_mean(y) - sde.mean(x0, tT), tT),
        ref["mismatch_noise_in_z_units L_T^{-1}(y/K - mu_T) (pl_model.compute_score_loss_init_hack_pit z-correction)"],
        rtol=1e-9,
    )


@pytest.mark.parametrize("K", [2, 3, 4])
def test_std_inverse_and_cov_consistency(K):
    sde = MixingSDE(num_sources=K)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, K, 17, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(sde.mult_std_inv(sde.mult_std(x, t), t), x, atol=1e-10)
    assert torch.allclose(sde.mult_std(sde.mult_std(x, t), t), sde.mult_cov(x, t), atol=1e-12)
    assert torch.allclose(sde.mult_cov_inv(sde.mult_cov(x, t), t), x, atol=1e-9)


@pytest.mark.parametrize("K", [2, 3])
def test_closed_form_matches_euler_maruyama(K):
    """Simulate dx = -gamma Pbar x dt + g dw from fixed sources; compare mean and covariance."""
    sde = MixingSDE(num_sources=K)
    g = torch.Generator().manual_seed(1)
    n_paths, n_steps, t_end = 20000, 400, 0.7
    s = torch.tensor([1.0, -0.5, 0.3, 0.8][:K], dtype=torch.float64)
    x = s.repeat(n_paths, 1)[:, :, None]  # (paths, K, 1)
    dt = t_end / n_steps
    for i in range(n_steps):
        t = torch.tensor([i * dt], dtype=torch.float64)
        x = x + sde.drift(x) * dt + float(sde.diffusion(t)) * math.sqrt(dt) * torch.randn(
            x.shape, generator=g, dtype=torch.float64
        )
    tt = torch.tensor([t_end], dtype=torch.float64)
    mu = sde.mean(s[None, :, None], tt)[0, :, 0]
    emp_mu = x[:, :, 0].mean(0)
    lam1, lam2 = sde.eigenvalues(tt)
    P = torch.full((K, K), 1.0 / K, dtype=torch.float64)
    cov = float(lam1) * P + float(lam2) * (torch.eye(K, dtype=torch.float64) - P)
    emp_cov = torch.cov(x[:, :, 0].T)
    # statistical tolerance: 5 standard errors of the mean; covariance entries within 5%
    # (Euler bias at 400 steps is < 1%)
    se = cov.diagonal().sqrt() / math.sqrt(n_paths)
    assert ((emp_mu - mu).abs() < 5 * se).all(), (emp_mu, mu)
    assert torch.allclose(emp_cov, cov, atol=0.05 * float(cov.abs().max())), (emp_cov, cov)


def test_posterior_score_gradient_of_log_density(sde):
    """The true score equals the gradient of the Gaussian log-density (autograd)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 2, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4], dtype=torch.float64)
    x = torch.randn(1, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    d = x - sde.mean(s, t)
    logp = -0.5 * (d * sde.mult_cov_inv(d, t)).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert torch.allclose(grad, sde.true_score(x.detach(), s, t), atol=1e-10)


def test_prior_mixing_envelope_matches_definition():
    sde = PriorMixingSDE(num_sources=2)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(1, 1, 1200, generator=g, dtype=torch.float64)
    env = sde.envelope(y)
    assert env.shape == y.shape
    # reference definition: avg_pool1d(y^2, 510, stride 1, padding 255), last sample dropped
    ref = torch.nn.functional.avg_pool1d(y**2, 510, stride=1, padding=255)[..., :-1]
    ref = 0.5 * ref.clamp(min=1e-4).sqrt()
    assert torch.allclose(env, ref, atol=1e-12)
    s = torch.randn(1, 2, 1200, generator=g, dtype=torch.float64)
    t = torch.tensor([0.6], dtype=torch.float64)
    x, z = sde.sample_marginal(s, t, generator=g, y=y)
    base = MixingSDE(num_sources=2)
    assert torch.allclose(x - sde.mean(s, t), base.mult_std(z, t) * env, atol=1e-12)
    assert torch.allclose(sde.mult_std_inv(sde.mult_std(z, t, y=y), t, y=y), z, atol=1e-9)
    assert sde.diffusion(t, y=y).shape == (1, 1, 1200)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.mean(torch.randn(2, 3, 8), torch.ones(2) * 0.5), "num_sources=2"),
        (lambda s: s.mean(torch.randn(2, 8), torch.ones(2) * 0.5), r"\(batch, K, samples\)"),
        # values are checked once at the boundary (check_time), not per call: no host sync per step
        (lambda s: s.check_time(torch.ones(2) * 1.5), r"t must lie in \[0, T"),
        (lambda s: s.check_time(torch.ones(2) * -0.1), r"t must lie in \[0, T"),
        (lambda s: s.check_time(torch.tensor([0.5, float("nan")])), r"t must lie in \[0, T"),
        (lambda s: s.mean(torch.randn(2, 2, 8), torch.ones(3) * 0.5), "batch size"),
        (lambda s: s.mean(torch.randn(2, 2, 8), torch.ones(2, 1) * 0.5), r"t must be shaped \(batch,\)"),
        (lambda s: s.prior_sample(torch.randn(2, 2, 8)), r"\(batch, 1, samples\)"),
        (lambda s: s.check_time(torch.zeros(1), positive=True), "t must be > 0"),
        (lambda s: MixingSDE(num_sources=1), "num_sources"),
        (lambda s: MixingSDE(sigma_min=0.5, sigma_max=0.1), "sigma_min"),
        (lambda s: PriorMixingSDE().mult_std(torch.randn(1, 2, 8), torch.ones(1)), "needs the mixture"),
    ],
)
def test_bad_input(sde, call, match):
    with pytest.raises(ValueError, match=match):
        call(sde)
