import math

import pytest
import torch

from conftest import t64
from speechbrain_diffsep.normalize import denormalize, mixture_consistency, normalize_batch, rescale_to_mixture


def test_normalize_matches_reference(ref_values):
    ref = ref_values["normalize_batch_example"]
    mix = t64(ref["mix_in"])
    mix_n, mean, std = normalize_batch(mix)
    assert torch.allclose(mean.flatten(), t64(ref["mix_mean"]), rtol=1e-12)
    assert torch.allclose(std.flatten(), t64(ref["mix_std"]), rtol=1e-12)
    assert torch.allclose(mix_n, t64(ref["mix_normalized"]), rtol=1e-12)


def test_targets_share_the_mixture_map_and_round_trip():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, 100, generator=g, dtype=torch.float64) * 5 + 2
    mix = s.sum(1, keepdim=True)
    mix_n, s_n, mean, std = normalize_batch(mix, s)
    assert torch.allclose(denormalize(s_n, mean, std), s)
    # affine map: normalized sources sum to the normalized mixture plus (K-1) mean/std
    assert torch.allclose(s_n.sum(1, keepdim=True), mix_n - mean / std, atol=1e-10)


def test_silent_mixture_is_clamped():
    mix_n, mean, std = normalize_batch(torch.zeros(1, 1, 10))
    assert torch.isfinite(mix_n).all() and float(std) == pytest.approx(1e-5)


def test_rescale_is_least_squares_gain():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(2, 1, 200, generator=g, dtype=torch.float64)
    est = torch.randn(2, 2, 200, generator=g, dtype=torch.float64)
    out = rescale_to_mixture(est, mix)
    for a in (0.9, 1.1):  # any other gain leaves a larger residual
        assert ((mix - out) ** 2).sum(-1).le(((mix - a * out) ** 2).sum(-1)).all()


def test_mixture_consistency_sums_to_mixture():
    mix = torch.randn(2, 1, 30)
    est = torch.randn(2, 3, 30)
    assert torch.allclose(mixture_consistency(est, mix).sum(1, keepdim=True), mix, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.randn(2, 30), torch.randn(2, 2, 30), torch.randn(1, 1, 1)])
def test_bad_input(bad):
    with pytest.raises(ValueError, match="mix"):
        normalize_batch(bad)


def test_fit_gains_recovers_arbitrary_scales():
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, 500, generator=g, dtype=torch.float64)
    mix = s.sum(1, keepdim=True)
    gains = torch.tensor([3.0, -0.2, 40.0], dtype=torch.float64)[None, :, None]
    assert torch.allclose(fit_gains_to_mixture(s * gains, mix), s, atol=1e-8)
    with pytest.raises(ValueError, match="matching mix"):
        fit_gains_to_mixture(s[:, :, :10], mix)


# ---------------------------------------------------------------------------- argument checks
MIX_MSG = "mix must be shaped (batch, 1, samples), got {}; use mix.unsqueeze(1) for (batch, samples)"


@pytest.mark.parametrize("fn", ["normalize_batch", "rescale_to_mixture", "mixture_consistency", "fit_gains"])
@pytest.mark.parametrize(
    "mix, got",
    [([[[0.0, 1.0]]], "list"), (torch.zeros(2, 30), "(2, 30)"), (torch.zeros(2, 2, 30), "(2, 2, 30)")],
)
def test_every_function_names_a_bad_mixture(fn, mix, got):
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    call = {"normalize_batch": lambda m: normalize_batch(m),
            "rescale_to_mixture": lambda m: rescale_to_mixture(torch.zeros(2, 2, 30), m),
            "mixture_consistency": lambda m: mixture_consistency(torch.zeros(2, 2, 30), m),
            "fit_gains": lambda m: fit_gains_to_mixture(torch.zeros(2, 2, 30), m)}[fn]
    with pytest.raises(ValueError) as e:
        call(mix)
    assert str(e.value) == MIX_MSG.format(got)


@pytest.mark.parametrize("n", [0, 1])
def test_mixture_needs_two_samples(n):
    with pytest.raises(ValueError) as e:
        normalize_batch(torch.zeros(1, 1, n))
    assert str(e.value) == f"mix must have at least 2 samples, got {n}"


def test_two_samples_are_enough():
    mix_n, mean, std = normalize_batch(torch.tensor([[[1.0, 3.0]]], dtype=torch.float64))
    assert mix_n.flatten().tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-12)
    assert float(mean) == 2.0 and float(std) == pytest.approx(math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize(
    "target",
    [[[[0.0] * 10]], torch.zeros(2, 10), torch.zeros(3, 2, 10), torch.zeros(2, 2, 2, 10)],
    ids=["list", "2d", "batch3", "4d"],
)
def test_bad_target_message(target):
    mix = torch.randn(2, 1, 10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as e:
        normalize_batch(mix, torch.zeros(2, 2, 10), target)
    assert str(e.value) == "target 1 must be shaped (batch, K, samples) with the mixture's batch size"


@pytest.mark.parametrize(
    "est",
    [torch.zeros(2, 40), torch.zeros(3, 2, 40), torch.zeros(2, 2, 39), torch.zeros(2, 2, 2, 40)],
    ids=["2d", "batch3", "short", "4d"],
)
@pytest.mark.parametrize("fn", ["rescale", "fit_gains"])
def test_bad_estimate_message(fn, est):
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    f = rescale_to_mixture if fn == "rescale" else fit_gains_to_mixture
    with pytest.raises(ValueError) as e:
        f(est, torch.zeros(2, 1, 40))
    assert str(e.value) == (
        f"est must be shaped (batch, K, samples) matching mix (2, 1, 40), got {tuple(est.shape)}"
    )


# ---------------------------------------------------------------------------- values
def test_statistics_are_per_example():
    """Each example is normalized by its own mean and unbiased std over channels and time."""
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(3, 1, 50, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 30.0])[:, None, None]
    mix = mix + torch.tensor([-5.0, 0.0, 2.0], dtype=torch.float64)[:, None, None]
    s = torch.randn(3, 2, 50, generator=g, dtype=torch.float64)
    mix_n, s_n, mean, std = normalize_batch(mix, s)
    assert mean.shape == std.shape == (3, 1, 1)
    for b in range(3):
        m, sd = float(mix[b].mean()), float(mix[b].std())
        assert float(mean[b]) == pytest.approx(m, rel=1e-12, abs=1e-12)
        assert float(std[b]) == pytest.approx(sd, rel=1e-12)
        assert torch.allclose(mix_n[b], (mix[b] - m) / sd, atol=1e-12)
        assert torch.allclose(s_n[b], (s[b] - m) / sd, atol=1e-12)
    assert torch.allclose(mix_n.mean(-1), torch.zeros(3, 1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mix_n.std(-1), torch.ones(3, 1, dtype=torch.float64), atol=1e-12)


def test_min_std_clamps_only_quiet_examples():
    mix = torch.stack([torch.full((1, 8), 2.0), torch.linspace(0, 1, 8)[None]]).double()
    mix_n, mean, std = normalize_batch(mix, min_std=1e-3)
    assert std.flatten().tolist() == pytest.approx([1e-3, float(mix[1].std())], rel=1e-12)
    assert torch.equal(mix_n[0], torch.zeros(1, 8, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0])
def test_rescale_matches_the_documented_gain(scale):
    """alpha_k = <mix, est_k> / (<est_k, est_k> + 1e-10): the eps matters for quiet estimates."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(2, 1, 100, generator=g, dtype=torch.float64)
    est = torch.randn(2, 3, 100, generator=g, dtype=torch.float64) * scale  # K = 3 != batch 2
    alpha = (mix * est).sum(-1, keepdim=True) / ((est**2).sum(-1, keepdim=True) + 1e-10)
    assert torch.allclose(rescale_to_mixture(est, mix), alpha * est, rtol=1e-12, atol=0)


def test_rescale_recovers_a_scaled_copy_and_keeps_silence():
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(1, 1, 80, generator=g, dtype=torch.float64)
    est = torch.cat([0.01 * mix, -4.0 * mix, torch.zeros_like(mix)], dim=1)
    out = rescale_to_mixture(est, mix)
    assert torch.allclose(out[:, :2], mix.expand(-1, 2, -1), rtol=1e-6)
    assert torch.equal(out[:, 2], torch.zeros_like(mix[:, 0]))


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_fit_gains_is_scale_invariant(scale):
    """Scaling all estimates by c only divides the fitted gains by c: the output is unchanged."""
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 200, generator=g, dtype=torch.float64)
    mix = s.sum(1, keepdim=True) + 0.1 * torch.randn(2, 1, 200, generator=g, dtype=torch.float64)
    est = s * torch.tensor([2.0, -0.5, 7.0], dtype=torch.float64)[None, :, None]
    assert torch.allclose(fit_gains_to_mixture(scale * est, mix), fit_gains_to_mixture(est, mix), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("scale", [1e-4, 1.0])
def test_fit_gains_ridge_shrinks_never_overshoots(scale):
    """The Tikhonov term shrinks the fit: when the mixture lies in the span of the estimates, the fitted
    sum falls short of it by about eps (relative) and never exceeds it, even for very quiet estimates."""
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 2, 100, generator=g, dtype=torch.float64) * scale
    mix = s.sum(1, keepdim=True)
    fit = fit_gains_to_mixture(s, mix).sum(1, keepdim=True)
    ratio = (fit * mix).sum(-1) / (mix * mix).sum(-1)
    assert (ratio < 1).all() and (ratio > 1 - 1e-6).all(), ratio


def test_fit_gains_silent_estimate_and_dtype():
    """A silent estimate stays silent and finite; float32 in, float32 out (solved in float64)."""
    from speechbrain_diffsep.normalize import fit_gains_to_mixture

    g = torch.Generator().manual_seed(9)
    s = torch.randn(1, 2, 100, generator=g)
    est = torch.cat([3.0 * s, torch.zeros(1, 1, 100)], dim=1)
    out = fit_gains_to_mixture(est, s.sum(1, keepdim=True))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out[:, :2], s, atol=1e-5) and torch.equal(out[:, 2], torch.zeros(1, 100))
