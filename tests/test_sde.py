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


# ---------------------------------------------------------------------------- argument checks
SIG_NAME = {"drift": "x", "mean": "s", "mult_std": "x", "mult_std_inv": "x", "mult_cov": "x",
            "mult_cov_inv": "x", "sample_marginal": "s", "true_score": "x"}


def _call(sde, method, x):
    t = torch.full((x.shape[0],) if torch.is_tensor(x) and x.dim() else (1,), 0.5)
    if method == "true_score":
        return sde.true_score(x, x, t)
    return getattr(sde, method)(x, t)


@pytest.mark.parametrize("method", sorted(SIG_NAME))
def test_every_method_names_its_bad_signal(sde, method):
    name = SIG_NAME[method]
    with pytest.raises(ValueError) as e:
        _call(sde, method, [[0.0] * 8] * 2)
    assert str(e.value) == f"{name} must be a torch.Tensor shaped (batch, K, samples), got list"
    with pytest.raises(ValueError) as e:
        _call(sde, method, torch.zeros(2, 8))
    assert str(e.value) == (f"{name} must be shaped (batch, K, samples), got shape (2, 8); "
                            "add the missing axes (e.g. x[None] for a single example)")
    # K = 3 sources (and 8 samples) for an SDE built for 2: every method refuses, none broadcasts
    with pytest.raises(ValueError) as e:
        _call(sde, method, torch.zeros(4, 3, 8))
    assert str(e.value) == (f"{name} has 3 sources on axis 1 but the SDE was built for num_sources=2; "
                            "build the SDE with num_sources=3 or fix the input")


@pytest.mark.parametrize(
    "y, got",
    [([[0.0] * 8], "list"), (torch.zeros(2, 8), "(2, 8)"), (torch.zeros(2, 2, 8), "(2, 2, 8)"),
     (torch.zeros(1, 1, 1, 8), "(1, 1, 1, 8)")],
)
@pytest.mark.parametrize("method", ["prior_mean", "prior_sample", "envelope"])
def test_mixture_checks_name_the_mixture(method, y, got):
    sde = PriorMixingSDE(num_sources=2)
    with pytest.raises(ValueError) as e:
        getattr(sde, method)(y)
    assert str(e.value) == (f"y (the mixture) must be shaped (batch, 1, samples), got {got}; "
                            "use mix.unsqueeze(1) for a (batch, samples) tensor")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(num_sources=1), "num_sources must be an integer >= 2, got 1"),
        (dict(num_sources=2.5), "num_sources must be an integer >= 2, got 2.5"),
        (dict(sigma_min=0.0), "need 0 < sigma_min < sigma_max, got sigma_min=0.0, sigma_max=0.5"),
        (dict(sigma_min=0.5), "need 0 < sigma_min < sigma_max, got sigma_min=0.5, sigma_max=0.5"),
        (dict(sigma_min=0.5, sigma_max=0.1), "need 0 < sigma_min < sigma_max, got sigma_min=0.5, sigma_max=0.1"),
        (dict(gamma=-1.0), "gamma must be >= 0, got -1.0"),
        (dict(gamma=float("nan")), "gamma must be >= 0, got nan"),
        (dict(t_eps=0.0), "need 0 < t_eps < T, got t_eps=0.0, T=1.0"),
        (dict(t_eps=0.5, T=0.5), "need 0 < t_eps < T, got t_eps=0.5, T=0.5"),
    ],
)
@pytest.mark.parametrize("cls", [MixingSDE, PriorMixingSDE])
def test_bad_construction_messages(cls, kwargs, msg):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert str(e.value) == msg


def test_repr_and_positional_arguments():
    sde = MixingSDE(3, 1.5, 0.1, 0.9, 0.05, 0.8)
    assert repr(sde) == "MixingSDE(num_sources=3, gamma=1.5, sigma_min=0.1, sigma_max=0.9, t_eps=0.05, T=0.8)"
    # PriorMixingSDE forwards positional arguments to MixingSDE
    psde = PriorMixingSDE(3, 1.5, 0.1, 0.9, 0.05, 0.8, window=64)
    assert repr(psde) == "PriorMixingSDE(num_sources=3, gamma=1.5, sigma_min=0.1, sigma_max=0.9, t_eps=0.05, T=0.8)"
    assert (psde.window, psde.floor, psde.scale) == (64, 1e-4, 0.5)


@pytest.mark.parametrize(
    "t, msg",
    [
        (torch.tensor([-0.5, 0.25]), "t must lie in [0, T=1.0], got values in [-0.5, 0.25]"),
        (torch.tensor([0.25, 1.5]), "t must lie in [0, T=1.0], got values in [0.25, 1.5]"),
        (torch.tensor([1.0 + 1e-5], dtype=torch.float64), "t must lie in [0, T=1.0], got values in [1.00001, 1.00001]"),
    ],
)
def test_check_time_message(sde, t, msg):
    with pytest.raises(ValueError) as e:
        sde.check_time(t)
    assert str(e.value) == msg


def test_check_time_accepts_the_closed_interval(sde):
    t = sde.check_time([0.0, 0.5, 1.0, 1.0 + 1e-7])  # 0 allowed by default, T up to rounding
    assert t.dtype == torch.float64 and t.tolist() == [0.0, 0.5, 1.0, 1.0 + 1e-7]
    assert sde.check_time(torch.tensor([0.5, 1.0], dtype=torch.float32), positive=True).dtype == torch.float32
    assert sde.check_time(0.03, positive=True).tolist() == [0.03]
    with pytest.raises(ValueError) as e:
        sde.check_time(torch.tensor([0.5, 0.0]), positive=True)
    assert str(e.value) == "t must be > 0 here (Sigma_0 = 0 is not invertible); the samplers stop at t_eps"


def test_time_shape_errors(sde):
    x = torch.zeros(4, 2, 8)  # batch 4 != K 2
    for method in ("mean", "mult_std", "mult_cov_inv"):
        with pytest.raises(ValueError) as e:
            getattr(sde, method)(x, torch.full((3,), 0.5))
        assert str(e.value) == "t has 3 entries but the signals have batch size 4"
    with pytest.raises(ValueError) as e:
        sde.mean(x, torch.full((4, 1), 0.5))
    assert str(e.value) == "t must be shaped (batch,), got shape (4, 1)"


def test_time_as_float_scalar_or_single_entry(sde):
    """A Python float, a 0-d tensor and a 1-entry tensor all mean "this t for every example"."""
    lam_f = sde.eigenvalues(0.5)
    assert lam_f[0].dtype == torch.float64 and lam_f[0].shape == (1,)
    lam_t = sde.eigenvalues(torch.tensor(0.5, dtype=torch.float32))  # tensors keep their dtype
    assert lam_t[0].dtype == torch.float32 and lam_t[0].shape == (1,)
    assert torch.allclose(lam_t[1].double(), lam_f[1], rtol=1e-6)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    full = sde.mean(s, torch.full((3,), 0.5, dtype=torch.float64))
    for t in (0.5, torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)):
        assert torch.equal(sde.mean(s, t), full)
        assert torch.equal(sde.mult_std(s, t), sde.mult_std(s, torch.full((3,), 0.5, dtype=torch.float64)))


def test_outputs_keep_the_signal_dtype(sde):
    """float32 signals with float64 (or Python float) times give float32 results."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 2, 6, generator=g)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    for out in (sde.mean(s, t), sde.mult_std(s, t), sde.mult_cov_inv(s, t), sde.true_score(s, s, t),
                sde.sample_marginal(s, t, generator=g)[0], sde.mean(s, 0.3),
                sde.prior_sample(s[:, :1], generator=g)):
        assert out.dtype == torch.float32
    ref = sde.mean(s.double(), t)
    assert torch.allclose(sde.mean(s, t).double(), ref, atol=1e-6)


def test_outputs_stay_on_the_signal_device(sde):
    """Times given on the CPU follow the signals to their device ('meta' stands in for a GPU)."""
    s = torch.empty(2, 2, 8, device="meta")
    t = torch.tensor([0.3, 0.5])
    for out in (sde.mean(s, t), sde.mult_std(s, t), sde.sample_marginal(s, t)[0], sde.true_score(s, s, t),
                sde.prior_sample(torch.empty(2, 1, 8, device="meta"))):
        assert out.device.type == "meta" and out.shape == (2, 2, 8)


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("K", [2, 3, 5])
def test_project_mean_is_the_source_average(K):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, K, 7, generator=g, dtype=torch.float64)  # batch 4 != K
    p = MixingSDE.project_mean(x)
    assert p.shape == x.shape
    for k in range(K):
        assert torch.allclose(p[:, k], x.sum(1) / K, atol=1e-14)
    assert torch.allclose(MixingSDE.project_mean(p), p, atol=1e-14)  # a projector
    assert torch.allclose(MixingSDE.project_mean(x - p), torch.zeros_like(x), atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("K", [2, 3])
def test_mean_and_eigenvalues_closed_form_any_gamma(gamma, K):
    """mu_t = (1 - e^{-gamma t}) sbar + e^{-gamma t} s and the lambdas in plain float64 math;
    gamma = 0 (no mixing drift) is allowed: then Sigma_t is isotropic and mu_t = s."""
    sde = MixingSDE(num_sources=K, gamma=gamma, sigma_min=0.05, sigma_max=0.5)
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, K, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    mu = sde.mean(s, t)
    lam1, lam2 = sde.eigenvalues(t)
    for b, tb in enumerate(t.tolist()):
        e = math.exp(-gamma * tb)
        close(mu[b], (1 - e) * s[b].mean(0, keepdim=True) + e * s[b], rtol=1e-13, atol=1e-14)
        r2 = 10.0 ** (2 * tb)  # rho = 10
        close(lam1[b], 0.05**2 * (r2 - 1))
        close(lam2[b], 0.05**2 * (r2 - math.exp(-2 * gamma * tb)) / (1 + gamma / math.log(10.0)))
        close(sde.diffusion(t)[b], 0.05 * 10.0**tb * math.sqrt(2 * math.log(10.0)))
    if gamma == 0.0:
        assert torch.allclose(mu, s, atol=1e-15) and torch.allclose(lam1, lam2, rtol=1e-13)
        assert torch.equal(sde.drift(s), torch.zeros_like(s))


@pytest.mark.parametrize("T", [0.7, 1.0])
def test_prior_sample_at_final_time_closed_form(T):
    """x_T = y/K + L_T z with L_T from float64 math at the SDE's own T (not a float32-rounded T)."""
    K = 3
    sde = MixingSDE(num_sources=K, T=T)
    g = torch.Generator().manual_seed(8)
    y = torch.randn(2, 1, 6, generator=g, dtype=torch.float64)
    z = torch.randn(2, K, 6, generator=g, dtype=torch.float64)
    lam1 = 0.05**2 * (10.0 ** (2 * T) - 1)
    lam2 = 0.05**2 * (10.0 ** (2 * T) - math.exp(-4 * T)) / (1 + 2 / math.log(10.0))
    zbar = z.mean(1, keepdim=True)
    expected = y / K + math.sqrt(lam1) * zbar + math.sqrt(lam2) * (z - zbar)
    close(sde.prior_sample(y, z=z), expected, rtol=1e-13, atol=1e-15)


def test_seeded_draws_use_the_generator(sde):
    """With generator=, z is torch.randn(shape, generator, dtype) and x = mean + L z."""
    s = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t = torch.tensor([0.4, 0.8], dtype=torch.float64)
    x, z = sde.sample_marginal(s, t, generator=torch.Generator().manual_seed(10))
    z_ref = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert torch.equal(z, z_ref)
    assert torch.allclose(x, sde.mean(s, t) + sde.mult_std(z_ref, t), atol=1e-15)
    y = s.sum(1, keepdim=True)
    xT = sde.prior_sample(y, generator=torch.Generator().manual_seed(11))
    zT = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.allclose(xT, sde.prior_sample(y, z=zT), atol=1e-15)


# ---------------------------------------------------------------------------- enhancement SDE
@pytest.fixture
def prior_setup():
    sde = PriorMixingSDE(num_sources=2)
    g = torch.Generator().manual_seed(12)
    y = torch.randn(2, 1, 600, generator=g, dtype=torch.float64)
    y[:, :, 300:] *= 0.01  # a quiet half: the envelope is far from constant
    s = torch.randn(2, 2, 600, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 600, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    return sde, y, s, x, t


def test_prior_mixing_covariance_is_envelope_scaled(prior_setup):
    sde, y, s, x, t = prior_setup
    base = MixingSDE(num_sources=2)
    env = sde.envelope(y)
    assert torch.allclose(sde.mult_cov(x, t, y=y), base.mult_cov(x, t) * env**2, atol=1e-14)
    assert torch.allclose(sde.mult_cov_inv(x, t, y=y), base.mult_cov_inv(x, t) / env**2, rtol=1e-12)
    assert torch.allclose(sde.mult_cov(x, t, y=y), sde.mult_std(sde.mult_std(x, t, y=y), t, y=y), atol=1e-14)
    assert torch.allclose(sde.mult_cov_inv(sde.mult_cov(x, t, y=y), t, y=y), x, atol=1e-9)


def test_prior_mixing_true_score_is_minus_inverse_std_noise(prior_setup):
    """x_t = mu_t + e * L_t z, so the score -Sigma^{-1}(x_t - mu_t) is -L_t^{-1} z / e."""
    sde, y, s, _, t = prior_setup
    base = MixingSDE(num_sources=2)
    x_t, z = sde.sample_marginal(s, t, generator=torch.Generator().manual_seed(13), y=y)
    z_ref = torch.randn(2, 2, 600, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    assert torch.equal(z, z_ref)
    expected = -base.mult_std_inv(z, t) / sde.envelope(y)
    assert torch.allclose(sde.true_score(x_t, s, t, y=y), expected, rtol=1e-9, atol=1e-9)


def test_prior_mixing_diffusion(prior_setup):
    sde, y, _, _, t = prior_setup
    from speechbrain_diffsep.sde import diffusion_of

    g = MixingSDE(num_sources=2).diffusion(t)
    assert torch.equal(sde.diffusion(t), g)  # without y: plain g(t)
    full = sde.diffusion(t, y=y)
    assert torch.allclose(full, g[:, None, None] * sde.envelope(y), rtol=1e-14)
    assert torch.equal(diffusion_of(sde, t, y), full)
    # float32 mixtures get float32 diffusion, whatever the dtype of t
    y32 = y.float()
    assert sde.diffusion(t, y=y32).dtype == torch.float32
    out = diffusion_of(MixingSDE(num_sources=2), t, y32)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 1)
    assert torch.allclose(out.flatten().double(), g, rtol=1e-6)


def test_prior_mixing_envelope_floor_and_edges():
    """Silence sits at the floor 0.5 * sqrt(1e-4); a constant c gives 0.5 |c| inside and the
    zero-padded average at the edges (255 of 510 samples at n = 0, 256 at the last sample)."""
    sde = PriorMixingSDE(num_sources=2)
    assert torch.allclose(sde.envelope(torch.zeros(1, 1, 100)), torch.full((1, 1, 100), 0.005))
    c = 3.0
    env = sde.envelope(torch.full((1, 1, 1200), c, dtype=torch.float64))[0, 0]
    assert float(env[600]) == pytest.approx(0.5 * c, rel=1e-12)
    assert float(env[0]) == pytest.approx(0.5 * c * math.sqrt(255 / 510), rel=1e-12)
    assert float(env[-1]) == pytest.approx(0.5 * c * math.sqrt(256 / 510), rel=1e-12)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda sde, s, t: sde.mult_std(s, t), "PriorMixingSDE needs the mixture: pass y=(batch, 1, samples)"),
        (lambda sde, s, t: sde.mult_cov(s, t), "PriorMixingSDE needs the mixture: pass y=(batch, 1, samples)"),
        (lambda sde, s, t: sde.sample_marginal(s, t),
         "PriorMixingSDE.sample_marginal needs the mixture y=(batch, 1, samples)"),
        (lambda sde, s, t: sde.true_score(s, s, t), "PriorMixingSDE.true_score needs the mixture y=(batch, 1, samples)"),
    ],
)
def test_prior_mixing_needs_the_mixture(call, msg):
    with pytest.raises(ValueError) as e:
        call(PriorMixingSDE(num_sources=2), torch.zeros(1, 2, 8), torch.ones(1))
    assert str(e.value) == msg
