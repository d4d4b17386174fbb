"""Losses against the authors' code (json) and their defining properties."""
import pytest
import torch

from conftest import t64
from speechbrain_diffsep.losses import (
    denoising_score_loss,
    prior_permutation_loss,
    score_matching_loss,
    shuffle_sources,
)
from speechbrain_diffsep.normalize import normalize_batch
from speechbrain_diffsep.sde import MixingSDE


@pytest.fixture
def sde():
    return MixingSDE(num_sources=2)


@pytest.fixture
def inputs(ref_values):
    i = ref_values["inputs"]
    return (
        t64(i["x0 (sources, shape (1,2,8))"]),
        t64(i["y (mixture = x0.sum(dim=1, keepdim=True), shape (1,1,8))"]),
        t64(i["z (shape (1,2,8))"]),
        t64(i["s_fixed (fixed score value, shape (1,2,8))"]),
    )


def test_regular_loss_matches_reference(sde, ref_values, inputs):
    ref = ref_values["losses"]["regular_loss_t0.5"]
    x0, y, z, s_fixed = inputs
    t = t64([0.5])
    loss = denoising_score_loss(s_fixed, z, sde, t)
    assert torch.allclose(loss, t64(ref["loss_with_s_fixed"]), rtol=1e-10)
    oracle = -sde.mult_std_inv(z, t)
    assert float(denoising_score_loss(oracle, z, sde, t)) < 1e-28


def test_prior_permutation_loss_matches_reference(sde, ref_values, inputs):
    ref = ref_values["losses"]["pT_alternative_loss"]
    x0, y, z, s_fixed = inputs
    loss, idx = prior_permutation_loss(s_fixed, z, x0, y, sde)
    assert torch.allclose(loss, t64(ref["loss_min_over_perms (code output)"]), rtol=1e-10)
    per = [p["loss"] for p in ref["per_permutation"]]
    assert int(idx) == min(range(2), key=lambda k: per[k][0] if isinstance(per[k], list) else per[k])
    # the score that is optimal for the identity permutation gives zero loss
    tT = t64([1.0])
    z01 = z + sde.mult_std_inv(sde.prior_mean(y) - sde.mean(x0, tT), tT)
    s_opt = -sde.mult_std_inv(z01, tT)
    loss0, _ = prior_permutation_loss(s_opt, z, x0, y, sde)
    assert float(loss0) < 1e-28
    # and it is permutation invariant in the sources
    loss_sw, _ = prior_permutation_loss(s_fixed, z, x0[:, [1, 0]], y, sde)
    assert torch.allclose(loss_sw, loss)


@pytest.mark.parametrize("K", [2, 3])
def test_full_loss_zero_for_oracle_and_prior_branch(K):
    """p_T = 0: t in [t_eps, T] and mean(z^2) for q = 0; p_T = 1: t = T and the permutation loss."""
    sde = MixingSDE(num_sources=K)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, K, 40, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(1)
    captured = {}

    def capture(x, t, yy):
        captured["x"], captured["t"] = x, t
        return torch.zeros_like(x)

    loss_zero_score, mask = score_matching_loss(capture, sde, s, y, p_T=0.0, generator=gen)
    assert not mask.any()
    assert ((captured["t"] >= sde.t_eps) & (captured["t"] <= sde.T)).all()
    # with q = 0 the loss is mean(z^2): about 1
    assert 0.7 < float(loss_zero_score.mean()) < 1.3
    # p_T = 1: every example at t = T, x = y/K + L_T z
    loss_T, mask = score_matching_loss(capture, sde, s, y, p_T=1.0, generator=torch.Generator().manual_seed(2))
    assert mask.all() and torch.all(captured["t"] == sde.T)
    z = sde.mult_std_inv(captured["x"] - sde.prior_mean(y), captured["t"])
    expected, _ = prior_permutation_loss(torch.zeros_like(s), z, s, y, sde)
    assert torch.allclose(loss_T, expected)


def test_loss_is_differentiable_and_uses_one_call(sde):
    net = torch.nn.Conv1d(2, 2, 3, padding=1)
    calls = []

    def score_fn(x, t, y):
        calls.append(1)
        return net(x)

    s = torch.randn(4, 2, 32)
    y = s.sum(1, keepdim=True)
    y_n, s_n, _, _ = normalize_batch(y, s)
    loss, mask = score_matching_loss(score_fn, sde, s_n, y_n, p_T=0.5, generator=torch.Generator().manual_seed(3))
    loss.mean().backward()
    assert len(calls) == 1 and net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_shuffle_sources_is_a_permutation():
    s = torch.arange(24.0).reshape(4, 3, 2)
    out = shuffle_sources(s, torch.Generator().manual_seed(0))
    assert torch.equal(out.sort(dim=1).values, s)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(p_T=1.5), "p_T"), (dict(s=torch.randn(2, 3, 8)), "num_sources=2"), (dict(y=torch.randn(2, 8)), "mixture")],
)
def test_bad_input(sde, kwargs, match):
    args = dict(s=torch.randn(2, 2, 8), y=torch.randn(2, 1, 8), p_T=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        score_matching_loss(lambda x, t, y: x, sde, args["s"], args["y"], p_T=args["p_T"])


@pytest.mark.parametrize("power, expected_mean", [(1.0, 0.515), (3.0, 0.03 + 0.97 * 0.75)])
def test_time_sampling_distribution(sde, power, expected_mean):
    from speechbrain_diffsep.losses import sample_time

    t = sample_time(200000, sde, torch.Generator().manual_seed(0), dtype=torch.float64, kind="power", power=power)
    assert float(t.min()) >= sde.t_eps and float(t.max()) <= sde.T
    # E[u^(1/p)] = p / (p + 1)
    assert abs(float(t.mean()) - expected_mean) < 0.005
    with pytest.raises(ValueError, match="t_sampling"):
        sample_time(4, sde, kind="beta")


def test_prior_branch_can_keep_the_target_order(sde):
    """Enhancement: with prior_permutation=False the p_T loss uses the given order only."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    y = s.sum(1, keepdim=True)
    captured = {}

    def capture(x, t, yy):
        captured["x"] = x
        return torch.zeros_like(x)

    kept, _ = score_matching_loss(capture, sde, s, y, p_T=1.0, prior_permutation=False, generator=torch.Generator().manual_seed(8))
    tT = torch.full((3,), sde.T, dtype=torch.float64)
    z = sde.mult_std_inv(captured["x"] - sde.prior_mean(y), tT)
    from speechbrain_diffsep.losses import prior_mismatch_noise

    expected = denoising_score_loss(torch.zeros_like(s), prior_mismatch_noise(z, s, y, sde), sde, tT)
    assert torch.allclose(kept, expected)
    best, _ = score_matching_loss(capture, sde, s, y, p_T=1.0, generator=torch.Generator().manual_seed(8))
    assert (best <= kept + 1e-12).all()


def test_t_max_restricts_training_times(sde):
    from speechbrain_diffsep.losses import sample_time

    t = sample_time(10000, sde, torch.Generator().manual_seed(1), dtype=torch.float64, t_max=0.4)
    assert float(t.min()) >= sde.t_eps and float(t.max()) <= 0.4 and float(t.max()) > 0.39
    with pytest.raises(ValueError, match="t_max"):
        sample_time(4, sde, t_max=0.01)
