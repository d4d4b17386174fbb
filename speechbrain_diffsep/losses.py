"""DiffSep's training losses: denoising score matching and the p_T permutation loss.

- Standard loss (t ~ U[t_eps, T]): ``x_t = mu_t(s) + L_t z`` and the loss is the mean over sources
  and samples of ``(L_t q + z)^2`` where ``q = q_theta(x_t, t, y)`` estimates the score.
- p_T loss (chosen per example with probability ``p_T``): ``t = T``, ``x_T = y/K + L_T z0`` (the
  inference prior, independent of the source order) and the loss is
  ``min_pi mean((L_T q + z_pi)^2)``, ``z_pi = z0 + L_T^{-1}(y/K - mu_T(s_pi))``. It trains the
  network to undo the "model mismatch" between the prior and the true marginal at T.
- Examples not chosen for p_T get their sources shuffled (augmentation).
"""

import itertools
import math

import torch

from .sde import _check_mixture, _check_signals


def denoising_score_loss(score, z, sde, t, y=None):
    """Per-example ``mean((L_t score + z)^2)`` over sources and samples, shaped (batch,)."""
    _check_signals(score, "score", sde.num_sources)
    if z.shape != score.shape:
        raise ValueError(f"z must have the score's shape {tuple(score.shape)}, got {tuple(z.shape)}")
    err = sde.mult_std(score, t, y=y) + z
    return err.pow(2).mean(dim=(1, 2))


def prior_mismatch_noise(z0, s, y, sde):
    """``z0 + L_T^{-1}(y/K - mu_T(s))``: the noise that explains ``x_T = y/K + L_T z0`` given ``s``."""
    tT = torch.full((s.shape[0],), sde.T, dtype=s.dtype, device=s.device)
    return z0 + sde.mult_std_inv(sde.prior_mean(y) - sde.mean(s, tT), tT, y=y)


def prior_permutation_loss(score, z0, s, y, sde):
    """p_T loss: min over source permutations of ``mean((L_T score + z_pi)^2)``, shaped (batch,).

    Returns ``(loss, best_perm_index)``.
    """
    _check_signals(s, "s", sde.num_sources)
    _check_mixture(y)
    tT = torch.full((s.shape[0],), sde.T, dtype=s.dtype, device=s.device)
    L_q = sde.mult_std(score, tT, y=y)
    losses = []
    for perm in itertools.permutations(range(sde.num_sources)):
        z_pi = prior_mismatch_noise(z0, s[:, list(perm)], y, sde)
        losses.append((L_q + z_pi).pow(2).mean(dim=(1, 2)))
    losses = torch.stack(losses, dim=1)
    best, idx = losses.min(dim=1)
    return best, idx


def sample_time(batch, sde, generator=None, dtype=torch.float32, device=None, kind="uniform", power=1.0, t_max=None):
    """Training times in ``[t_eps, t_max]`` (``t_max`` defaults to T), shaped (batch,).

    ``kind="uniform"``: the paper's ``U[t_eps, T]``. ``kind="power"``: ``t_eps + (T - t_eps) u^(1/power)``,
    which for ``power > 1`` puts more examples near T, where the separation itself is learned.
    A ``t_max < T`` trains a refiner, which only ever starts from ``t_start <= t_max``.
    """
    top = sde.T if t_max is None else float(t_max)
    if not sde.t_eps < top <= sde.T:
        raise ValueError(f"t_max must lie in (t_eps={sde.t_eps}, T={sde.T}], got {t_max}")
    u = torch.rand(batch, generator=generator, dtype=dtype, device=device)
    if kind == "power":
        if power <= 0:
            raise ValueError(f"t_power must be > 0, got {power}")
        u = u ** (1.0 / power)
    elif kind != "uniform":
        raise ValueError(f"unknown t_sampling {kind!r}; use 'uniform' or 'power'")
    return sde.t_eps + (top - sde.t_eps) * u


def shuffle_sources(s, generator=None):
    """Random permutation of the sources, independently for each example."""
    B, K, _ = s.shape
    keys = torch.rand(B, K, generator=generator, device=s.device)
    order = keys.argsort(dim=1)
    return torch.gather(s, 1, order[:, :, None].expand_as(s))


def mismatch_state(sde, s, t, z, y=None):
    """The state a deterministic sampler started from the prior reaches at ``t`` (perfect denoiser).

    ``x_t = mu_t(s) + L_t z - r2(t) e^{-gamma T} Pbar s`` with ``r2(t) = sqrt(lambda_2(t) / lambda_2(T))``:
    the prior's residual ``x_T - mu_T(s) = L_T z - e^{-gamma T} Pbar s`` carried to ``t`` by the
    DDIM step (``sampling.ddim_step``), which shrinks it by ``sqrt(lambda_k(t) / lambda_k(T))`` on
    each eigen-subspace; on span(1) that leaves ``sqrt(lambda_1(t)) P z``. At ``t = T`` it is the
    prior draw ``y/K + L_T z``. Derivation: ``speechbrain_diffsep/MATH.md``.
    """
    _check_signals(s, "s", sde.num_sources)
    t = sde._time(t, s)
    _, lam2 = sde.eigenvalues(t)
    _, lam2_T = sde.eigenvalues(torch.full_like(t, sde.T))
    r2 = (lam2 / lam2_T).sqrt().to(s.dtype)
    offset = (r2 * math.exp(-sde.gamma * sde.T))[:, None, None]  # a Python float: no tensor on the default device
    x, _ = sde.sample_marginal(s, t, z=z, y=y)
    return x - offset * (s - s.mean(dim=1, keepdim=True))


def draw_training_inputs(
    sde, s, y, p_T=0.1, generator=None, shuffle=True, t_sampling="uniform", t_power=1.0, t_max=None,
    mismatch_p=0.0, mismatch_above=0.5,
):
    """The random part of a training step, shared by the score and the denoiser losses.

    Per example: with probability ``p_T`` the prior branch (``t = T``, ``x = y/K + L_T z``, sources
    in the given order), otherwise shuffled sources (when ``shuffle``), ``t`` from
    :func:`sample_time` and ``x = mu_t(s) + L_t z``. Mismatch-aware training: with probability
    ``mismatch_p`` an example not on the prior branch gets ``t ~ U[mismatch_above, T]`` and the
    sampler's carried state :func:`mismatch_state` instead (data-prediction objectives only: the
    target stays ``s``). Returns ``(s, t, z, x, use_prior)``.
    """
    _check_signals(s, "s", sde.num_sources)
    _check_mixture(y)
    if not 0.0 <= p_T <= 1.0:
        raise ValueError(f"p_T must be a probability in [0, 1], got {p_T}")
    if not 0.0 <= mismatch_p <= 1.0:
        raise ValueError(f"mismatch_p must be a probability in [0, 1], got {mismatch_p}")
    if mismatch_p > 0 and not sde.t_eps <= mismatch_above < sde.T:
        raise ValueError(f"mismatch_above must lie in [t_eps={sde.t_eps}, T={sde.T}), got {mismatch_above}")
    B = s.shape[0]
    dev, dt = s.device, s.dtype
    use_prior = torch.rand(B, generator=generator, device=dev) < p_T
    if shuffle:
        s = torch.where(use_prior[:, None, None], s, shuffle_sources(s, generator))
    t = sample_time(B, sde, generator, dtype=dt, device=dev, kind=t_sampling, power=t_power, t_max=t_max)
    t = torch.where(use_prior, torch.full_like(t, sde.T), t)
    z = torch.randn(s.shape, generator=generator, dtype=dt, device=dev)
    x_t, _ = sde.sample_marginal(s, t, z=z, y=y)
    x = torch.where(use_prior[:, None, None], sde.prior_sample(y, z=z), x_t)
    if mismatch_p > 0:
        use_mm = (torch.rand(B, generator=generator, device=dev) < mismatch_p) & ~use_prior
        t_mm = mismatch_above + (sde.T - mismatch_above) * torch.rand(B, generator=generator, device=dev, dtype=dt)
        t = torch.where(use_mm, t_mm, t)
        x = torch.where(use_mm[:, None, None], mismatch_state(sde, s, t, z, y=y), x)
    return s, t, z, x, use_prior


def score_matching_loss(
    score_fn, sde, s, y, p_T=0.1, generator=None, shuffle=True, t_sampling="uniform", t_power=1.0,
    prior_permutation=True, t_max=None,
):
    """The full DiffSep training loss for a batch, with one network call.

    Arguments
    ---------
    score_fn : callable
        ``score_fn(x_t, t, y) -> score`` (the network, in the normalized domain).
    sde : MixingSDE
    s : torch.Tensor
        Clean sources (batch, K, samples), normalized like ``y``.
    y : torch.Tensor
        Mixture (batch, 1, samples).
    p_T : float
        Probability that an example uses the p_T permutation loss at t = T.
    prior_permutation : bool
        Minimum over source orders in the p_T loss (separation); ``False`` keeps the given order
        (enhancement, where the targets [clean, noise] are not interchangeable, as the authors' code).

    Returns
    -------
    loss : torch.Tensor
        Per-example loss, shaped (batch,).
    use_prior : torch.Tensor
        Boolean mask (batch,) of the examples that used the p_T loss.

    Example
    -------
    >>> from speechbrain_diffsep.sde import MixingSDE
    >>> sde = MixingSDE()
    >>> s = torch.randn(4, 2, 32); y = s.sum(1, keepdim=True)
    >>> loss, mask = score_matching_loss(lambda x, t, y: torch.zeros_like(x), sde, s, y)
    >>> loss.shape
    torch.Size([4])
    """
    s, t, z, x, use_prior = draw_training_inputs(
        sde, s, y, p_T, generator, shuffle, t_sampling=t_sampling, t_power=t_power, t_max=t_max
    )
    score = score_fn(x, t, y)
    loss = denoising_score_loss(score, z, sde, t, y=y)
    if bool(use_prior.any()):
        if prior_permutation:
            loss_prior, _ = prior_permutation_loss(score, z, s, y, sde)
        else:
            loss_prior = denoising_score_loss(score, prior_mismatch_noise(z, s, y, sde), sde, t, y=y)
        loss = torch.where(use_prior, loss_prior, loss)
    return loss, use_prior
