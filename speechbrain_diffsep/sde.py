"""The mixing SDE of DiffSep (Theorem 1 of the paper) and its enhancement variant.

Forward process on the stacked sources ``x`` shaped ``(batch, K, samples)``::

    dx = -gamma * Pbar x dt + g(t) dw,      g(t) = sigma_min * rho**t * sqrt(2 ln rho)

with ``P = 11^T / K`` (average over sources), ``Pbar = I - P`` and ``rho = sigma_max / sigma_min``.
Its marginal is Gaussian, ``x_t ~ N(mu_t, Sigma_t)``::

    mu_t    = (P + exp(-gamma t) Pbar) s
    Sigma_t = lambda_1(t) P + lambda_2(t) Pbar
    lambda_1(t) = sigma_min^2 (rho^(2t) - 1)
    lambda_2(t) = sigma_min^2 (rho^(2t) - exp(-2 gamma t)) / (1 + gamma / ln rho)

``P`` and ``Pbar`` are orthogonal projectors, so every matrix function of ``Sigma_t`` is a
weighted sum of the two: ``L_t = sqrt(lambda_1) P + sqrt(lambda_2) Pbar`` is the symmetric square
root and ``L_t^{-1} = P / sqrt(lambda_1) + Pbar / sqrt(lambda_2)``. We never build a ``K x K``
matrix: applying ``P`` is a mean over the source axis. (Written here rather than reused because no
maintained library has this SDE; the formulas were checked against the authors' code, see
``tests/test_sde.py``.)
"""

import math

import torch
import torch.nn.functional as F


def _check_signals(x, name, num_sources=None):
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor shaped (batch, K, samples), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must be shaped (batch, K, samples), got shape {tuple(x.shape)}; "
            "add the missing axes (e.g. x[None] for a single example)"
        )
    if num_sources is not None and x.shape[1] != num_sources:
        raise ValueError(
            f"{name} has {x.shape[1]} sources on axis 1 but the SDE was built for "
            f"num_sources={num_sources}; build the SDE with num_sources={x.shape[1]} or fix the input"
        )


def _check_mixture(y, name="y"):
    if not torch.is_tensor(y) or y.dim() != 3 or y.shape[1] != 1:
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(
            f"{name} (the mixture) must be shaped (batch, 1, samples), got {shape}; "
            "use mix.unsqueeze(1) for a (batch, samples) tensor"
        )


class MixingSDE:
    """DiffSep's forward SDE that moves the sources towards their average, plus noise.

    Arguments
    ---------
    num_sources : int
        Number of sources K (>= 2).
    gamma : float
        Speed of the mixing drift (``d_lambda`` in the reference code).
    sigma_min, sigma_max : float
        Noise scale at ``t = 0`` and ``t = 1``.
    t_eps : float
        Smallest diffusion time used in training and sampling.
    T : float
        Final diffusion time.

    Example
    -------
    >>> sde = MixingSDE(num_sources=2)
    >>> s = torch.randn(3, 2, 100)
    >>> x_t, z = sde.sample_marginal(s, torch.full((3,), 0.5))
    >>> x_t.shape
    torch.Size([3, 2, 100])
    """

    def __init__(self, num_sources=2, gamma=2.0, sigma_min=0.05, sigma_max=0.5, t_eps=0.03, T=1.0):
        if int(num_sources) != num_sources or num_sources < 2:
            raise ValueError(f"num_sources must be an integer >= 2, got {num_sources}")
        if not (0 < sigma_min < sigma_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not gamma >= 0:  # NaN too
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not (0 < t_eps < T):
            raise ValueError(f"need 0 < t_eps < T, got t_eps={t_eps}, T={T}")
        self.num_sources = int(num_sources)
        self.gamma = float(gamma)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.t_eps = float(t_eps)
        self.T = float(T)
        self.log_rho = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_sources={self.num_sources}, gamma={self.gamma}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, t_eps={self.t_eps}, T={self.T})"
        )

    # ------------------------------------------------------------------ helpers
    def _time(self, t, x=None):
        """``t`` as a (batch,) tensor in the dtype/device of ``x``; checks its shape, not its values.

        Every SDE method runs this, several times per network call while sampling. A value check
        (``if (t < 0).any()``) reads ``t`` back to the host: on a GPU each one stalls the CPU until
        the queue drains, and under ``torch.compile`` each one breaks the graph. The values are
        checked once where times come in (:meth:`check_time`; the samplers build their grids from
        checked Python floats).
        """
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, dtype=torch.float64 if x is None else x.dtype)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1:
            raise ValueError(f"t must be shaped (batch,), got shape {tuple(t.shape)}")
        if x is not None:
            if t.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"t has {t.shape[0]} entries but the signals have batch size {x.shape[0]}"
                )
            t = t.to(dtype=x.dtype, device=x.device)
        return t

    def check_time(self, t, positive=False):
        """Check the values of diffusion times once, at an API boundary; returns ``t`` as a tensor.

        ``t`` must lie in ``[0, T]`` (``positive=True``: in ``(0, T]``, as :meth:`mult_std_inv` and
        :meth:`mult_cov_inv` need). The other methods only check shapes, so that the per-step path
        of the samplers makes no host sync (see :meth:`_time`); call this on times from outside.

        Example
        -------
        >>> MixingSDE().check_time(torch.tensor([0.5, 1.0])).tolist()
        [0.5, 1.0]
        """
        t = self._time(t)
        if bool((torch.isnan(t) | (t < 0) | (t > self.T + 1e-6)).any()):
            raise ValueError(
                f"t must lie in [0, T={self.T}], got values in [{float(t.min())}, {float(t.max())}]"
            )
        if positive and bool((t <= 0).any()):
            raise ValueError("t must be > 0 here (Sigma_0 = 0 is not invertible); the samplers stop at t_eps")
        return t

    @staticmethod
    def _bcast(v):
        return v[:, None, None]

    @staticmethod
    def project_mean(x):
        """``P x``: every source replaced by the average of the sources."""
        return x.mean(dim=1, keepdim=True).expand_as(x)

    def _apply(self, x, a, b):
        """``(a P + b Pbar) x`` for per-example scalars ``a, b`` shaped (batch,)."""
        m = x.mean(dim=1, keepdim=True)
        return self._bcast(b) * x + self._bcast(a - b) * m

    # ------------------------------------------------------------------ SDE
    def eigenvalues(self, t):
        """Eigenvalues ``(lambda_1, lambda_2)`` of ``Sigma_t`` on span(1) and its complement."""
        t = self._time(t)
        rho2t = torch.exp(2.0 * self.log_rho * t)
        lam1 = self.sigma_min**2 * (rho2t - 1.0)
        lam2 = self.sigma_min**2 * (rho2t - torch.exp(-2.0 * self.gamma * t)) / (
            1.0 + self.gamma / self.log_rho
        )
        return lam1, lam2

    def diffusion(self, t):
        """Diffusion coefficient ``g(t)`` shaped (batch,)."""
        t = self._time(t)
        return self.sigma_min * torch.exp(self.log_rho * t) * math.sqrt(2.0 * self.log_rho)

    def drift(self, x, t=None):
        """Drift ``f(x, t) = -gamma Pbar x`` (independent of t)."""
        _check_signals(x, "x", self.num_sources)
        return -self.gamma * (x - x.mean(dim=1, keepdim=True))

    def mean(self, s, t):
        """Marginal mean ``mu_t = (P + exp(-gamma t) Pbar) s``."""
        _check_signals(s, "s", self.num_sources)
        t = self._time(t, s)
        return self._apply(s, torch.ones_like(t), torch.exp(-self.gamma * t))

    def _std_factors(self, t, x, inverse=False, power=0.5):
        lam1, lam2 = self.eigenvalues(self._time(t, x))
        a, b = lam1**power, lam2**power
        if inverse:
            a, b = 1.0 / a, 1.0 / b
        return a.to(x.dtype), b.to(x.dtype)

    def mult_std(self, x, t, y=None):
        """``L_t x`` with ``L_t = sqrt(lambda_1) P + sqrt(lambda_2) Pbar``."""
        _check_signals(x, "x", self.num_sources)
        return self._apply(x, *self._std_factors(t, x))

    def mult_std_inv(self, x, t, y=None):
        """``L_t^{-1} x``; ill-conditioned as t -> 0 where lambda_1 -> 0 (needs t > 0: values are
        not checked per call, :meth:`check_time` with ``positive=True`` does)."""
        _check_signals(x, "x", self.num_sources)
        return self._apply(x, *self._std_factors(t, x, inverse=True))

    def mult_cov(self, x, t, y=None):
        """``Sigma_t x``."""
        _check_signals(x, "x", self.num_sources)
        return self._apply(x, *self._std_factors(t, x, power=1.0))

    def mult_cov_inv(self, x, t, y=None):
        """``Sigma_t^{-1} x`` (needs t > 0, see :meth:`mult_std_inv`)."""
        _check_signals(x, "x", self.num_sources)
        return self._apply(x, *self._std_factors(t, x, inverse=True, power=1.0))

    def sample_marginal(self, s, t, generator=None, z=None, y=None):
        """Draw ``x_t = mu_t + L_t z``; returns ``(x_t, z)``."""
        _check_signals(s, "s", self.num_sources)
        if z is None:
            z = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
        return self.mean(s, t) + self.mult_std(z, t, y=y), z

    def true_score(self, x, s, t, y=None):
        """Exact score of the marginal given the clean sources: ``-Sigma_t^{-1}(x - mu_t)``."""
        _check_signals(x, "x", self.num_sources)
        return -self.mult_cov_inv(x - self.mean(s, t), t, y=y)

    # ------------------------------------------------------------------ prior
    def prior_mean(self, y):
        """Mean of the sampling prior: the mixture divided by K, for every source."""
        _check_mixture(y)
        return (y / self.num_sources).expand(-1, self.num_sources, -1)

    def prior_sample(self, y, generator=None, z=None):
        """Draw ``x_T = y/K + L_T z`` (the reference's ``prior_sampling``)."""
        _check_mixture(y)
        mean = self.prior_mean(y)
        if z is None:
            z = torch.randn(mean.shape, generator=generator, dtype=y.dtype, device=y.device)
        t = torch.full((y.shape[0],), self.T, dtype=y.dtype, device=y.device)
        return mean + self.mult_std(z, t, y=y)


class PriorMixingSDE(MixingSDE):
    """Enhancement variant ("PriorMixSDE"): noise shaped by the mixture's envelope.

    Same mean and eigenvalues as :class:`MixingSDE`, but ``g(t)`` and ``L_t`` are multiplied,
    per time sample, by ``e(n) = 0.5 * sqrt(max(avgpool(y^2, 510)(n), 1e-4))`` (a centred moving
    average of the mixture power). Methods that depend on the envelope take ``y=`` (the mixture
    shaped (batch, 1, samples)); without it they raise.

    Example
    -------
    >>> sde = PriorMixingSDE()
    >>> y = torch.randn(1, 1, 1000)
    >>> sde.envelope(y).shape
    torch.Size([1, 1, 1000])
    """

    def __init__(self, *args, window=510, floor=1e-4, scale=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = int(window)
        self.floor = float(floor)
        self.scale = float(scale)

    def envelope(self, y):
        """Per-sample envelope ``e(n)`` of the mixture, shaped (batch, 1, samples)."""
        if y is None:
            raise ValueError("PriorMixingSDE needs the mixture: pass y=(batch, 1, samples)")
        _check_mixture(y)
        w = self.window
        # centred moving average of y^2 with zeros outside: window [n - w//2, n - w//2 + w - 1],
        # the same alignment as the reference (avg_pool1d padding w//2, last sample dropped)
        power = F.avg_pool1d(F.pad(y**2, (w // 2, w - 1 - w // 2)), kernel_size=w, stride=1)
        return self.scale * torch.sqrt(torch.clamp(power, min=self.floor))

    def diffusion(self, t, y=None):
        """``g(t) e(n)`` shaped (batch, 1, samples) when y is given, else g(t) (batch,)."""
        g = super().diffusion(t)
        if y is None:
            return g
        return g.to(y.dtype)[:, None, None] * self.envelope(y)

    def mult_std(self, x, t, y=None):
        return super().mult_std(x, t) * self.envelope(y)

    def mult_std_inv(self, x, t, y=None):
        return super().mult_std_inv(x, t) / self.envelope(y)

    def mult_cov(self, x, t, y=None):
        return super().mult_cov(x, t) * self.envelope(y) ** 2

    def mult_cov_inv(self, x, t, y=None):
        return super().mult_cov_inv(x, t) / self.envelope(y) ** 2

    def sample_marginal(self, s, t, generator=None, z=None, y=None):
        if y is None:
            raise ValueError("PriorMixingSDE.sample_marginal needs the mixture y=(batch, 1, samples)")
        return super().sample_marginal(s, t, generator=generator, z=z, y=y)

    def true_score(self, x, s, t, y=None):
        if y is None:
            raise ValueError("PriorMixingSDE.true_score needs the mixture y=(batch, 1, samples)")
        return super().true_score(x, s, t, y=y)


def diffusion_of(sde, t, y):
    """``g(t)`` broadcastable against (batch, K, samples), for either SDE class."""
    if isinstance(sde, PriorMixingSDE):
        return sde.diffusion(t, y=y)
    return sde.diffusion(t).to(y.dtype)[:, None, None]
