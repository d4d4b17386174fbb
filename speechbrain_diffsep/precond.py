"""EDM-style preconditioning of the DiffSep network (after Karras et al. 2022 and EDSep).

The paper's network outputs the score directly, with a loss that weights every t alike; it learns
slowly (the separating part, near t = T, is a small share of the work). Here the network predicts
the *sources* through EDM's skip/output scalings, solved per eigen-subspace of the SDE:

- On span(1) (the average of the sources) the marginal is ``x^P = y/K + sqrt(lambda_1) z``: the
  average of the sources is known exactly from the mixture, so the denoiser returns ``y/K`` there.
- On the complement, ``x^Pbar = a_t s^Pbar + sqrt(lambda_2) z`` with ``a_t = exp(-gamma t)``: a
  scaled denoising problem with noise ``sigma_t = sqrt(lambda_2) / a_t`` on ``s^Pbar``, which gets
  EDM's ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
  ``c_in = 1 / sqrt(sigma^2 + sd^2)`` (``sd`` = ``sigma_data``, the std of ``s^Pbar``).

``D(x, t, y) = y/K + c_skip Pbar x / a_t + c_out Pbar F(c_in Pbar x / a_t, t, y)`` and the score
follows from it: ``-Sigma_t^{-1} (x - mu_t(D))``, so every sampler works unchanged. The matching
loss is ``|Pbar (D - s)|^2 / c_out^2`` (EDM's weighting: unit-variance regression target for F).
The network ``F`` should be built without ``scale_by_sigma`` (its output is not a score).
"""


from itertools import permutations

import torch

from .losses import draw_training_inputs
from .sde import MixingSDE


def _pbar(x):
    return x - x.mean(dim=1, keepdim=True)


def noise_level(sde, t):
    """``sigma_t = sqrt(lambda_2(t)) / exp(-gamma t)``: the noise std of the zero-mean part of
    ``x_t`` relative to the sources (what the scalings and a network's conditioning use)."""
    _, lam2 = sde.eigenvalues(t)
    return lam2.sqrt() / torch.exp(-sde.gamma * t)


class PreconditionedScoreModel(torch.nn.Module):
    """Wraps a network ``F(x, t, y)`` into a source denoiser and a score model.

    Arguments
    ---------
    net : torch.nn.Module
        Called as ``net(x_in (B,K,n), t (B,), y (B,1,n))``, output (B,K,n).
    sde : MixingSDE
        The SDE whose marginals define the scalings (its parameters are copied).
    sigma_data : float
        Std of the zero-mean part of the (normalized) sources; about 0.5 for two speakers of
        similar level in a unit-variance mixture.

    Example
    -------
    >>> class Zero(torch.nn.Module):
    ...     def forward(self, x, t, y):
    ...         return torch.zeros_like(x)
    >>> m = PreconditionedScoreModel(Zero(), MixingSDE())
    >>> y = torch.randn(1, 1, 16); x = torch.randn(1, 2, 16)
    >>> m(x, torch.tensor([0.5]), y).shape
    torch.Size([1, 2, 16])
    """

    def __init__(self, net, sde=None, sigma_data=0.5):
        super().__init__()
        self.net = net
        sde = sde if sde is not None else MixingSDE()
        self.sde_kwargs = dict(
            num_sources=sde.num_sources,
            gamma=sde.gamma,
            sigma_min=sde.sigma_min,
            sigma_max=sde.sigma_max,
            t_eps=sde.t_eps,
            T=sde.T,
        )
        self.sde = MixingSDE(**self.sde_kwargs)
        self.sigma_data = float(sigma_data)

    def scalings(self, t):
        """``(a_t, c_skip, c_out, c_in)``, each shaped (batch, 1, 1), in float32/64 like t."""
        a = torch.exp(-self.sde.gamma * t)
        sigma = noise_level(self.sde, t)
        sd = self.sigma_data
        norm = torch.sqrt(sigma**2 + sd**2)
        shape = (-1, 1, 1)
        return (a.view(shape), (sd**2 / norm**2).view(shape), (sigma * sd / norm).view(shape), (1.0 / norm).view(shape))

    def denoise(self, x, t, y):
        """Estimate of the sources ``E[s | x_t, y]`` shaped (batch, K, samples)."""
        t = t.to(x.dtype)
        a, c_skip, c_out, c_in = self.scalings(t)
        xb = _pbar(x) / a
        f = self.net(c_in * xb, t, y).to(x.dtype)
        return y / self.sde.num_sources + c_skip * xb + c_out * _pbar(f)

    def forward(self, x, t, y, output="score"):
        """Score ``-Sigma_t^{-1} (x - mu_t(D(x)))`` for the samplers, or ``D(x)`` itself.

        ``output="denoised"`` returns the source estimate; training calls it through ``forward``
        so that a DistributedDataParallel wrapper sees the call and all-reduces the gradients.
        """
        d = self.denoise(x, t, y)
        if output == "denoised":
            return d
        if output != "score":
            raise ValueError(f"output must be 'score' or 'denoised', got {output!r}")
        t = t.to(x.dtype)
        return -self.sde.mult_cov_inv(x - self.sde.mean(d, t), t)


def restart_states(model, sde, y, t, generator=None, t_range=(0.15, 0.6)):
    """The states a restart builds: the true marginal at ``t_r`` around the model's own estimate.

    ``x_T = y/K + L_T z'`` (the prior), ``D_0 = D(x_T, T)`` with this model and no gradient (the
    first call of a restart sampler), ``t_r ~ U[t_range]`` and ``x = mu_{t_r}(D_0) + L_{t_r} z``:
    what ``sampling._start`` does with ``restart_t=t_r``. Returns ``(x, t_r, D_0)``; ``t`` only gives the
    batch size, dtype and device. Draw order from ``generator``: ``z'``, ``t_r``, ``z``.
    """
    lo, hi = (float(v) for v in t_range)
    if not sde.t_eps < lo <= hi < sde.T:
        raise ValueError(f"restart_range must be [lo, hi] with t_eps={sde.t_eps} < lo <= hi < T={sde.T}, got {list(t_range)}")
    B = y.shape[0]
    x_T = sde.prior_sample(y, generator=generator)
    with torch.no_grad():
        est = model(x_T, torch.full((B,), sde.T, dtype=t.dtype, device=y.device), y, output="denoised").to(y.dtype)
    t_r = lo + (hi - lo) * torch.rand(B, generator=generator, dtype=t.dtype, device=y.device)
    x, _ = sde.sample_marginal(est, t_r, generator=generator, y=y)
    return x, t_r, est


def denoiser_loss(
    model, sde, s, y, p_T=0.1, generator=None, shuffle=True, t_sampling="uniform", t_power=1.0, pit_above=None,
    t_max=None, mismatch_p=0.0, mismatch_above=0.5, restart_p=0.0, restart_range=(0.15, 0.6),
):
    """Data-prediction loss for :class:`PreconditionedScoreModel`, with the p_T permutation branch.

    Per example ``|Pbar (D(x_t) - s)|^2 / c_out(t)^2`` averaged over sources and samples; for the
    p_T examples (x from the prior at t = T) the minimum over source permutations. With
    ``pit_above=t0`` the permutation-min loss is also used for every example with ``t >= t0``:
    where ``x_t`` barely tells the source order, the plain loss teaches the denoiser to average
    the orders (a blurred estimate that few-step samplers cannot fix), while the min lets it
    commit to a separation, as a PIT-trained separator does (this project's choice, after the
    p_T loss of the paper and permutation-invariant training).
    Mismatch-aware training (``mismatch_p > 0``): that share of the examples is built as the
    sampler builds its states from the prior (:func:`.losses.mismatch_state`, ``t`` uniform in
    ``[mismatch_above, T]``), so the network learns the states it meets when sampling.
    Restart-aware training (``restart_p > 0``): that share of the examples not on the prior branch
    gets the state a restart sampler builds (:func:`restart_states`: the marginal at
    ``t ~ U[restart_range]`` around the model's own estimate from the prior, computed without
    gradient), the target stays ``s`` and the loss is the permutation-min (the estimate's source
    order is the model's). The network learns to correct its own first estimate, which is what
    every call after a restart does; a plain model only ever saw noise around the true sources there
    and keeps the estimate's errors (``MATH.md``, "Cure 3").
    Returns ``(loss (batch,), use_pit (batch,))``.
    """
    if not 0.0 <= restart_p <= 1.0:
        raise ValueError(f"restart_p must be a probability in [0, 1], got {restart_p}")
    s, t, _, x, use_prior = draw_training_inputs(
        sde, s, y, p_T, generator, shuffle, t_sampling=t_sampling, t_power=t_power, t_max=t_max,
        mismatch_p=mismatch_p, mismatch_above=mismatch_above,
    )
    use_restart = torch.zeros_like(use_prior)
    if restart_p > 0:
        use_restart = (torch.rand(s.shape[0], generator=generator, device=s.device) < restart_p) & ~use_prior
        x_r, t_r, _ = restart_states(model, sde, y, t, generator, restart_range)
        t = torch.where(use_restart, t_r, t)
        x = torch.where(use_restart[:, None, None], x_r, x)
    d = model(x, t, y, output="denoised")  # through forward (DDP-safe)
    c_out = getattr(model, "module", model).scalings(t)[2]
    use_pit = use_prior | use_restart if pit_above is None else use_prior | use_restart | (t >= pit_above)
    per_perm = []
    perms = list(permutations(range(sde.num_sources))) if bool(use_pit.any()) else [tuple(range(sde.num_sources))]
    for perm in perms:
        per_perm.append((_pbar(d - s[:, list(perm)]) / c_out).pow(2).mean(dim=(1, 2)))
    per_perm = torch.stack(per_perm, dim=1)
    loss = torch.where(use_pit, per_perm.min(dim=1).values, per_perm[:, 0])
    return loss, use_pit
