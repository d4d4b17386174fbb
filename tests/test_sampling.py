"""Samplers: single steps and the full PC sampler against the authors' code, oracle-score runs."""
import math
import re

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


# --------------------------------------------------------------------------- exact steps
def exactly(message):
    """``pytest.raises(match=...)`` pattern for exactly this one-line message."""
    return "^" + re.escape(message) + "$"


def _eig(sde, t):
    lam1, lam2 = sde.eigenvalues(torch.tensor([t], dtype=torch.float64))
    return float(lam1), float(lam2)


def _split(x):
    """``(P x, Pbar x)``: the source average (broadcast) and the zero-sum part."""
    m = x.mean(1, keepdim=True)
    return m, x - m


def _envelope(sde, y):
    return sde.envelope(y) if isinstance(sde, PriorMixingSDE) else 1.0


def _signals(seed, batch=2, K=3, n=600):
    g = torch.Generator().manual_seed(seed)
    x, score, z = (torch.randn(batch, K, n, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.randn(batch, 1, n, generator=g, dtype=torch.float64)
    return x, score, z, y


SDE_CLASSES = [MixingSDE, PriorMixingSDE]


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
def test_single_steps_closed_form(sde_cls):
    """Predictor x - (f dt - g^2 dt q) + g sqrt(dt) z and corrector x + 2 r^2 Sigma q + 2 r L z, with
    f = -gamma Pbar x, g = sigma_min rho^t sqrt(2 ln rho) (times the envelope e for PriorMixingSDE)."""
    sde = sde_cls(num_sources=3)
    x, score, z, y = _signals(0)
    t, dt, snr = 0.6, 0.05, 0.4
    e = _envelope(sde, y)
    rho = sde.sigma_max / sde.sigma_min
    g = sde.sigma_min * rho**t * math.sqrt(2 * math.log(rho)) * e
    _, xb = _split(x)
    mean = x + sde.gamma * xb * dt + g**2 * dt * score
    new, new_mean = reverse_diffusion_step(x, score, sde, t, dt, y, z)
    close(new_mean, mean)
    close(new, mean + g * math.sqrt(dt) * z)
    for out in reverse_diffusion_step(x, score, sde, t, dt, y):  # no noise given: no noise added
        close(out, mean)
    l1, l2 = _eig(sde, t)
    (sm, sb), (zm, zb) = _split(score), _split(z)
    mean = x + 2 * snr**2 * (l1 * sm + l2 * sb) * e**2
    new, new_mean = langevin_corrector_step(x, score, sde, t, snr, y, z)
    close(new_mean, mean)
    close(new, mean + 2 * snr * (math.sqrt(l1) * zm + math.sqrt(l2) * zb) * e)
    for out in langevin_corrector_step(x, score, sde, t, snr, y):
        close(out, mean)


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("t_from, t_to", [(0.3, 0.8), (0.03, 1.0)])
def test_forward_transition_closed_form(sde_cls, t_from, t_to):
    """x_b = (P + e^{-gamma d} Pbar) x_a + sqrt(l1(b) - l1(a)) P z + sqrt(l2(b) - e^{-2 gamma d} l2(a)) Pbar z
    (times the envelope), z the next standard normal draw of the generator (float64 like x)."""
    sde = sde_cls(num_sources=3)
    x, _, _, y = _signals(1)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = forward_transition(x, sde, t_from, t_to, y, generator=g)
    decay = math.exp(-sde.gamma * (t_to - t_from))
    (l1a, l2a), (l1b, l2b) = _eig(sde, t_from), _eig(sde, t_to)
    (xm, xb), (zm, zb) = _split(x), _split(z)
    noise = (math.sqrt(l1b - l1a) * zm + math.sqrt(l2b - decay**2 * l2a) * zb) * _envelope(sde, y)
    close(out, xm + decay * xb + noise, rtol=1e-12, atol=1e-14)


def test_forward_transition_zero_interval_and_wrong_order(sde):
    x, _, _, y = _signals(2, K=2)
    close(forward_transition(x, sde, 0.4, 0.4, y, generator=torch.Generator().manual_seed(0)), x, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match=exactly("forward_transition needs t_to >= t_from")):
        forward_transition(x, sde, 0.5, 0.4, y)


@pytest.mark.parametrize("h", [-0.05, 0.05])
def test_heun_step_on_a_linear_ode(sde, h):
    """With the score -x the probability-flow velocity is a(t) x per eigen-subspace, a_P = g^2 / 2 and
    a_Pbar = g^2 / 2 - gamma: one Heun step is x (1 + h/2 (a0 + a1 + h a0 a1)), and its error against
    the exact solution x exp(int a dt) shrinks like h^3."""
    x, _, _, y = _signals(3, K=2, n=16)
    rho = sde.sigma_max / sde.sigma_min

    def a(t):
        half_g2 = 0.5 * (sde.sigma_min * rho**t) ** 2 * 2 * math.log(rho)
        return half_g2, half_g2 - sde.gamma

    def score(xx, t, yy):
        assert t.shape == (2,)
        return -xx

    def exact(t0, t1):  # x(t1) = x(t0) exp(int a): int g^2/2 = sigma_min^2 rho^(2t) / 2 (+ const)
        integral = 0.5 * sde.sigma_min**2 * (rho ** (2 * t1) - rho ** (2 * t0))
        xm, xb = _split(x)
        return xm * math.exp(integral) + xb * math.exp(integral - sde.gamma * (t1 - t0))

    t0 = 0.5
    (p0, b0), (p1, b1) = a(t0), a(t0 + h)
    xm, xb = _split(x)
    expected = xm * (1 + h / 2 * (p0 + p1 + h * p0 * p1)) + xb * (1 + h / 2 * (b0 + b1 + h * b0 * b1))
    close(sampling.heun_step(x, score, sde, t0, t0 + h, y), expected, rtol=1e-12, atol=1e-14)
    errs = [float((sampling.heun_step(x, score, sde, t0, t0 + k, y) - exact(t0, t0 + k)).abs().max()) for k in (h, h / 2)]
    assert 6 < errs[0] / errs[1] < 10, errs


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
def test_tweedie_recovers_sources_with_true_score_both_sdes(sde_cls):
    sde = sde_cls(num_sources=3)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 600, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    for t in (0.1, 0.7):
        tb = torch.full((2,), t, dtype=torch.float64)
        x, _ = sde.sample_marginal(s, tb, generator=g, y=y)
        close(tweedie_denoise(x, sde.true_score(x, s, tb, y=y), sde, t, y), s, rtol=1e-9, atol=1e-9)


def test_steps_stay_on_the_signals_device(sde):
    """Times, noise and schedules are made on the device of the signals (meta: no computation)."""
    x = torch.empty(2, 2, 10, device="meta", dtype=torch.float64)
    y = torch.empty(2, 1, 10, device="meta", dtype=torch.float64)
    outs = [
        *reverse_diffusion_step(x, x, sde, 0.5, 0.1, y, x),
        *langevin_corrector_step(x, x, sde, 0.5, 0.5, y, x),
        forward_transition(x, sde, 0.3, 0.5, y),
        tweedie_denoise(x, x, sde, 0.5, y),
        time_schedule(1, 1.0, 0.1, device="meta"),
        time_schedule(3, 1.0, 0.1, device="meta"),
        time_schedule(3, 1.0, 0.1, kind="power", device="meta"),
    ]
    assert [o.device.type for o in outs] == ["meta"] * len(outs)


# --------------------------------------------------------------------------- schedules
def test_schedule_values_dtype_and_default_rho():
    assert time_schedule(2, 1.0, 0.1).tolist() == [1.0, 0.1]
    one = time_schedule(1, 0.7, 0.1)
    assert one.dtype == torch.float64 and one.tolist() == [0.7]
    assert time_schedule(1, 0.7, 0.1, dtype=torch.float32).dtype == torch.float32
    u = torch.linspace(0, 1, 6, dtype=torch.float64)
    close(time_schedule(6, 1.0, 0.03, kind="power"), (1.0 + u * (math.sqrt(0.03) - 1.0)) ** 2, rtol=1e-14)
    close(time_schedule(6, 0.8, 0.03, kind="power", rho=7.0), (0.8 ** (1 / 7) + u * (0.03 ** (1 / 7) - 0.8 ** (1 / 7))) ** 7, rtol=1e-14)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 1.0, 0.1), "num_steps must be a positive integer, got 0"),
        ((2.5, 1.0, 0.1), "num_steps must be a positive integer, got 2.5"),
        ((3, 0.5, 0.5), "need t_start > t_end > 0, got t_start=0.5, t_end=0.5"),
        ((3, 1.0, 0.0), "need t_start > t_end > 0, got t_start=1.0, t_end=0.0"),
        ((3, 0.1, 0.5), "need t_start > t_end > 0, got t_start=0.1, t_end=0.5"),
    ],
)
def test_schedule_bad_arguments(args, message):
    with pytest.raises(ValueError, match=exactly(message)):
        time_schedule(*args)


# --------------------------------------------------------------------------- samplers: composition, NFE, defaults
def _recording(score_fn):
    """Wrap a score: records (t, x) of every call."""
    calls = []

    def score(x, t, y):
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        calls.append((float(t[0]), x.clone()))
        return score_fn(x, t, y)

    return score, calls


def _toy_score(x, t, y):
    """Not an exact score, but time dependent, so a wrong time or state shows in the output."""
    return -x / (1.0 + t[:, None, None])


def _power(n, t0=1.0, t1=0.03):  # EDM's schedule with rho = 2, written out
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((t0**0.5 + u * (t1**0.5 - t0**0.5)) ** 2).tolist()


@pytest.mark.parametrize(
    "sde_cls, dt, C",
    [(MixingSDE, "grid", 2), (MixingSDE, "reference", 2), (MixingSDE, 0.1, 2), (PriorMixingSDE, "grid", 1)],
)
def test_pc_sampler_is_the_documented_composition(sde_cls, dt, C):
    """Prior, then per t_i: corrector(s), predictor (last step without noise); noise drawn in that
    order from the generator and the last, unused predictor noise not drawn."""
    sde = sde_cls(num_sources=2)
    y = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    N, snr = 3, 0.3
    g = torch.Generator().manual_seed(3)
    est, nfe = pc_sampler(_toy_score, sde, y, num_steps=N, corrector_steps=C, snr=snr, dt=dt, generator=g)
    assert nfe == N * (C + 1)
    h = torch.Generator().manual_seed(3)

    def draw():
        return torch.randn(2, 2, 64, generator=h, dtype=torch.float64)

    x = sde.prior_sample(y, z=draw())
    ts = torch.linspace(1.0, 0.03, N, dtype=torch.float64).tolist()
    for i, t in enumerate(ts):
        tb = torch.full((2,), t, dtype=torch.float64)
        for _ in range(C):
            x, _ = langevin_corrector_step(x, _toy_score(x, tb, y), sde, t, snr, y, draw())
        step = {"grid": ts[i] - ts[i + 1] if i + 1 < N else ts[-1], "reference": 1.0 / N}.get(dt, dt)
        x, x_mean = reverse_diffusion_step(x, _toy_score(x, tb, y), sde, t, step, y, draw() if i + 1 < N else None)
    close(est, x_mean, rtol=1e-12, atol=1e-14)
    assert torch.equal(g.get_state(), h.get_state())


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
def test_ddim_sampler_is_the_documented_composition(sde_cls):
    """Per grid point one denoiser call (Tweedie), then ddim_step to the next point; returns the last
    estimate."""
    sde = sde_cls(num_sources=2)
    y = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score, calls = _recording(_toy_score)
    est, nfe = ddim_sampler(score, sde, y, num_steps=4, generator=torch.Generator().manual_seed(3))
    assert nfe == len(calls) == 4
    z = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = sde.prior_sample(y, z=z)
    ts = _power(4)
    for i, t in enumerate(ts):
        assert calls[i][0] == pytest.approx(t, rel=1e-12)
        close(calls[i][1], x, rtol=1e-12, atol=1e-14)
        d = tweedie_denoise(x, _toy_score(x, torch.full((2,), t, dtype=torch.float64), y), sde, t, y)
        if i + 1 < len(ts):
            x = ddim_step(x, d, sde, t, ts[i + 1], y)
    close(est, d, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "name, kwargs, nfe",
    [
        ("pc", {}, 60),  # the paper's 30 steps, one corrector step
        ("em", {}, 30),
        ("ode", {}, 19),  # 10 grid points, Heun, final denoising call
        ("edm", {}, 19),
        ("ddim", {}, 5),
        ("pc", dict(num_steps=4, corrector_steps=0), 4),
        ("pc", dict(num_steps=4, corrector_steps=3), 16),
        ("pc", dict(num_steps=4, denoise_final=True), 9),
        ("em", dict(num_steps=4), 4),
        ("ode", dict(num_steps=1), 3),
        ("ode", dict(num_steps=2), 3),
        ("ode", dict(num_steps=4), 7),
        ("ode", dict(num_steps=4, denoise_final=False), 6),
        ("edm", dict(num_steps=2), 3),
        ("edm", dict(num_steps=4), 7),
        ("edm", dict(num_steps=4, denoise_final=False), 6),
        ("ddim", dict(num_steps=1), 1),
    ],
)
def test_default_and_documented_number_of_calls(sde, name, kwargs, nfe):
    y = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0))
    score, calls = _recording(_toy_score)
    est, n = SAMPLERS[name](score, sde, y, generator=torch.Generator().manual_seed(1), **kwargs)
    assert n == nfe == len(calls)
    assert est.shape == (1, 2, 8) and torch.isfinite(est).all()


@pytest.mark.parametrize(
    "name, kwargs, times",
    [
        ("pc", {}, [t for t in torch.linspace(1.0, 0.03, 30, dtype=torch.float64).tolist() for _ in range(2)]),
        ("pc", dict(num_steps=3, schedule="power"), [t for t in _power(3) for _ in range(2)]),
        ("ddim", {}, _power(5)),
        ("ddim", dict(num_steps=3, schedule="linear"), [1.0, 0.515, 0.03]),
        ("ode", dict(num_steps=3), [1.0, _power(3)[1], _power(3)[1], 0.03, 0.03]),
        ("ode", dict(num_steps=3, schedule="linear"), [1.0, 0.515, 0.515, 0.03, 0.03]),
        # edm: each Heun step starts at t_hat = min(T, t_i (1 + churn / (N - 1)))
        ("edm", dict(num_steps=3), [1.0, _power(3)[1], _power(3)[1] * 1.2, 0.03, 0.03]),
        ("edm", dict(num_steps=3, schedule="linear", churn=0.1), [1.0, 0.515, 0.515 * 1.05, 0.03, 0.03]),
        ("edm", dict(num_steps=3, churn=0.0), [1.0, _power(3)[1], _power(3)[1], 0.03, 0.03]),
    ],
)
def test_call_times_follow_the_schedule(sde, name, kwargs, times):
    y = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0))
    score, calls = _recording(_toy_score)
    SAMPLERS[name](score, sde, y, generator=torch.Generator().manual_seed(1), **kwargs)
    assert [t for t, _ in calls] == pytest.approx(times, rel=1e-6, abs=0)


def test_edm_without_churn_is_the_ode_sampler(sde):
    y = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, na = sampling.edm_sampler(_toy_score, sde, y, num_steps=4, churn=0.0, generator=torch.Generator().manual_seed(2))
    b, nb = sampling.ode_sampler(_toy_score, sde, y, num_steps=4, generator=torch.Generator().manual_seed(2))
    assert na == nb and torch.equal(a, b)
    c, _ = sampling.edm_sampler(_toy_score, sde, y, num_steps=4, churn=0.4, generator=torch.Generator().manual_seed(2))
    assert (c - b).abs().max() > 1e-3


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("name", ["pc", "em", "ode", "edm"])
def test_denoise_final_is_one_tweedie_call_at_t_eps(sde_cls, name):
    """With the conditional score given s, the final Tweedie call returns s; without it the sampler
    returns the state that call would have seen."""
    sde = sde_cls(num_sources=2)
    steps = 3 if sde_cls is MixingSDE else 2  # 3 grid points: ts[1] is not ts[-1]; the envelope is slow on CPU
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 2, 64, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    score, calls = _recording(lambda x, t, yy: sde.true_score(x, s, t, y=yy))
    est, nfe = SAMPLERS[name](score, sde, y, num_steps=steps, denoise_final=True, generator=torch.Generator().manual_seed(1))
    assert nfe == len(calls) and calls[-1][0] == pytest.approx(sde.t_eps, rel=1e-12)
    close(est, s, rtol=1e-8, atol=1e-8)
    t_last, x_last = calls[-1]
    calls.clear()
    plain, n = SAMPLERS[name](score, sde, y, num_steps=steps, denoise_final=False, generator=torch.Generator().manual_seed(1))
    assert n == nfe - 1 == len(calls)
    close(plain, x_last, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- start: refiner and restart
def _edm_lift(t, num_steps=2, churn=0.4):
    return min(1.0, t * (1 + churn / (num_steps - 1)))


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_refiner_starts_on_the_marginal_around_init(sde_cls, name):
    """t_start/init: the first state is mu_t(init) + L_t z at t_start, z the generator's first draw,
    in the mixture's dtype (a float32 init is converted); the calls stay at or below t_start."""
    sde = sde_cls(num_sources=2)
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 2, 64, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    init = (s + 0.1 * torch.randn(2, 2, 64, generator=g, dtype=torch.float64)).float()
    score, calls = _recording(_toy_score)
    est, nfe = SAMPLERS[name](score, sde, y, num_steps=2, t_start=0.4, init=init, generator=torch.Generator().manual_seed(5))
    assert est.dtype == torch.float64 and nfe == len(calls)
    first_t, first_x = calls[0]
    assert first_t == pytest.approx(_edm_lift(0.4) if name == "edm" else 0.4, rel=1e-12)
    assert max(t for t, _ in calls) == first_t
    if name != "edm":  # edm first moves the state forward to t_hat
        z = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        tb = torch.full((2,), 0.4, dtype=torch.float64)
        expected, _ = sde.sample_marginal(init.double(), tb, z=z, y=y)
        close(first_x, expected, rtol=1e-12, atol=1e-14)
    again, _ = SAMPLERS[name](_toy_score, sde, y, num_steps=2, t_start=0.4, init=init, generator=torch.Generator().manual_seed(5))
    assert torch.equal(est, again)


@pytest.mark.parametrize("sde_cls", SDE_CLASSES)
@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_restart_state_is_the_marginal_around_the_tweedie_estimate(sde_cls, name):
    """restart_t: prior draw, one call at T, Tweedie estimate, then mu_r(est) + L_r z' at restart_t with
    z' the generator's second draw."""
    sde = sde_cls(num_sources=2)
    y = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score, calls = _recording(_toy_score)
    est, nfe = SAMPLERS[name](score, sde, y, num_steps=2, restart_t=0.5, generator=torch.Generator().manual_seed(4))
    assert nfe == len(calls) and calls[0][0] == sde.T
    h = torch.Generator().manual_seed(4)
    z0, z1 = (torch.randn(2, 2, 64, generator=h, dtype=torch.float64) for _ in range(2))
    x_T = sde.prior_sample(y, z=z0)
    close(calls[0][1], x_T, rtol=1e-12, atol=1e-14)
    first = tweedie_denoise(x_T, _toy_score(x_T, torch.ones(2, dtype=torch.float64), y), sde, sde.T, y)
    x_r, _ = sde.sample_marginal(first, torch.full((2,), 0.5, dtype=torch.float64), z=z1, y=y)
    assert calls[1][0] == pytest.approx(_edm_lift(0.5) if name == "edm" else 0.5, rel=1e-12)
    if name != "edm":
        close(calls[1][1], x_r, rtol=1e-12, atol=1e-14)
    again, _ = SAMPLERS[name](_toy_score, sde, y, num_steps=2, restart_t=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(est, again)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_flow_model_is_refused_by_the_sde_samplers(name):
    from speechbrain_diffsep.flow import SeparationFlow

    message = (
        "this is a flow-matching model (SeparationFlow): use the samplers euler, heun or midpoint; "
        "pc, em, ode, edm and ddim integrate DiffSep's SDE"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        SAMPLERS[name](_toy_score, SeparationFlow(), torch.randn(1, 1, 16), num_steps=2)


Y40 = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(y=[0.0, 1.0]), "y (the mixture) must be shaped (batch, 1, samples), got list"),
        (dict(y=torch.zeros(1, 40)), "y (the mixture) must be shaped (batch, 1, samples), got (1, 40)"),
        (dict(y=torch.zeros(3, 1)), "y (the mixture) must be shaped (batch, 1, samples), got (3, 1)"),
        (dict(y=torch.zeros(1, 2, 40)), "y (the mixture) must be shaped (batch, 1, samples), got (1, 2, 40)"),
        (dict(y=torch.full((1, 1, 40), float("inf"))), "y (the mixture) contains NaN or inf samples; clean the input first"),
        (dict(corrector_steps=-1), "corrector_steps must be >= 0, got -1"),
        (dict(t_start=0.03, init=torch.zeros(2, 2, 40)), "t_start must lie in (t_eps=0.03, T=1.0], got 0.03"),
        (dict(t_start=1.5, init=torch.zeros(2, 2, 40)), "t_start must lie in (t_eps=0.03, T=1.0], got 1.5"),
        (dict(t_start=0.5), "t_start < T needs an initial estimate: pass init=(batch, K, samples)"),
        (dict(restart_t=0.03), "restart_t must lie in (t_eps=0.03, T=1.0), got 0.03; e.g. restart_t=0.5"),
        (dict(restart_t=0.5, init=torch.zeros(2, 2, 40)),
         "restart_t starts from the prior: it cannot be combined with init / t_start (refiner mode)"),
        (dict(restart_t=0.5, t_start=0.7),
         "restart_t starts from the prior: it cannot be combined with init / t_start (refiner mode)"),
    ]
    + [
        (dict(t_start=0.5, init=torch.zeros(shape)), f"init must be shaped (batch, K=2, samples) like y, got {shape}")
        for shape in [(1, 2, 40), (2, 3, 40), (2, 2, 39), (2, 2), (2, 2, 40, 1)]
    ],
)
def test_bad_arguments_exact_messages(sde, kwargs, message):
    kwargs = dict(kwargs)
    y = kwargs.pop("y", Y40)
    with pytest.raises(ValueError, match=exactly(message)):
        pc_sampler(_toy_score, sde, y, num_steps=2, **kwargs)


def test_get_sampler():
    assert sampling.get_sampler(_toy_score) is _toy_score
    assert sampling.get_sampler("pc") is pc_sampler and sampling.get_sampler("ddim") is ddim_sampler
    assert set(SDE_SAMPLERS) == {"pc", "em", "ode", "edm", "ddim"} and set(SDE_SAMPLERS) < set(SAMPLERS)
    with pytest.raises(ValueError, match=exactly(f"unknown sampler 'dpm-solver'; choose one of {sorted(SAMPLERS)}")):
        sampling.get_sampler("dpm-solver")
