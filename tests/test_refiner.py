"""Refiner mode of the inference interface and the CLI: DiffSep starting from another separator."""
import pytest
import soundfile
import torch

from speechbrain_diffsep import cli, inference
from test_inference import separator, sep_folder  # noqa: F401  (module fixtures)


def test_separator_output_seeds_the_sampler(separator, monkeypatch):  # noqa: F811
    mix = 0.1 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    known = torch.stack([mix, -0.5 * mix], dim=-1)  # [B, T, K]
    seen = {}
    real = inference.separate_mixture

    def spy(model, sde, piece, **kw):
        seen.update(kw)
        return real(model, sde, piece, **kw)

    monkeypatch.setattr(inference, "separate_mixture", spy)
    separator.set_initial_separator(lambda m: known, t_start=0.3)
    try:
        est = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    finally:
        separator.set_initial_separator(None)
        separator.hparams.t_start = None
    assert torch.equal(seen["init"], known.transpose(1, 2)) and seen["t_start"] == 0.3
    assert est.shape == (2, 4000, 2) and separator.last_nfe == 3
    # without a separator the sampler starts from the prior
    seen.clear()
    separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    assert "init" not in seen


def spy_on_sampling(monkeypatch):
    """Record every ``separate_mixture`` call of the interface: (its keyword arguments, its estimate, nfe)."""
    calls = []
    real = inference.separate_mixture

    def spy(model, sde, piece, **kw):
        est, nfe = real(model, sde, piece, **kw)
        calls.append((dict(kw), est.clone(), nfe))
        return est, nfe

    monkeypatch.setattr(inference, "separate_mixture", spy)
    return calls


def test_self_refinement_seeds_diffsep_with_its_own_estimate(separator, monkeypatch):  # noqa: F811
    """"self": a fast pass (ODE, 2 steps, from the prior) whose estimate is the refinement's init at t_start;
    the returned estimate is the refinement's, and both passes are counted."""
    calls = spy_on_sampling(monkeypatch)
    mix = 0.1 * torch.randn(1, 3000, generator=torch.Generator().manual_seed(1))
    separator.set_initial_separator("self", t_start=0.4)
    try:
        est = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    finally:
        separator.set_initial_separator(None)
        separator.hparams.t_start = None
    assert len(calls) == 2
    (fast_kw, fast_est, fast_nfe), (ref_kw, ref_est, ref_nfe) = calls
    assert fast_kw["sampler"] == "ode" and fast_kw["num_steps"] == 2 and "init" not in fast_kw
    assert torch.equal(ref_kw["init"], fast_est) and ref_kw["t_start"] == 0.4
    assert ref_kw["sampler"] == "ode" and ref_kw["num_steps"] == 2 and ref_kw["generator"] is not None
    assert torch.equal(est, ref_est.transpose(1, 2)) and not torch.allclose(ref_est, fast_est, atol=1e-4)
    assert est.shape == (1, 3000, 2) and torch.isfinite(est).all()
    assert (fast_nfe, ref_nfe) == (3, 3) and separator.last_nfe == 3 + 3  # fast pass + refinement


def test_self_refinement_is_reproducible_for_a_seed(separator, monkeypatch):  # noqa: F811
    """Same seed, same result: every sampling pass draws from the generator it is given (the sampler is
    replaced by one that returns its draws, so no network runs)."""

    def draws(model, sde, piece, generator=None, init=None, **kw):
        noise = torch.randn(piece.shape[0], 2, piece.shape[-1], generator=generator)
        return (noise if init is None else init + noise), 1  # a refinement depends on its init

    monkeypatch.setattr(inference, "separate_mixture", draws)
    mix = 0.1 * torch.randn(1, 3000, generator=torch.Generator().manual_seed(1))
    separator.set_initial_separator("self", t_start=0.4)
    try:
        a = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
        b = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    finally:
        separator.set_initial_separator(None)
        separator.hparams.t_start = None
    assert torch.equal(a, b)


def test_bad_separators(separator, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="separate_batch"):
        separator.set_initial_separator(42)
    separator.set_initial_separator(lambda m: torch.zeros(m.shape[0], m.shape[1], 3))
    try:
        with pytest.raises(ValueError, match="expected \\[batch, time, K=2\\]"):
            separator.separate_batch(torch.randn(1, 2000), num_steps=2)
    finally:
        separator.set_initial_separator(None)
    with pytest.raises(ValueError, match="no hyperparams.yaml"):
        inference._load_separator(tmp_path)


def test_cli_refine_self(sep_folder, tmp_path, monkeypatch):  # noqa: F811
    """--refine self --t-start 0.4: the sampler is seeded with the fast pass's estimate at t = 0.4, and the
    written files are the refinement's estimate, peak-normalized (16-bit PCM)."""
    calls = spy_on_sampling(monkeypatch)
    wav = tmp_path / "m.wav"
    soundfile.write(str(wav), 0.1 * torch.randn(2400, generator=torch.Generator().manual_seed(2)).numpy(), 8000)
    out = tmp_path / "out"
    code = cli.separate_main([str(wav), "--model", str(sep_folder), "--out", str(out), "--steps", "2",
                              "--sampler", "ode", "--refine", "self", "--t-start", "0.4", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["m_s1.wav", "m_s2.wav"]
    assert len(calls) == 2 and "init" not in calls[0][0]
    assert torch.equal(calls[1][0]["init"], calls[0][1]) and calls[1][0]["t_start"] == 0.4
    refined = calls[1][1][0]  # (K, time)
    expected = refined / refined.abs().amax(dim=-1, keepdim=True)
    for k in range(2):
        written, rate = soundfile.read(str(out / f"m_s{k + 1}.wav"), dtype="float32")
        assert rate == 8000 and float((torch.from_numpy(written) - expected[k]).abs().max()) < 2 / 32768


def test_mixture_consistency_option(separator):  # noqa: F811
    mix = 0.1 * torch.randn(1, 3000, generator=torch.Generator().manual_seed(3))
    est = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0, consistency=True)
    assert torch.allclose(est.sum(-1), mix, atol=1e-5)
    plain = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    assert not torch.allclose(plain.sum(-1), mix, atol=1e-3)


TINY_CTN = """\
sample_rate: 8000
num_spks: 2
encoder: !new:speechbrain.lobes.models.conv_tasnet.Encoder
    L: 8
    N: 16
masknet: !new:speechbrain.lobes.models.conv_tasnet.MaskNet
    N: 16
    B: 8
    H: 8
    P: 3
    X: 1
    R: 1
    C: 2
    norm_type: gLN
    causal: False
    mask_nonlinear: relu
decoder: !new:speechbrain.lobes.models.conv_tasnet.Decoder
    L: 8
    N: 16
modules:
    encoder: !ref <encoder>
    masknet: !ref <masknet>
    decoder: !ref <decoder>
"""


def test_conv_tasnet_recipe_exports_to_a_separator_that_seeds_diffsep(separator, tmp_path):  # noqa: F811
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.checkpoints import Checkpointer

    from speechbrain_diffsep import export
    from speechbrain_diffsep.brain import conv_tasnet_forward

    run = tmp_path / "ctn_run"
    (run / "save").mkdir(parents=True)
    (run / "hyperparams.yaml").write_text(TINY_CTN)
    hp = load_hyperpyyaml(TINY_CTN)
    Checkpointer(str(run / "save"), recoverables=hp["modules"]).save_checkpoint(meta={"si_sdr": 1.0})
    assert export.main(["--from-recipe", str(run), "--out", str(tmp_path / "ctn")]) == 0
    sep = inference._load_separator(tmp_path / "ctn")
    assert isinstance(sep, inference.ConvTasNetSeparation)
    mix = 0.1 * torch.randn(2, 3000, generator=torch.Generator().manual_seed(4))
    est = sep.separate_batch(mix)
    with torch.no_grad():
        direct = conv_tasnet_forward(hp["encoder"], hp["masknet"], hp["decoder"], mix).transpose(1, 2)
    assert est.shape == (2, 3000, 2) and torch.allclose(est, direct, atol=1e-6)
    separator.set_initial_separator(sep, t_start=0.2)
    try:
        out = separator.separate_batch(mix, sampler="ode", num_steps=2, seed=0)
    finally:
        separator.set_initial_separator(None)
        separator.hparams.t_start = None
    assert out.shape == (2, 3000, 2) and torch.isfinite(out).all()
