"""Reverse-process samplers for DiffSep, each a small function of (score_fn, sde, y).

Every sampler has the signature ``f(score_fn, sde, y, num_steps=..., generator=None, **opts)`` and
returns ``(estimate, nfe)``: the separated sources shaped (batch, K, samples), in the domain of
``y``, and the number of network calls made. ``score_fn(x, t, y)`` returns the score of the
marginal at ``x`` (t shaped (batch,)). The registry :data:`SAMPLERS` maps names to functions.

Samplers:

- ``"pc"``: the paper's predictor-corrector sampler (reverse-diffusion predictor + annealed
  Langevin corrector preconditioned by Sigma_t, "ald2"). ``dt="reference"`` reproduces the authors'
  code exactly (it always steps by 1/N); the default ``dt="grid"`` steps by the grid spacing.
- ``"em"``: Euler-Maruyama on the reverse SDE (the predictor alone).
- ``"ode"``: the probability-flow ODE with Heun's 2nd-order method.
- ``"edm"``: EDM's stochastic sampler (Karras et al. 2022, Alg. 2) adapted to this SDE: before each
  Heun step the state is moved forward in time by the SDE's exact transition kernel ("churn").
- ``"ddim"``: deterministic DDIM-style steps, exact for a perfect denoiser; ``num_steps=1`` is one
  denoiser call at T.

The prior mismatch: the sampling prior ``y/K + L_T z`` lacks the ``e^{-gamma T} Pbar s`` part of the
true mean at T. A sampler that starts there carries the offset along as if it were noise, into states
a network trained on the forward marginals never saw; with many steps the estimates re-mix
(measured on the bundled small model: 10.6 dB at 1 call, 2.0 dB at 61 with "ode"). Every sampler
takes ``restart_t=`` (e.g. 0.5): one denoiser call at T, then fresh noise around that estimate on the
true marginal at ``restart_t``, and the sampler's grid from there (NFE + 1). The mismatch-aware loss
(``precond.denoiser_loss(mismatch_p=...)``) and the flow-matching objective (:mod:`.flow`, whose
prior has no offset) remove the offset in principle, but measured at this project's CPU training
budgets both still degrade with many deterministic steps, and the restart helps them too
(``benchmarks/results/prior_mismatch``).

All samplers can start at ``t_start < T`` from the marginal around an initial estimate
(``init=...``, the "refiner" mode of StoRM / Fast-GeCo), and can finish with one Tweedie
denoising call (``denoise_final=True``). These are written here because the SDE (a mixing drift
with a matrix-valued covariance) is not covered by k-diffusion or diffusers' schedulers.
"""

import math

import torch

from .flow import FLOW_SAMPLERS, SeparationFlow
from .sde import PriorMixingSDE, diffusion_of


# --------------------------------------------------------------------------- schedules
def time_schedule(num_steps, t_start, t_end, kind="linear", rho=2.0, dtype=torch.float64, device=None):
    """Decreasing diffusion times ``t_0 = t_start > ... > t_{N-1} = t_end``.

    ``kind="linear"`` is the paper's grid; ``kind="power"`` is denser near ``t_end``
    (``t_i = (a + i/(N-1) (b - a))^rho`` with ``a = t_start^(1/rho)``, ``b = t_end^(1/rho)``,
    EDM's schedule in the t variable).

    Example
    -------
    >>> time_schedule(4, 1.0, 0.1).tolist()
    [1.0, 0.7, 0.4, 0.1]
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if not t_start > t_end > 0:
        raise ValueError(f"need t_start > t_end > 0, got t_start={t_start}, t_end={t_end}")
    if num_steps == 1:
        return torch.tensor([float(t_start)], dtype=dtype, device=device)
    if kind == "linear":
        return torch.linspace(t_start, t_end, num_steps, dtype=dtype, device=device)
    if kind == "power":
        a, b = t_start ** (1.0 / rho), t_end ** (1.0 / rho)
        u = torch.linspace(0.0, 1.0, num_steps, dtype=dtype, device=device)
        return (a + u * (b - a)) ** rho
    raise ValueError(f"unknown schedule kind {kind!r}; use 'linear' or 'power'")


def _batch_t(t, x):
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _randn(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _check_y(sde, y):
    if isinstance(sde, SeparationFlow):
        raise ValueError(
            "this is a flow-matching model (SeparationFlow): use the samplers euler, heun or midpoint; "
            "pc, em, ode, edm and ddim integrate DiffSep's SDE"
        )
    if not torch.is_tensor(y) or y.dim() != 3 or y.shape[1] != 1:
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y (the mixture) must be shaped (batch, 1, samples), got {shape}")
    if not torch.isfinite(y).all():
        raise ValueError("y (the mixture) contains NaN or inf samples; clean the input first")


# --------------------------------------------------------------------------- single steps
def reverse_diffusion_step(x, score, sde, t, dt, y, z=None):
    """Reverse-diffusion (Euler-Maruyama) predictor step from ``t`` to ``t - dt``.

    ``x_mean = x - (f dt - G^2 score)`` with ``G = g(t) sqrt(dt)``; ``x = x_mean + G z``.
    Returns ``(x, x_mean)``.
    """
    tb = _batch_t(t, x)
    g = diffusion_of(sde, tb, y)
    x_mean = x - (sde.drift(x) * dt - g**2 * dt * score)
    if z is None:
        return x_mean, x_mean
    return x_mean + g * math.sqrt(dt) * z, x_mean


def langevin_corrector_step(x, score, sde, t, snr, y, z=None):
    """Annealed Langevin step preconditioned by Sigma_t (the reference's "ald2").

    ``x_mean = x + 2 r^2 Sigma_t score``; ``x = x_mean + 2 r L_t z``. Returns ``(x, x_mean)``.
    """
    tb = _batch_t(t, x)
    x_mean = x + 2.0 * snr**2 * sde.mult_cov(score, tb, y=y)
    if z is None:
        return x_mean, x_mean
    return x_mean + 2.0 * snr * sde.mult_std(z, tb, y=y), x_mean


def forward_transition(x, sde, t_from, t_to, y, generator=None):
    """Sample ``x_{t_to} | x_{t_from}`` from the forward SDE's exact Gaussian transition.

    Mean ``(P + e^{-gamma d} Pbar) x`` with ``d = t_to - t_from``; covariance with eigenvalues
    ``lambda_1(t_to) - lambda_1(t_from)`` and ``lambda_2(t_to) - e^{-2 gamma d} lambda_2(t_from)``
    (times the envelope for :class:`PriorMixingSDE`).
    """
    d = t_to - t_from
    if d < 0:
        raise ValueError("forward_transition needs t_to >= t_from")
    decay = math.exp(-sde.gamma * d)
    m = x.mean(dim=1, keepdim=True)
    mean = m + decay * (x - m)
    l1a, l2a = sde.eigenvalues(torch.tensor([t_from], dtype=torch.float64))
    l1b, l2b = sde.eigenvalues(torch.tensor([t_to], dtype=torch.float64))
    # 0-dim host tensors used as scalars, not float(): no read-back per step
    v1 = (l1b - l1a).clamp(min=0).sqrt()[0]
    v2 = (l2b - decay**2 * l2a).clamp(min=0).sqrt()[0]
    z = _randn(x, generator)
    zm = z.mean(dim=1, keepdim=True)
    noise = v1 * zm + v2 * (z - zm)
    if isinstance(sde, PriorMixingSDE):
        noise = noise * sde.envelope(y)
    return mean + noise


def ode_velocity(x, score, sde, t, y):
    """Probability-flow ODE velocity ``dx/dt = f(x) - g(t)^2 score / 2``."""
    g = diffusion_of(sde, _batch_t(t, x), y)
    return sde.drift(x) - 0.5 * g**2 * score


def heun_step(x, score_fn, sde, t_cur, t_next, y):
    """One Heun (2nd-order) step of the probability-flow ODE from ``t_cur`` to ``t_next`` (2 calls)."""
    h = t_next - t_cur
    d = ode_velocity(x, score_fn(x, _batch_t(t_cur, x), y), sde, t_cur, y)
    x_euler = x + h * d
    d2 = ode_velocity(x_euler, score_fn(x_euler, _batch_t(t_next, x), y), sde, t_next, y)
    return x + h * 0.5 * (d + d2)


def tweedie_denoise(x, score, sde, t, y):
    """Posterior mean of the sources given ``x_t`` (one network call, Tweedie's formula).

    ``E[mu_t | x_t] = x_t + Sigma_t score``; then undo the mean map ``(P + e^{-gamma t} Pbar)``.
    """
    tb = _batch_t(t, x)
    mu = x + sde.mult_cov(score, tb, y=y)
    m = mu.mean(dim=1, keepdim=True)
    return m + math.exp(sde.gamma * float(t)) * (mu - m)


# --------------------------------------------------------------------------- start
def _check_restart(sde, restart_t):
    if restart_t is None:
        return None
    restart_t = float(restart_t)
    if not sde.t_eps < restart_t < sde.T:
        raise ValueError(
            f"restart_t must lie in (t_eps={sde.t_eps}, T={sde.T}), got {restart_t}; e.g. restart_t=0.5"
        )
    return restart_t


def _start(sde, y, generator, t_start, init, z=None, score_fn=None, restart_t=None):
    """Initial state and NFE spent: the prior at T, the marginal around ``init`` at ``t_start``
    (refiner), or with ``restart_t`` a restart from the prior.

    Restart (this project's cure for the prior mismatch, see the module docstring): draw
    ``x_T`` from the prior, estimate the sources with one call (Tweedie), then draw fresh noise
    around that estimate on the true marginal at ``restart_t`` and continue from there. The
    sampler then only meets states of the forward marginals the network was trained on, so more
    steps do not carry the prior's offset along. Returns ``(x, t0, nfe)``.
    """
    T = sde.T
    restart_t = _check_restart(sde, restart_t)
    t_start = T if t_start is None else float(t_start)
    if not sde.t_eps < t_start <= T:
        raise ValueError(f"t_start must lie in (t_eps={sde.t_eps}, T={T}], got {t_start}")
    if restart_t is not None and (init is not None or t_start != T):
        raise ValueError("restart_t starts from the prior: it cannot be combined with init / t_start (refiner mode)")
    if init is None:
        if t_start != T:
            raise ValueError("t_start < T needs an initial estimate: pass init=(batch, K, samples)")
        z = _randn(sde.prior_mean(y), generator) if z is None else z
        x = sde.prior_sample(y, z=z)
        if restart_t is None:
            return x, t_start, 0
        est = tweedie_denoise(x, score_fn(x, _batch_t(T, x), y), sde, T, y)
        x, _ = sde.sample_marginal(est, _batch_t(restart_t, y), z=_randn(est, generator), y=y)
        return x, restart_t, 1
    if init.dim() != 3 or init.shape[0] != y.shape[0] or init.shape[1] != sde.num_sources or init.shape[2] != y.shape[2]:
        raise ValueError(
            f"init must be shaped (batch, K={sde.num_sources}, samples) like y, got {tuple(init.shape)}"
        )
    init = init.to(y.dtype)
    z = _randn(init, generator) if z is None else z
    x, _ = sde.sample_marginal(init, _batch_t(t_start, y), z=z, y=y)
    return x, t_start, 0


def _finish(x, x_mean, score_fn, sde, t_last, y, nfe, denoise_final):
    if denoise_final:
        tb = _batch_t(t_last, x)
        return tweedie_denoise(x, score_fn(x, tb, y), sde, t_last, y), nfe + 1
    return x_mean, nfe


# --------------------------------------------------------------------------- samplers
def pc_sampler(
    score_fn,
    sde,
    y,
    num_steps=30,
    corrector_steps=1,
    snr=0.5,
    generator=None,
    dt="grid",
    schedule="linear",
    t_start=None,
    init=None,
    denoise_final=False,
    restart_t=None,
):
    """The paper's predictor-corrector sampler (60 network calls at the defaults).

    At each ``t_i`` of ``time_schedule(num_steps, T, t_eps)``: ``corrector_steps`` annealed
    Langevin steps, then one reverse-diffusion predictor step. Returns the noise-free ``x_mean``
    of the last predictor step and the NFE. Noise is drawn from ``generator`` in the order of the
    reference: prior, then per step the corrector noise(s) and the predictor noise (the last,
    unused predictor noise is not drawn).

    Arguments
    ---------
    dt : "grid" | "reference" | float
        Predictor step: the grid spacing (default; the last step goes from t_eps to 0), the
        reference's constant ``1/num_steps``, or a fixed number.

    Example
    -------
    >>> from speechbrain_diffsep.sde import MixingSDE
    >>> sde = MixingSDE()
    >>> y = torch.randn(1, 1, 64)
    >>> est, nfe = pc_sampler(lambda x, t, y: torch.zeros_like(x), sde, y, num_steps=5)
    >>> est.shape, nfe
    (torch.Size([1, 2, 64]), 10)
    """
    _check_y(sde, y)
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    x, t0, nfe = _start(sde, y, generator, t_start, init, score_fn=score_fn, restart_t=restart_t)
    ts = time_schedule(num_steps, t0, sde.t_eps, kind=schedule).tolist()
    x_mean = x
    for i, t in enumerate(ts):
        tb = _batch_t(t, x)
        for _ in range(corrector_steps):
            x, x_mean = langevin_corrector_step(x, score_fn(x, tb, y), sde, t, snr, y, _randn(x, generator))
            nfe += 1
        if dt == "reference":
            step = 1.0 / num_steps
        elif dt == "grid":
            # from t_i to t_{i+1}; the last step goes from t_eps to 0
            step = ts[i] - ts[i + 1] if i + 1 < len(ts) else ts[-1]
        else:
            step = float(dt)
        last = i == len(ts) - 1
        z = None if last else _randn(x, generator)
        x, x_mean = reverse_diffusion_step(x, score_fn(x, tb, y), sde, t, step, y, z)
        nfe += 1
    return _finish(x, x_mean, score_fn, sde, ts[-1], y, nfe, denoise_final)


def euler_maruyama_sampler(score_fn, sde, y, num_steps=30, generator=None, **opts):
    """Euler-Maruyama on the reverse SDE: the PC sampler without corrector (NFE = num_steps)."""
    return pc_sampler(score_fn, sde, y, num_steps=num_steps, corrector_steps=0, generator=generator, **opts)


def ode_sampler(
    score_fn, sde, y, num_steps=10, generator=None, schedule="power", t_start=None, init=None, denoise_final=True,
    restart_t=None,
):
    """Probability-flow ODE, Heun's method on ``num_steps`` grid points (2 calls per interval).

    The only randomness is the prior draw. NFE = 2 (max(num_steps, 2) - 1) (+1 with ``denoise_final``,
    +1 with ``restart_t``): a grid has at least 2 points.
    """
    _check_y(sde, y)
    x, t0, nfe = _start(sde, y, generator, t_start, init, score_fn=score_fn, restart_t=restart_t)
    ts = time_schedule(max(num_steps, 2), t0, sde.t_eps, kind=schedule).tolist()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = heun_step(x, score_fn, sde, t_cur, t_next, y)
        nfe += 2
    return _finish(x, x, score_fn, sde, ts[-1], y, nfe, denoise_final)


def edm_sampler(
    score_fn,
    sde,
    y,
    num_steps=10,
    generator=None,
    churn=0.4,
    schedule="power",
    t_start=None,
    init=None,
    denoise_final=True,
    restart_t=None,
):
    """EDM's stochastic Heun sampler with "churn" adapted to the mixing SDE.

    Each interval ``t_i -> t_{i+1}``: move forward to ``t_hat = min(T, t_i (1 + churn/N))`` with the
    exact forward transition (fresh noise), then one Heun step of the probability-flow ODE to
    ``t_{i+1}``. NFE = 2 (max(num_steps, 2) - 1) (+1 with ``denoise_final``, +1 with ``restart_t``).
    """
    _check_y(sde, y)
    x, t0, nfe = _start(sde, y, generator, t_start, init, score_fn=score_fn, restart_t=restart_t)
    ts = time_schedule(max(num_steps, 2), t0, sde.t_eps, kind=schedule).tolist()
    n = len(ts) - 1
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t_hat = min(sde.T, t_cur * (1.0 + churn / n))
        if t_hat > t_cur:
            x = forward_transition(x, sde, t_cur, t_hat, y, generator)
        x = heun_step(x, score_fn, sde, t_hat, t_next, y)
        nfe += 2
    return _finish(x, x, score_fn, sde, ts[-1], y, nfe, denoise_final)


def ddim_step(x, est, sde, t_cur, t_next, y):
    """Deterministic step from ``t_cur`` to ``t_next`` that is exact for a perfect denoiser.

    ``x' = mu_{t'}(D) + R (x - mu_t(D))`` with ``R = sqrt(l1(t')/l1(t)) P + sqrt(l2(t')/l2(t)) Pbar``:
    the residual ``x - mu_t(D)`` is taken as the noise and shrunk per eigen-subspace (DDIM's
    eta = 0 step, Song et al. 2021, written for the mixing SDE's matrix covariance).
    """
    l1a, l2a = sde.eigenvalues(torch.tensor([t_cur], dtype=torch.float64))
    l1b, l2b = sde.eigenvalues(torch.tensor([t_next], dtype=torch.float64))
    r1, r2 = (l1b / l1a).sqrt()[0], (l2b / l2a).sqrt()[0]  # 0-dim host tensors, not float(): no read-back
    resid = x - sde.mean(est, _batch_t(t_cur, x))
    m = resid.mean(dim=1, keepdim=True)
    return sde.mean(est, _batch_t(t_next, x)) + r1 * m + r2 * (resid - m)


def ddim_sampler(
    score_fn, sde, y, num_steps=5, generator=None, schedule="power", t_start=None, init=None, restart_t=None
):
    """DDIM (eta = 0): one denoiser call per grid point, :func:`ddim_step` between them.

    NFE = ``num_steps`` (+1 with ``restart_t``); ``num_steps=1`` is a single denoiser call
    ``D(x_T)`` (Tweedie's estimate at T). Returns the last denoised estimate.
    """
    _check_y(sde, y)
    x, t0, nfe = _start(sde, y, generator, t_start, init, score_fn=score_fn, restart_t=restart_t)
    ts = time_schedule(num_steps, t0, sde.t_eps, kind=schedule).tolist()
    est = x
    for i, t in enumerate(ts):
        est = tweedie_denoise(x, score_fn(x, _batch_t(t, x), y), sde, t, y)
        nfe += 1
        if i + 1 < len(ts):
            x = ddim_step(x, est, sde, t, ts[i + 1], y)
    return est, nfe


SDE_SAMPLERS = {
    "pc": pc_sampler,
    "em": euler_maruyama_sampler,
    "ode": ode_sampler,
    "edm": edm_sampler,
    "ddim": ddim_sampler,
}
"""The samplers of DiffSep's SDE (score models); :data:`.flow.FLOW_SAMPLERS` integrate a flow."""

SAMPLERS = {**SDE_SAMPLERS, **FLOW_SAMPLERS}
"""Registry of samplers: name -> ``f(score_fn, sde, y, num_steps=..., generator=None, **opts)``."""


def get_sampler(name):
    """Look a sampler up by name with a helpful error."""
    if callable(name):
        return name
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
