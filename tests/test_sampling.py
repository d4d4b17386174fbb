"""Samplers: single steps and the full PC sampler against the authors' code, oracle-score runs."""
import math

import pytest
import torch

from conftest import t64
from speechbrain_diffsep import sampling
from speechbrain_diffsep.sampling import (
    SAMPLERS,
    SDE_SAMPLERS,
    ddim_sampler,
    ddim_step,
    forward_transition,
    langevin_corrector_step,
    pc_sampler,
    reverse_diffusion_step,
    time_schedule,
    tweedie_denoise,
)
from speechbrain_diffsep.losses import mismatch_state
from speechbrain_diffsep.sde import MixingSDE, PriorMixingSDE


@pytest.fixture
def sde():
    return MixingSDE(num_sources=2)


def close(a, b, rtol=1e-10, atol=1e-12):
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a.double(), b, rtol=rtol, atol=atol), float((a - b).abs().max())


def test_single_steps_match_reference(sde, ref_values):
    ref = ref_values["sampler_single_steps"]
    inp = ref_values["inputs"]
    x = t64(ref["x_in"])
    score = t64(inp["s_fixed (fixed score value, shape (1,2,8))"])
    y = t64(inp["y (mixture = x0.sum(dim=1, keepdim=True), shape (1,1,8))"])
    pred = [v for k, v in ref.items() if k.startswith("reverse_diffusion_predictor")][0]
    corr = [v for k, v in ref.items() if k.startswith("annealed_langevin_corrector_ald2")][0]
    x_new, x_mean = reverse_diffusion_step(x, score, sde, ref["t"], 1.0 / 30, y, t64(inp["z_pred (predictor noise, shape (1,2,8))"]))
    close(x_mean, pred["x_mean"])
    close(x_new, pred["x (with noise z_pred)"])
    x_new, x_mean = langevin_corrector_step(x, score, sde, ref["t"], 0.5, y, t64(inp["z_corr (corrector noise, shape (1,2,8))"]))
    close(x_mean, corr["x_mean"])
    close(x_new, corr["x (with noise z_corr)"])


def _zero_noise(monkeypatch):
    monkeypatch.setattr(sampling, "_randn", lambda x, generator: torch.zeros_like(x))


def test_pc_sampler_oracle_zero_noise_matches_reference(sde, ref_values, monkeypatch):
    """The authors' oracle run: noise patched to zero, score -Sigma^-1 (x - mu_t(x0)), dt = 1/N."""
    ref = ref_values["pc_sampler_oracle_zero_noise"]
    x0 = t64(ref_values["inputs"]["x0 (sources, shape (1,2,8))"])
    y = x0.sum(1, keepdim=True)
    _zero_noise(monkeypatch)
    ts_seen = []

    def oracle(x, t, y):
        ts_seen.append(float(t[0]))
        return sde.true_score(x, x0, t)

    est, nfe = pc_sampler(oracle, sde, y, num_steps=30, corrector_steps=1, snr=0.5, dt="reference")
    assert nfe == ref["nfe (as returned: N*(corrector_steps+1))"] == 60
    close(torch.tensor(ts_seen[::2], dtype=torch.float64), ref["timesteps"], rtol=1e-12)
    close(est, ref["final_output"], rtol=1e-9, atol=1e-12)
    # and it separates as well as the reference's own run did
    ref_err = (t64(ref["final_output"]) - x0).abs().max()
    assert (est - x0).abs().max() <= ref_err * (1 + 1e-6)
    assert ref_err < 0.01


def test_pc_dt_conventions_differ(sde):
    y = torch.randn(1, 1, 16, dtype=torch.float64)
    score = lambda x, t, y: -x
    a, _ = pc_sampler(score, sde, y, num_steps=5, generator=torch.Generator().manual_seed(0), dt="reference")
    b, _ = pc_sampler(score, sde, y, num_steps=5, generator=torch.Generator().manual_seed(0), dt="grid")
    c, _ = pc_sampler(score, sde, y, num_steps=5, generator=torch.Generator().manual_seed(0), dt=0.2)
    assert not torch.allclose(a, b)
    assert torch.allclose(a, c)  # reference convention is dt = 1/N


class GaussianOracle:
    """Exact score of p_t(x | y) when the sources are independent N(0, c_k) per sample.

    s | y ~ N(m_y, C_y) with m_y = C1 y / (1'C1), C_y = C - C11'C / (1'C1); x_t = M_t s + L_t z,
    M_t = P + e^{-gamma t} Pbar, so x_t | y ~ N(M_t m_y, M_t C_y M_t' + Sigma_t).
    """

    def __init__(self, sde, c):
        self.sde, self.c = sde, torch.as_tensor(c, dtype=torch.float64)
        K = len(c)
        self.P = torch.full((K, K), 1.0 / K, dtype=torch.float64)
        self.Pb = torch.eye(K, dtype=torch.float64) - self.P
        C = torch.diag(self.c)
        one = torch.ones(K, 1, dtype=torch.float64)
        self.gain = (C @ one / (one.T @ C @ one)).squeeze(1)  # m_y = gain * y
        self.C_y = C - C @ one @ one.T @ C / (one.T @ C @ one)

    def marginal_cov_mean(self, t0, y):
        M = self.P + math.exp(-self.sde.gamma * t0) * self.Pb
        lam1, lam2 = self.sde.eigenvalues(torch.tensor([t0], dtype=torch.float64))
        S = M @ self.C_y @ M.T + float(lam1) * self.P + float(lam2) * self.Pb
        return S, torch.einsum("ij,bjn->bin", M, self.posterior_mean(y))

    def sample_exact_prior(self, y, generator):
        """Draw x_T from the exact p_T(x | y) (not the sampler's approximate prior y/K + L_T z)."""
        S, mean = self.marginal_cov_mean(self.sde.T, y)
        z = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.einsum("ij,bjn->bin", torch.linalg.cholesky(S), z)

    def posterior_mean(self, y):
        return self.gain[None, :, None] * y

    def __call__(self, x, t, y):
        S, mean = self.marginal_cov_mean(float(t[0]), y)
        return -torch.einsum("ij,bjn->bin", torch.linalg.inv(S), x - mean)


@pytest.mark.parametrize(
    "name, steps, exact_prior",
    [("pc", 30, False), ("em", 60, False), ("pc", 30, True), ("em", 60, True), ("ode", 15, True), ("edm", 15, True)],
)
def test_oracle_gaussian_posterior_mean(sde, name, steps, exact_prior, monkeypatch):
    """Averaged over many seeds, every sampler returns the exact posterior mean E[s | y].

    With the sampler's own prior (y/K + L_T z), the deterministic ODE keeps the prior's "model
    mismatch" (mean off by e^{-gamma T} Pbar E[s|y], about 6% of |y| here) while the stochastic
    samplers wash most of it out; started from the exact p_T(x | y) all of them are exact.
    """
    oracle = GaussianOracle(sde, [1.0, 0.25])
    if exact_prior:
        monkeypatch.setattr(
            sampling, "_start", lambda sde, y, generator, t_start, init, **kw: (oracle.sample_exact_prior(y, generator), sde.T, 0)
        )
    g = torch.Generator().manual_seed(0)
    n = 32
    y1 = torch.randn(1, 1, n, generator=g, dtype=torch.float64) * math.sqrt(1.25)
    y = y1.expand(400, 1, n).contiguous()
    est, nfe = SAMPLERS[name](oracle, sde, y, num_steps=steps, generator=g)
    assert est.shape == (400, 2, n)
    target = oracle.posterior_mean(y1)[0]
    err = (est.mean(0) - target).abs().max()
    post_std = oracle.C_y.diagonal().sqrt().max()
    # standard error of the mean is post_std / 20; allow 5 of them plus the prior mismatch at T
    assert err < 5 * post_std / 20 + 0.05, (name, float(err))
    # and the spread matches the posterior's (a sampler, not a point estimate) for the SDE samplers
    if name in ("pc", "em"):
        emp_std = (est - target).std(0).mean()
        assert abs(float(emp_std) - float(post_std)) < 0.2 * float(post_std)


def test_tweedie_recovers_sources_with_true_score(sde):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 2, 20, generator=g, dtype=torch.float64)
    t = 0.5
    tb = torch.full((2,), t, dtype=torch.float64)
    x, z = sde.sample_marginal(s, tb, generator=g)
    # with the conditional score given s, Tweedie is exact
    out = tweedie_denoise(x, sde.true_score(x, s, tb), sde, t, s.sum(1, keepdim=True))
    assert torch.allclose(out, s, atol=1e-10)


def test_forward_transition_composes_to_marginal(sde):
    """x_0 -> x_a by the marginal, then a -> b by the transition, has the marginal of x_b."""
    g = torch.Generator().manual_seed(5)
    s = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64).expand(40000, 2, 1)
    y = s.sum(1, keepdim=True)
    xa, _ = sde.sample_marginal(s, torch.full((40000,), 0.3, dtype=torch.float64), generator=g)
    xb = forward_transition(xa, sde, 0.3, 0.8, y, generator=g)
    tb = torch.tensor([0.8], dtype=torch.float64)
    mu = sde.mean(s[:1], tb)[0, :, 0]
    lam1, lam2 = sde.eigenvalues(tb)
    cov = torch.cov(xb[:, :, 0].T)
    assert torch.allclose(xb[:, :, 0].mean(0), mu, atol=0.01)
    assert abs(float(cov[0, 0] + cov[0, 1]) - float(lam1)) < 0.05 * float(lam1)  # P-eigenvalue
    assert abs(float(cov[0, 0] - cov[0, 1]) - float(lam2)) < 0.05 * float(lam2)  # Pbar-eigenvalue


@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_registry_signature_nfe_and_determinism(sde, name):
    y = torch.randn(2, 1, 40)
    calls = []

    def score(x, t, y):
        calls.append(1)
        assert t.shape == (x.shape[0],) and x.shape == (2, 2, 40)
        return -x

    a, nfe = SAMPLERS[name](score, sde, y, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert nfe == len(calls) > 0
    b, _ = SAMPLERS[name](score, sde, y, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.shape == (2, 2, 40) and torch.isfinite(a).all()


def test_refiner_start_from_estimate(sde):
    """Starting near t_eps from the true sources with the true score returns them almost exactly."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(1, 2, 50, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    score = lambda x, t, yy: sde.true_score(x, s, t)
    est, nfe = pc_sampler(score, sde, y, num_steps=3, t_start=0.2, init=s, generator=g)
    assert nfe == 6
    assert (est - s).abs().max() < 0.02
    with pytest.raises(ValueError, match="needs an initial estimate"):
        pc_sampler(score, sde, y, num_steps=3, t_start=0.2)
    with pytest.raises(ValueError, match="t_start must lie"):
        pc_sampler(score, sde, y, num_steps=3, t_start=0.01, init=s)


def test_schedules():
    lin = time_schedule(30, 1.0, 0.03)
    assert torch.allclose(lin, torch.linspace(1.0, 0.03, 30, dtype=torch.float64))
    pw = time_schedule(10, 1.0, 0.03, kind="power", rho=3.0)
    assert pw[0] == 1.0 and abs(float(pw[-1]) - 0.03) < 1e-12
    steps = (pw[:-1] - pw[1:])
    assert (steps > 0).all() and steps[-1] < steps[0]  # denser near t_eps
    with pytest.raises(ValueError, match="unknown schedule"):
        time_schedule(5, 1.0, 0.1, kind="cosine")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(y=torch.randn(1, 40)), r"\(batch, 1, samples\)"),
        (dict(y=torch.full((1, 1, 40), float("nan"))), "NaN"),
        (dict(y=torch.randn(1, 1, 40), num_steps=0), "num_steps"),
    ],
)
def test_bad_input(sde, kwargs, match):
    kwargs = dict(kwargs)  # the parameter's dict is shared by every run of the test: do not consume it
    y = kwargs.pop("y")
    with pytest.raises(ValueError, match=match):
        pc_sampler(lambda x, t, y: -x, sde, y, **kwargs)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.get_sampler("dpm-solver")


# --------------------------------------------------------------------------- prior mismatch
@pytest.mark.parametrize("sde_cls", [MixingSDE, PriorMixingSDE])
def test_ddim_from_the_prior_carries_the_closed_form_mismatch_state(sde_cls):
    """With a perfect denoiser (D = s) DDIM steps from the prior draw y/K + L_T z follow
    losses.mismatch_state: x_t = mu_t(s) + L_t z - r2(t) e^{-gamma T} Pbar s at every grid point."""
    sde = sde_cls(num_sources=3)
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 600, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    z = torch.randn(s.shape, generator=g, dtype=torch.float64)
    x = sde.prior_sample(y, z=z)
    ts = time_schedule(7, 1.0, sde.t_eps, kind="power").tolist()
    close(mismatch_state(sde, s, torch.full((2,), 1.0, dtype=torch.float64), z, y=y), x)  # t = T: the prior
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = ddim_step(x, s, sde, t_cur, t_next, y)
        close(x, mismatch_state(sde, s, torch.full((2,), t_next, dtype=torch.float64), z, y=y), rtol=1e-9, atol=1e-10)
    # and its moments: mean mu_t(s) - r2 e^{-gamma T} Pbar s (20 % of the true Pbar mean left at t = 0.95)
    sde = MixingSDE()
    one = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    tb = torch.tensor([0.95], dtype=torch.float64)
    _, lam2 = sde.eigenvalues(tb)
    _, lam2T = sde.eigenvalues(torch.tensor([1.0], dtype=torch.float64))
    frac = (math.exp(-2 * 0.95) - math.sqrt(float(lam2 / lam2T)) * math.exp(-2)) / math.exp(-2 * 0.95)
    assert 0.15 < frac < 0.25
    zz = torch.randn(200000, 2, 1, generator=g, dtype=torch.float64)
    xs = mismatch_state(sde, one.expand(200000, 2, 1), tb.expand(200000), zz)
    assert abs(float(xs[:, 0, 0].mean()) - frac * math.exp(-2 * 0.95)) < 0.005


def test_ddim_is_exact_on_the_true_marginal():
    """Started from the true marginal at T with the conditional score given s, DDIM returns s."""
    sde = MixingSDE()
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 2, 64, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    x_T, _ = sde.sample_marginal(s, torch.ones(2, dtype=torch.float64), generator=g)

    def score(x, t, y):
        return sde.true_score(x, s, t)

    # start from the true marginal by passing it as a refiner init at t_start = T would re-noise it;
    # run the steps by hand instead
    ts = time_schedule(6, 1.0, sde.t_eps, kind="power").tolist()
    x = x_T
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        est = tweedie_denoise(x, score(x, torch.full((2,), t_cur, dtype=torch.float64), y), sde, t_cur, y)
        close(est, s, rtol=1e-8, atol=1e-9)
        x = ddim_step(x, est, sde, t_cur, t_next, y)
    est, nfe = ddim_sampler(score, sde, y, num_steps=1, generator=g)
    assert nfe == 1  # one denoiser call at T


@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_restart_costs_one_call_and_checks_its_options(sde, name):
    y = torch.randn(2, 1, 40)
    calls = []

    def score(x, t, y):
        calls.append(float(t[0]))
        return -x

    _, base = SAMPLERS[name](score, sde, y, num_steps=4, generator=torch.Generator().manual_seed(1))
    calls.clear()
    _, nfe = SAMPLERS[name](score, sde, y, num_steps=4, restart_t=0.5, generator=torch.Generator().manual_seed(1))
    assert nfe == base + 1 == len(calls)
    # one call at T, then from restart_t down (edm's churn first lifts t by a factor 1 + 0.4/3)
    assert calls[0] == sde.T and max(calls[1:]) <= 0.5 * (1 + 0.4 / 3 if name == "edm" else 1) + 1e-6
    for bad in (0.01, sde.T, 1.5):
        with pytest.raises(ValueError, match=r"restart_t must lie in \(t_eps=0.03, T=1.0\)"):
            SAMPLERS[name](score, sde, y, num_steps=2, restart_t=bad)
    with pytest.raises(ValueError, match="cannot be combined with init"):
        SAMPLERS[name](score, sde, y, num_steps=2, restart_t=0.5, t_start=0.3, init=torch.zeros(2, 2, 40))


@pytest.mark.parametrize("name, small, large", [("ode", 3, 30), ("ddim", 3, 60), ("edm", 3, 30), ("pc", 3, 30)])
def test_restart_from_the_mismatched_prior_converges_as_steps_grow(sde, name, small, large):
    """Gaussian sources, exact score, the sampler's own (mismatched) prior: with restart_t the mean of
    the samples is the posterior mean E[s | y] at few and at many steps (no drift with steps)."""
    oracle = GaussianOracle(sde, [1.0, 0.25])
    g = torch.Generator().manual_seed(0)
    n = 16
    y1 = torch.randn(1, 1, n, generator=g, dtype=torch.float64) * math.sqrt(1.25)
    y = y1.expand(1000, 1, n).contiguous()
    target = oracle.posterior_mean(y1)[0]
    post_std = float(oracle.C_y.diagonal().sqrt().max())
    errs = {}
    for steps in (small, large):
        est, _ = SAMPLERS[name](oracle, sde, y, num_steps=steps, restart_t=0.5, generator=g)
        errs[steps] = float((est.mean(0) - target).abs().max())
    # Tweedie at T from the mismatched prior is biased by at most a few % of |y|; 5 standard errors
    assert errs[large] < 5 * post_std / math.sqrt(1000) + 0.02 * float(y1.abs().max()), errs
    assert errs[large] <= errs[small] + 3 * post_std / math.sqrt(1000), errs
