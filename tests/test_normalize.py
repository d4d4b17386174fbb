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
