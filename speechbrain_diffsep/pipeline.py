"""Separation of a mixture with a score model: normalize, sample, rescale to the mixture."""

import torch

from .flow import SeparationFlow
from .normalize import denormalize, fit_gains_to_mixture, mixture_consistency, normalize_batch, rescale_to_mixture
from .sampling import get_sampler


def separate_mixture(
    score_fn,
    sde,
    mix,
    sampler="pc",
    num_steps=None,
    generator=None,
    init=None,
    consistency=False,
    **opts,
):
    """Separate ``mix`` (batch, 1, samples) into (batch, K, samples) estimates.

    The sampler runs in the domain normalized by the mixture's statistics (as the reference's
    ``separate.py``); each estimate is then rescaled by its least-squares gain onto the original
    mixture (a flow-matching model's estimates, which sum to the mixture, are denormalized instead,
    so they still sum to it). ``init`` (an estimate in the original domain, e.g. from another separator, at any
    scale: its gains are first fitted to the mixture) starts the sampler at ``opts["t_start"]``
    (refiner mode). ``consistency=True`` projects the final
    estimates so that they sum to the mixture. Returns ``(estimate, nfe)``.

    Example
    -------
    >>> from speechbrain_diffsep.sde import MixingSDE
    >>> mix = torch.randn(1, 1, 64)
    >>> est, nfe = separate_mixture(lambda x, t, y: torch.zeros_like(x), MixingSDE(), mix, num_steps=3)
    >>> est.shape, nfe
    (torch.Size([1, 2, 64]), 6)
    """
    fn = get_sampler(sampler)
    if not torch.is_tensor(mix) or mix.dim() != 3 or mix.shape[1] != 1:
        shape = tuple(mix.shape) if torch.is_tensor(mix) else type(mix).__name__
        raise ValueError(f"mix must be shaped (batch, 1, samples), got {shape}")
    if not torch.isfinite(mix).all():
        raise ValueError("mix contains NaN or inf samples; clean the input first")
    if init is not None:
        # other separators' scale is arbitrary (scale-invariant losses): fit it to the mixture first
        mix_n, init_n, mean, std = normalize_batch(mix, fit_gains_to_mixture(init, mix))
        opts["init"] = init_n
    else:
        mix_n, mean, std = normalize_batch(mix)
    if num_steps is not None:
        opts["num_steps"] = num_steps
    est, nfe = fn(score_fn, sde, mix_n, generator=generator, **opts)
    if isinstance(sde, SeparationFlow):
        # a flow's estimates sum to the normalized mixture by construction: undo the normalization
        # (each source gets mean/K) and they sum to the mixture itself
        est = denormalize(est, mean / sde.num_sources, std)
    else:
        est = rescale_to_mixture(est, mix)
    if consistency:
        est = mixture_consistency(est, mix)
    return est, nfe
