"""Per-example normalization around the score network, as in the reference code.

The network sees signals normalized by the *mixture's* statistics (mean and unbiased std over
channels and time, std clamped at 1e-5); training targets get the same affine map. After
sampling, each estimate is rescaled by its least-squares gain onto the original mixture.
"""

import torch


def _check(mix):
    if not torch.is_tensor(mix) or mix.dim() != 3 or mix.shape[1] != 1:
        shape = tuple(mix.shape) if torch.is_tensor(mix) else type(mix).__name__
        raise ValueError(
            f"mix must be shaped (batch, 1, samples), got {shape}; use mix.unsqueeze(1) for (batch, samples)"
        )
    if mix.shape[-1] < 2:
        raise ValueError(f"mix must have at least 2 samples, got {mix.shape[-1]}")


def normalize_batch(mix, *targets, min_std=1e-5):
    """Normalize a mixture (and optional targets) by the mixture's mean and std.

    Returns ``(mix_n, *targets_n, mean, std)`` with ``mean`` and ``std`` shaped (batch, 1, 1).

    Example
    -------
    >>> mix = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])
    >>> mix_n, mean, std = normalize_batch(mix)
    >>> round(float(mix_n.std()), 6)
    1.0
    """
    _check(mix)
    mean = mix.mean(dim=(1, 2), keepdim=True)
    std = mix.std(dim=(1, 2), keepdim=True).clamp(min=min_std)
    out = [(mix - mean) / std]
    for i, tgt in enumerate(targets):
        if not torch.is_tensor(tgt) or tgt.dim() != 3 or tgt.shape[0] != mix.shape[0]:
            raise ValueError(f"target {i} must be shaped (batch, K, samples) with the mixture's batch size")
        out.append((tgt - mean) / std)
    return (*out, mean, std)


def denormalize(x, mean, std):
    """Inverse of :func:`normalize_batch` for any (batch, C, samples) tensor."""
    return x * std + mean


def rescale_to_mixture(est, mix, eps=1e-10):
    """Scale every estimated source by its least-squares gain onto the mixture.

    ``alpha_k = <mix, est_k> / (<est_k, est_k> + eps)`` (the reference's ``scale_output``).

    Example
    -------
    >>> mix = torch.randn(1, 1, 50)
    >>> est = torch.cat([3 * mix, -mix], dim=1)
    >>> out = rescale_to_mixture(est, mix)
    >>> torch.allclose(out, torch.cat([mix, mix], dim=1), atol=1e-6)
    True
    """
    _check(mix)
    if est.dim() != 3 or est.shape[0] != mix.shape[0] or est.shape[-1] != mix.shape[-1]:
        raise ValueError(
            f"est must be shaped (batch, K, samples) matching mix {tuple(mix.shape)}, got {tuple(est.shape)}"
        )
    alpha = (mix * est).sum(-1, keepdim=True) / ((est * est).sum(-1, keepdim=True) + eps)
    return alpha * est


def mixture_consistency(est, mix):
    """Project estimates so that they sum exactly to the mixture (equal share of the residual).

    Example
    -------
    >>> mix = torch.randn(2, 1, 30); est = torch.randn(2, 3, 30)
    >>> torch.allclose(mixture_consistency(est, mix).sum(1, keepdim=True), mix, atol=1e-6)
    True
    """
    _check(mix)
    residual = mix - est.sum(dim=1, keepdim=True)
    return est + residual / est.shape[1]


def fit_gains_to_mixture(est, mix, eps=1e-8):
    """Rescale the estimates by the gains ``a`` that best explain the mixture, ``min |mix - sum_k a_k est_k|``.

    Separators trained with scale-invariant losses (Conv-TasNet, SepFormer) return sources at an
    arbitrary scale; a refiner must first put them on the mixture's scale (a joint least-squares
    fit of the K gains, solved per example).

    Example
    -------
    >>> s = torch.randn(1, 2, 100); mix = s.sum(1, keepdim=True)
    >>> out = fit_gains_to_mixture(s * torch.tensor([[[5.0], [-0.1]]]), mix)
    >>> torch.allclose(out, s, atol=1e-4)
    True
    """
    _check(mix)
    if est.dim() != 3 or est.shape[0] != mix.shape[0] or est.shape[-1] != mix.shape[-1]:
        raise ValueError(
            f"est must be shaped (batch, K, samples) matching mix {tuple(mix.shape)}, got {tuple(est.shape)}"
        )
    e = est.double()
    gram = e @ e.transpose(1, 2)  # (B, K, K)
    rhs = e @ mix.double().transpose(1, 2)  # (B, K, 1)
    # relative Tikhonov term on each source's own energy: keeps silent or collinear estimates finite
    ridge = torch.diag_embed(eps * gram.diagonal(dim1=1, dim2=2) + 1e-12)
    gains = torch.linalg.solve(gram + ridge, rhs)
    return (gains.to(est.dtype)) * est
