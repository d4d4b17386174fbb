"""Flow matching for separation (speechbrain_diffsep/flow.py): path and velocity in closed form,
mixture consistency, the loss against exact targets, samplers on Gaussian sources with the exact
velocity, and errors on bad input."""

import math

import pytest
import torch

from speechbrain_diffsep.flow import (
    FLOW_SAMPLERS,
    FlowModel,
    SeparationFlow,
    euler_sampler,
    flow_matching_loss,
)
from speechbrain_diffsep.objectives import training_loss
from speechbrain_diffsep.pipeline import separate_mixture
from speechbrain_diffsep.sampling import SAMPLERS
from speechbrain_diffsep.sde import MixingSDE
from speechbrain_diffsep.tcn import ConditionedTasNet

TINY = dict(L=8, N=16, B=8, H=16, P=3, X=2, R=2, emb_dim=8)


def _pbar(x):
    return x - x.mean(dim=1, keepdim=True)


def _sources(B=3, K=2, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, n, generator=g, dtype=torch.float64)
    return s, s.sum(1, keepdim=True)


@pytest.mark.parametrize("K", [2, 3])
def test_path_endpoints_velocity_and_mixture_part_in_closed_form(K):
    flow = SeparationFlow(num_sources=K, sigma=0.7)
    s, y = _sources(K=K)
    z = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    at = lambda t: flow.sample_path(s, torch.full((3,), t, dtype=torch.float64), y, z=z)  # noqa: E731
    x0, u, _ = at(0.0)
    assert torch.allclose(x0, s, atol=1e-12)  # t = 0: the sources
    x1, _, _ = at(1.0)
    assert torch.allclose(x1, y / K + 0.7 * _pbar(z), atol=1e-12)  # t = 1: the prior, exactly
    assert torch.allclose(x1, flow.prior_sample(y, z=z), atol=1e-12)
    assert torch.allclose(u, 0.7 * _pbar(z) - _pbar(s), atol=1e-12)
    # u is the time derivative of the path (central difference), and the path is straight
    h = 1e-4
    for t in (0.2, 0.5, 0.9):
        fd = (at(t + h)[0] - at(t - h)[0]) / (2 * h)
        assert torch.allclose(fd, u, atol=1e-8)
        assert torch.allclose(at(t)[0], (1 - t) * x0 + t * x1, atol=1e-12)
        assert torch.allclose(at(t)[0].sum(1, keepdim=True), y, atol=1e-12)  # P x_t = y/K for every t


def test_scalings_are_edms_for_the_zero_sum_part():
    flow = SeparationFlow(sigma=0.5)
    t = torch.tensor([1e-3, 0.3, 0.7, 1.0], dtype=torch.float64)
    c_skip, c_out, c_in = flow.scalings(t, 0.5)
    a, b = 1 - t, 0.5 * t
    # unit-variance input, and D = c_skip x + c_out F has the least-squares-optimal skip
    assert torch.allclose(c_in.flatten() ** 2 * (a**2 * 0.25 + b**2), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(c_skip.flatten(), a * 0.25 / (a**2 * 0.25 + b**2))
    assert torch.allclose(c_out.flatten() ** 2, b**2 * 0.25 / (a**2 * 0.25 + b**2))
    assert float(c_skip[-1]) == 0.0  # at t = 1 the network alone separates


class Capture(torch.nn.Module):
    """Returns a fixed output and records what the model fed it."""

    def __init__(self, out_fn):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out_fn = out_fn

    def forward(self, x, t, y):
        return self.out_fn(x, t, y) + 0 * self.w


@pytest.mark.parametrize("K", [2, 3])
def test_denoised_and_velocity_sum_to_the_mixture_whatever_the_network(K):
    flow = SeparationFlow(num_sources=K)
    net = Capture(lambda x, t, y: 5 * torch.randn_like(x) + 3.0)  # arbitrary, not zero-sum
    for prediction in ("data", "velocity"):
        model = FlowModel(net, flow, prediction=prediction)
        s, y = _sources(K=K)
        x = flow.sample_path(s, torch.full((3,), 0.6, dtype=torch.float64), y)[0]
        t = torch.full((3,), 0.6, dtype=torch.float64)
        assert torch.allclose(model(x, t, y, output="denoised").sum(1, keepdim=True), y, atol=1e-10)
        assert torch.allclose(model(x, t, y).sum(1), torch.zeros_like(y[:, 0]), atol=1e-10)
        for name, fn in FLOW_SAMPLERS.items():
            est, _ = fn(model, flow, y, num_steps=3, generator=torch.Generator().manual_seed(0))
            assert torch.allclose(est.sum(1, keepdim=True), y, atol=1e-9), (prediction, name)


def test_separate_mixture_keeps_the_sum_in_the_original_domain():
    flow = SeparationFlow()
    model = FlowModel(ConditionedTasNet(num_sources=2, sde=None, **TINY), flow).eval()
    mix = 0.3 * torch.randn(2, 1, 800, generator=torch.Generator().manual_seed(2)) + 0.05
    with torch.no_grad():
        est, nfe = separate_mixture(model, flow, mix, sampler="heun", num_steps=3, generator=torch.Generator())
    assert nfe == 5
    assert torch.allclose(est.sum(1, keepdim=True), mix, atol=1e-5)


def _exact_target_net(flow, s, prediction, sigma_data=0.5, swap=False):
    """A network whose output makes the model predict exactly the sources (or their velocity)."""
    target = s.flip(1) if swap else s

    def out(x_in, t, y):
        c_skip, c_out, c_in = flow.scalings(t, sigma_data)
        xb = x_in / c_in
        if prediction == "data":
            return (_pbar(target) - c_skip * xb) / c_out
        v = (xb - _pbar(target)) / t[:, None, None]
        return v / math.sqrt(flow.sigma**2 + sigma_data**2)

    return Capture(out)


@pytest.mark.parametrize("prediction", ["data", "velocity"])
def test_loss_is_zero_for_the_exact_prediction_and_catches_a_mismatched_pair(prediction):
    flow = SeparationFlow()
    s, y = _sources(B=6, n=40, seed=3)
    model = FlowModel(_exact_target_net(flow, s, prediction), flow, prediction=prediction).double()
    loss, _ = flow_matching_loss(model, flow, s, y, generator=torch.Generator().manual_seed(0), shuffle=False,
                                 pit_above=None)
    assert loss.shape == (6,) and float(loss.detach().max()) < 1e-16
    # the swapped order costs without the permutation-min and nothing with it (for every t)
    swapped = FlowModel(_exact_target_net(flow, s, prediction, swap=True), flow, prediction=prediction).double()
    plain, _ = flow_matching_loss(swapped, flow, s, y, generator=torch.Generator().manual_seed(0), shuffle=False,
                                  pit_above=None)
    assert float(plain.detach().min()) > 0.1
    pit, use_pit = flow_matching_loss(swapped, flow, s, y, generator=torch.Generator().manual_seed(0),
                                      shuffle=False, pit_above=0.0)
    assert bool(use_pit.all()) and float(pit.detach().max()) < 1e-16


def test_training_loss_dispatches_flow_and_rejects_mismatched_yaml():
    flow = SeparationFlow()
    s, y = _sources(B=4, n=64)
    model = FlowModel(ConditionedTasNet(num_sources=2, sde=None, **TINY), flow).double()
    loss, info = training_loss(model, flow, s, y, objective="flow", generator=torch.Generator().manual_seed(1))
    loss.mean().backward()
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown objective 'flw'; use one of score, denoiser, flow"):
        training_loss(model, flow, s, y, objective="flw")
    with pytest.raises(ValueError, match="objective 'flow' needs score_model"):
        training_loss(model, MixingSDE(), s, y, objective="flow")
    with pytest.raises(ValueError, match="objective 'denoiser' needs sde"):
        training_loss(model, flow, s, y, objective="denoiser")


class GaussianFlowOracle:
    """Exact velocity of the separation flow for independent Gaussian sources N(0, c_k) per sample.

    s | y ~ N(m_y, C_y) (C_y on the zero-sum subspace); x_t = ybar + (1-t) Pbar s + t sigma Pbar z, so
    E[s | x_t, y] = m_y + (1-t) C_y S_t^+ (x_t - ybar - (1-t) Pbar m_y), S_t = (1-t)^2 C_y + t^2 sigma^2 Pbar,
    and v = Pbar (x_t - E[s | x_t, y]) / t.
    """

    def __init__(self, flow, c):
        K = len(c)
        self.flow = flow
        C = torch.diag(torch.as_tensor(c, dtype=torch.float64))
        one = torch.ones(K, 1, dtype=torch.float64)
        self.gain = (C @ one / (one.T @ C @ one)).squeeze(1)
        self.C_y = C - C @ one @ one.T @ C / (one.T @ C @ one)
        self.Pb = torch.eye(K, dtype=torch.float64) - torch.full((K, K), 1.0 / K, dtype=torch.float64)

    def posterior_mean(self, y):
        return self.gain[None, :, None] * y

    def __call__(self, x, t, y):
        tt = float(t[0])
        m = self.posterior_mean(y)
        S = (1 - tt) ** 2 * self.C_y + tt**2 * self.flow.sigma**2 * self.Pb
        resid = x - self.flow.prior_mean(y) - (1 - tt) * _pbar(m)
        d = m + (1 - tt) * torch.einsum("ij,bjn->bin", self.C_y @ torch.linalg.pinv(S), resid)
        return _pbar(x - d) / tt


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_samplers_with_the_exact_velocity_converge_to_the_posterior(name):
    """From the flow's own prior (no mismatch), the ODE transports it onto p(s | y): the mean of many
    samples is E[s | y] at every step count, and the spread approaches the posterior's as steps grow
    (one Euler step is a point estimate, spread 0)."""
    flow = SeparationFlow(sigma=0.5)
    oracle = GaussianFlowOracle(flow, [1.0, 0.25])
    n = 16
    y1 = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(1.25)
    y = y1.expand(2000, 1, n).contiguous()
    target = oracle.posterior_mean(y1)[0]
    post_std = float(oracle.C_y.diagonal().sqrt().max())
    spread_err = {}
    for steps in (1, 4, 32):
        est, nfe = FLOW_SAMPLERS[name](oracle, flow, y, num_steps=steps, generator=torch.Generator().manual_seed(1))
        assert nfe == {"euler": steps, "heun": 2 * steps - 1, "midpoint": 2 * steps}[name]
        assert float((est.mean(0) - target).abs().max()) < 5 * post_std / math.sqrt(2000) + 1e-9
        spread_err[steps] = abs(float((est - target).std(0).mean()) - post_std)
    assert spread_err[32] < {"euler": 0.06, "heun": 0.01, "midpoint": 0.01}[name] * post_std, spread_err
    assert spread_err[32] < spread_err[4] <= spread_err[1] + 1e-12, spread_err


def test_refiner_start_and_bad_options():
    flow = SeparationFlow()
    s, y = _sources(B=1, n=30)
    oracle_d = lambda x, t, y: _pbar(x - s) / t[:, None, None]  # noqa: E731 (velocity towards s)
    est, nfe = euler_sampler(oracle_d, flow, y, num_steps=2, t_start=0.3, init=s + 0.1,
                             generator=torch.Generator().manual_seed(0))
    assert nfe == 2 and torch.allclose(est, s, atol=1e-10)
    with pytest.raises(ValueError, match="needs an initial estimate"):
        euler_sampler(oracle_d, flow, y, num_steps=2, t_start=0.3)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        euler_sampler(oracle_d, flow, y, num_steps=0)
    with pytest.raises(ValueError, match="need a flow-matching model"):
        SAMPLERS["heun"](oracle_d, MixingSDE(), y, num_steps=2)
    with pytest.raises(ValueError, match="use the samplers euler, heun or midpoint"):
        SAMPLERS["ode"](oracle_d, flow, y, num_steps=2)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        SeparationFlow(sigma=0.0)
    with pytest.raises(ValueError, match="prediction must be 'data' or 'velocity'"):
        FlowModel(torch.nn.Identity(), flow, prediction="eps")


def test_p_one_puts_that_share_of_examples_at_the_prior():
    flow = SeparationFlow()
    seen = []

    def out(x, t, y):
        seen.append(t.clone())
        return torch.zeros_like(x)

    model = FlowModel(Capture(out), flow).double()
    s, y = _sources(B=400, n=8)
    flow_matching_loss(model, flow, s, y, generator=torch.Generator().manual_seed(0), p_one=0.3)
    share = float((seen[-1] == 1.0).double().mean())
    assert 0.24 < share < 0.36  # 0.3 +- 3 standard errors
    flow_matching_loss(model, flow, s, y, generator=torch.Generator().manual_seed(0))
    assert float((seen[-1] == 1.0).double().mean()) == 0.0
    with pytest.raises(ValueError, match="p_one must be a probability"):
        flow_matching_loss(model, flow, s, y, p_one=2.0)


def test_ncsnpp_is_a_flow_network_too():
    """The paper's NCSN++ (ScoreModel, scale_by_sigma off) as the flow model's network: output shapes,
    mixture consistency of the sampler's estimate, gradients from the flow loss."""
    from speechbrain_diffsep.ncsnpp import ScoreModel

    flow = SeparationFlow()
    net = ScoreModel(num_sources=2, nf=16, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), scale_by_sigma=False)
    model = FlowModel(net, flow)
    s, y = _sources(B=2, n=1024)
    s, y = s.float(), y.float()
    loss, _ = flow_matching_loss(model, flow, s, y, generator=torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with torch.no_grad():
        est, nfe = FLOW_SAMPLERS["heun"](model, flow, y, num_steps=2, generator=torch.Generator().manual_seed(1))
    assert nfe == 3 and est.shape == (2, 2, 1024)
    assert torch.allclose(est.sum(1, keepdim=True), y, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_flow_restart_costs_one_call_and_lands_on_the_estimate(name):
    """restart_t on a flow: one call at t = 1, then the path from restart_t around that estimate; with a
    velocity field that points at fixed sources the result is those sources; bad values are errors."""
    flow = SeparationFlow()
    s, y = _sources(B=2, n=30)
    calls = []

    def towards_s(x, t, y):
        calls.append(float(t[0]))
        return _pbar(x - s) / t[:, None, None]

    est, nfe = FLOW_SAMPLERS[name](towards_s, flow, y, num_steps=3, restart_t=0.4, generator=torch.Generator())
    _, base = FLOW_SAMPLERS[name](lambda x, t, y: _pbar(x - s) / t[:, None, None], flow, y, num_steps=3)
    assert nfe == base + 1 == len(calls) and calls[0] == 1.0 and max(calls[1:]) <= 0.4 + 1e-9
    assert torch.allclose(est, s, atol=1e-9)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"restart_t must lie in \(0, 1\) for a flow"):
            FLOW_SAMPLERS[name](towards_s, flow, y, num_steps=2, restart_t=bad)
