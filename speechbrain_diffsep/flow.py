"""Flow matching for source separation, after FLOSS (Scheibler, Hershey, Doucet, Li, WASPAA 2025).

A mismatch-free alternative to the mixing SDE. With ``P`` the average over sources, ``Pbar = I - P``
and ``ybar = y / K`` for every source (``P s = ybar``: the sources sum to the mixture), the path from
the sources (t = 0) to the prior (t = 1) is the straight line::

    x_1 = ybar + sigma Pbar z                          (the prior: mixture part fixed, noise only
                                                        in the zero-sum subspace)
    x_t = (1 - t) s + t x_1 = ybar + (1 - t) Pbar s + t sigma Pbar z
    u   = dx_t/dt = x_1 - s = sigma Pbar z - Pbar s    (the conditional velocity)

At t = 1 the path's marginal *is* the prior, so sampling starts exactly where training ended (no
"model mismatch" as in DiffSep, whose prior lacks ``e^{-gamma T} Pbar s``); and ``P x_t = ybar`` for
every t, so every state and every estimate sums to the mixture by construction.

The network predicts the sources through EDM-style scalings of the zero-sum part
``Pbar x_t = a s' + b n`` with ``a = 1 - t``, ``b = t sigma``, ``s' = Pbar s`` (std ``sigma_data``)::

    D(x, t, y) = ybar + c_skip Pbar x + c_out Pbar F(c_in Pbar x, t, y)
    c_in = 1 / sqrt(a^2 sd^2 + b^2),  c_skip = a sd^2 / (a^2 sd^2 + b^2),  c_out = b sd / sqrt(a^2 sd^2 + b^2)

(at t = 1: ``c_skip = 0``, the network alone separates the mixture). The velocity follows from it,
``v = (x - D) / t``; with ``prediction="velocity"`` the network predicts ``v`` itself instead
(``v = Pbar F(c_in Pbar x, t, y) * sqrt(sigma^2 + sd^2)``, unit-variance target) and ``D = x - t v``.
Written here because no maintained library has this path (the separation-specific prior and the
zero-sum noise); the samplers are small functions of ``(model, flow, y)`` like k-diffusion's. They
take ``restart_t=`` like the SDE samplers: a flow has no prior mismatch, but a briefly trained one
still degrades with many Euler steps (its early estimates are carried along), and the restart
(one call at t = 1, fresh noise around that estimate at ``restart_t``) helps it the same way.
"""

from itertools import permutations

import torch

from .losses import sample_time, shuffle_sources
from .sde import _check_mixture


def _pbar(x):
    return x - x.mean(dim=1, keepdim=True)


class SeparationFlow:
    """The straight separation path between the sources and the mixture-consistent prior.

    It takes the place of the SDE in the yamls (``sde: !new:speechbrain_diffsep.flow.SeparationFlow``)
    and is what the flow samplers and the flow loss need.

    Arguments
    ---------
    num_sources : int
        Number of sources K (>= 2).
    sigma : float
        Std of the prior's noise in the zero-sum subspace (normalized signals: the sources'
        zero-sum part has std about 0.5).
    t_eps : float
        Smallest training time (the loss weight grows as t -> 0).

    Example
    -------
    >>> flow = SeparationFlow(num_sources=2)
    >>> s = torch.randn(3, 2, 100); y = s.sum(1, keepdim=True)
    >>> x = flow.sample_path(s, torch.full((3,), 0.5), y)[0]
    >>> torch.allclose(x.sum(1, keepdim=True), y, atol=1e-5)
    True
    """

    T = 1.0

    def __init__(self, num_sources=2, sigma=0.5, t_eps=1e-3):
        if int(num_sources) != num_sources or num_sources < 2:
            raise ValueError(f"num_sources must be an integer >= 2, got {num_sources}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not 0 < t_eps < 1:
            raise ValueError(f"need 0 < t_eps < 1, got t_eps={t_eps}")
        self.num_sources = int(num_sources)
        self.sigma = float(sigma)
        self.t_eps = float(t_eps)

    def __repr__(self):
        return f"SeparationFlow(num_sources={self.num_sources}, sigma={self.sigma}, t_eps={self.t_eps})"

    def prior_mean(self, y):
        """``ybar``: the mixture divided by K, for every source."""
        _check_mixture(y)
        return (y / self.num_sources).expand(-1, self.num_sources, -1)

    def prior_sample(self, y, generator=None, z=None):
        """``x_1 = ybar + sigma Pbar z``."""
        mean = self.prior_mean(y)
        if z is None:
            z = torch.randn(mean.shape, generator=generator, dtype=y.dtype, device=y.device)
        return mean + self.sigma * _pbar(z)

    def sample_path(self, s, t, y, generator=None, z=None):
        """``x_t = ybar + (1 - t) Pbar s + t sigma Pbar z`` and the conditional velocity
        ``u = sigma Pbar z - Pbar s``; returns ``(x_t, u, z)``."""
        if s.dim() != 3 or s.shape[1] != self.num_sources:
            raise ValueError(f"s must be shaped (batch, K={self.num_sources}, samples), got {tuple(s.shape)}")
        if z is None:
            z = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
        tb = t.to(s.dtype)[:, None, None]
        noise, sb = self.sigma * _pbar(z), _pbar(s)
        # P x_t = ybar exactly (also where the normalized sources sum to y only up to rounding)
        return self.prior_mean(y) + (1 - tb) * sb + tb * noise, noise - sb, z

    def scalings(self, t, sigma_data):
        """``(c_skip, c_out, c_in)`` of the zero-sum part, each shaped (batch, 1, 1)."""
        a, b = 1 - t, t * self.sigma
        norm2 = a**2 * sigma_data**2 + b**2
        shape = (-1, 1, 1)
        return (
            (a * sigma_data**2 / norm2).view(shape),
            (b * sigma_data / norm2.sqrt()).view(shape),
            (1 / norm2.sqrt()).view(shape),
        )


class FlowModel(torch.nn.Module):
    """Wraps a network ``F(x_in (B,K,n), t (B,), y (B,1,n))`` into a source denoiser and a velocity.

    ``forward(x, t, y)`` returns the velocity ``dx/dt`` (what the flow samplers integrate, from
    t = 1 down to 0); ``output="denoised"`` returns the source estimate ``D``. Both sum to the
    mixture (``P D = ybar``, ``P v = 0``) whatever the network outputs.

    Arguments
    ---------
    net : torch.nn.Module
        The network (e.g. :class:`~speechbrain_diffsep.tcn.ConditionedTasNet` with ``sde=None``,
        which conditions on t).
    flow : SeparationFlow
    sigma_data : float
        Std of the zero-sum part of the normalized sources.
    prediction : str
        ``"data"`` (the network predicts the sources, EDM scalings) or ``"velocity"``.

    Example
    -------
    >>> class Zero(torch.nn.Module):
    ...     def forward(self, x, t, y):
    ...         return torch.zeros_like(x)
    >>> m = FlowModel(Zero(), SeparationFlow())
    >>> y = torch.randn(1, 1, 16); x = torch.randn(1, 2, 16)
    >>> m(x, torch.tensor([0.5]), y).shape
    torch.Size([1, 2, 16])
    """

    def __init__(self, net, flow=None, sigma_data=0.5, prediction="data"):
        super().__init__()
        if prediction not in ("data", "velocity"):
            raise ValueError(f"prediction must be 'data' or 'velocity', got {prediction!r}")
        self.net = net
        flow = flow if flow is not None else SeparationFlow()
        self.flow = SeparationFlow(num_sources=flow.num_sources, sigma=flow.sigma, t_eps=flow.t_eps)
        self.sigma_data = float(sigma_data)
        self.prediction = prediction

    def _raw(self, x, t, y):
        """The network's zero-sum output and the scalings."""
        t = t.to(x.dtype)
        c_skip, c_out, c_in = self.flow.scalings(t, self.sigma_data)
        xb = _pbar(x)
        f = _pbar(self.net(c_in * xb, t, y).to(x.dtype))
        return xb, f, c_skip, c_out

    def denoise(self, x, t, y):
        """Estimate of the sources ``E[s | x_t, y]`` (sums to ``y``)."""
        xb, f, c_skip, c_out = self._raw(x, t, y)
        ybar = self.flow.prior_mean(y)
        if self.prediction == "data":
            return ybar + c_skip * xb + c_out * f
        v = f * (self.flow.sigma**2 + self.sigma_data**2) ** 0.5
        return ybar + xb - t.to(x.dtype)[:, None, None] * v

    def velocity(self, x, t, y):
        """``v = (x - D) / t`` on the zero-sum part (``P v = 0``)."""
        xb, f, c_skip, c_out = self._raw(x, t, y)
        if self.prediction == "velocity":
            return f * (self.flow.sigma**2 + self.sigma_data**2) ** 0.5
        d = c_skip * xb + c_out * f
        return (xb - d) / t.to(x.dtype)[:, None, None]

    def forward(self, x, t, y, output="velocity"):
        if output == "velocity":
            return self.velocity(x, t, y)
        if output == "denoised":
            return self.denoise(x, t, y)
        raise ValueError(f"output must be 'velocity' or 'denoised', got {output!r}")


# --------------------------------------------------------------------------- loss
def flow_matching_loss(
    model, flow, s, y, generator=None, shuffle=True, pit_above=0.5, t_sampling="uniform", t_power=1.0, p_one=0.0
):
    """Conditional flow-matching loss, with the permutation-min where the source order is ambiguous.

    Per example: ``t ~ U[t_eps, 1]`` (``t_sampling="power"``: ``t_eps + (1 - t_eps) u^(1/t_power)``,
    more weight near 1), and with probability ``p_one`` exactly ``t = 1`` (the prior, where the
    network alone separates: the counterpart of DiffSep's p_T share), ``x_t`` on the path. Data prediction: ``|Pbar (D - s)|^2 / c_out^2`` (EDM's
    weighting, unit-variance regression target for F); velocity prediction:
    ``|v - (x_t - s)/t|^2 / (sigma^2 + sd^2)``. For ``t >= pit_above`` the minimum over source
    permutations of the target (``None``: never). Returns ``(loss (batch,), use_pit (batch,))``.
    """
    inner = getattr(model, "module", model)  # DDP wraps the model in .module
    if not isinstance(inner, FlowModel):
        raise ValueError(
            "objective 'flow' needs a speechbrain_diffsep.flow.FlowModel as score_model (and a SeparationFlow as sde)"
        )
    if not isinstance(flow, SeparationFlow):
        raise ValueError(f"objective 'flow' needs sde: a speechbrain_diffsep.flow.SeparationFlow, got {type(flow).__name__}")
    _check_mixture(y)
    B, dev, dt = s.shape[0], s.device, s.dtype
    if shuffle:
        s = shuffle_sources(s, generator)
    t = sample_time(B, flow, generator, dtype=dt, device=dev, kind=t_sampling, power=t_power)  # in [t_eps, 1]
    if not 0.0 <= p_one <= 1.0:
        raise ValueError(f"p_one must be a probability in [0, 1], got {p_one}")
    if p_one > 0:
        t = torch.where(torch.rand(B, generator=generator, device=dev) < p_one, torch.ones_like(t), t)
    x, _, _ = flow.sample_path(s, t, y, generator=generator)
    out = model(x, t, y, output="velocity" if inner.prediction == "velocity" else "denoised")
    tb = t[:, None, None]
    if inner.prediction == "data":
        weight = inner.flow.scalings(t, inner.sigma_data)[1] ** -2
    else:
        weight = torch.full_like(tb, 1.0 / (flow.sigma**2 + inner.sigma_data**2))
    use_pit = torch.zeros(B, dtype=torch.bool, device=dev) if pit_above is None else t >= pit_above
    perms = list(permutations(range(flow.num_sources))) if bool(use_pit.any()) else [tuple(range(flow.num_sources))]
    per_perm = []
    for perm in perms:
        target = s[:, list(perm)]
        if inner.prediction == "velocity":
            target = (x - target) / tb
        per_perm.append((_pbar(out - target).pow(2) * weight).mean(dim=(1, 2)))
    per_perm = torch.stack(per_perm, dim=1)
    return torch.where(use_pit, per_perm.min(dim=1).values, per_perm[:, 0]), use_pit


# --------------------------------------------------------------------------- samplers
def _check_flow(flow, y, num_steps):
    if not isinstance(flow, SeparationFlow):
        raise ValueError(
            f"the flow samplers (euler, heun, midpoint) need a flow-matching model (SeparationFlow), got "
            f"{type(flow).__name__}; use pc, em, ode, edm or ddim for DiffSep's SDE"
        )
    _check_mixture(y)
    if not torch.isfinite(y).all():
        raise ValueError("y (the mixture) contains NaN or inf samples; clean the input first")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")


def flow_start(flow, y, generator=None, t_start=None, init=None, model=None, restart_t=None):
    """Initial state, time and NFE spent: ``x_1`` from the prior; (refiner) the path's point at
    ``t_start`` around ``init``; or (``restart_t``) one call at t = 1, ``D = x_1 - v(x_1, 1)``, then
    the path's point at ``restart_t`` around ``D`` with fresh noise (as the SDE samplers' restart)."""
    if restart_t is not None:
        restart_t = float(restart_t)
        if not 0 < restart_t < 1:
            raise ValueError(f"restart_t must lie in (0, 1) for a flow, got {restart_t}; e.g. restart_t=0.5")
        if init is not None or t_start not in (None, 1, 1.0):
            raise ValueError("restart_t starts from the prior: it cannot be combined with init / t_start (refiner mode)")
        x1 = flow.prior_sample(y, generator=generator)
        est = x1 - _v(model, x1, 1.0, y)
        x, _, _ = flow_start(flow, y, generator, restart_t, est)
        return x, restart_t, 1
    if init is None:
        if t_start not in (None, 1, 1.0):
            raise ValueError("t_start < 1 needs an initial estimate: pass init=(batch, K, samples)")
        return flow.prior_sample(y, generator=generator), 1.0, 0
    t_start = float(t_start if t_start is not None else 1.0)
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must lie in (0, 1], got {t_start}")
    if init.shape != (y.shape[0], flow.num_sources, y.shape[2]):
        raise ValueError(f"init must be shaped (batch, K={flow.num_sources}, samples) like y, got {tuple(init.shape)}")
    # make the estimate sum to the mixture first (the path keeps P x = ybar)
    init = init.to(y.dtype)
    init = flow.prior_mean(y) + _pbar(init)
    tb = torch.full((y.shape[0],), t_start, dtype=y.dtype, device=y.device)
    return flow.sample_path(init, tb, y, generator=generator)[0], t_start, 0


def _grid(t0, num_steps):
    return torch.linspace(t0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


def _v(model, x, t, y):
    return model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device), y)


def euler_sampler(model, flow, y, num_steps=4, generator=None, t_start=None, init=None, restart_t=None):
    """Euler steps of ``dx/dt = v`` from t = 1 to 0; NFE = ``num_steps`` (1: one denoiser call).

    Example
    -------
    >>> flow = SeparationFlow()
    >>> y = torch.randn(1, 1, 64)
    >>> est, nfe = euler_sampler(lambda x, t, y: torch.zeros_like(x), flow, y, num_steps=3)
    >>> est.shape, nfe
    (torch.Size([1, 2, 64]), 3)
    """
    _check_flow(flow, y, num_steps)
    x, t0, nfe = flow_start(flow, y, generator, t_start, init, model, restart_t)
    ts = _grid(t0, num_steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * _v(model, x, t_cur, y)
    return x, nfe + num_steps


def heun_sampler(model, flow, y, num_steps=4, generator=None, t_start=None, init=None, restart_t=None):
    """Heun's 2nd-order method; the last step (to t = 0, where v is undefined) is Euler.

    NFE = ``2 num_steps - 1``.
    """
    _check_flow(flow, y, num_steps)
    x, t0, nfe = flow_start(flow, y, generator, t_start, init, model, restart_t)
    ts = _grid(t0, num_steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        d = _v(model, x, t_cur, y)
        x_next = x + (t_next - t_cur) * d
        nfe += 1
        if t_next > 0:
            d2 = _v(model, x_next, t_next, y)
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
            nfe += 1
        x = x_next
    return x, nfe


def midpoint_sampler(model, flow, y, num_steps=4, generator=None, t_start=None, init=None, restart_t=None):
    """The explicit midpoint method (2nd order, never evaluates at t = 0); NFE = ``2 num_steps``."""
    _check_flow(flow, y, num_steps)
    x, t0, nfe = flow_start(flow, y, generator, t_start, init, model, restart_t)
    ts = _grid(t0, num_steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t_cur
        x_mid = x + 0.5 * h * _v(model, x, t_cur, y)
        x = x + h * _v(model, x_mid, t_cur + 0.5 * h, y)
    return x, nfe + 2 * num_steps


FLOW_SAMPLERS = {"euler": euler_sampler, "heun": heun_sampler, "midpoint": midpoint_sampler}
