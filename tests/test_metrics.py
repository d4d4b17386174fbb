"""Tests for speechbrain_diffsep.metrics: closed forms, independent implementations, real speech."""

import csv
import logging
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from speechbrain_diffsep.metrics import (
    SeparationMetricStats,
    apply_permutation,
    best_permutation,
    dnsmos,
    estoi_score,
    evaluate_separation,
    pairwise_si_sir,
    pesq_score,
    si_bss_eval,
    si_sdr,
    si_sdr_improvement,
)


def _orthogonal(n, k, seed=0):
    """k mutually orthogonal zero-mean unit-norm signals of length n (rows), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k + 1, generator=g, dtype=torch.float64)
    x[:, 0] = 1.0  # orthogonalize against the constant so every column is zero-mean
    q, _ = torch.linalg.qr(x)
    return q[:, 1:].T.contiguous()


def _numpy_si_sdr(est, ref):
    """Textbook zero-mean SI-SDR with numpy, one pair of 1-D signals."""
    est = est - est.mean()
    ref = ref - ref.mean()
    target = np.dot(est, ref) / np.dot(ref, ref) * ref
    return 10 * np.log10(np.sum(target**2) / np.sum((est - target) ** 2))


# --------------------------------------------------------------------------- SI-SDR
def test_si_sdr_matches_numpy_projection_formula():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 2, 500, generator=g, dtype=torch.float64) + 0.3
    est = 0.7 * ref + 0.5 * torch.randn(3, 2, 500, generator=g, dtype=torch.float64) - 0.2
    got = si_sdr(est, ref)
    expected = np.array(
        [[_numpy_si_sdr(est[b, k].numpy(), ref[b, k].numpy()) for k in range(2)] for b in range(3)]
    )
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_si_sdr_matches_speechbrain_si_snr():
    from speechbrain.nnet.losses import cal_si_snr

    g = torch.Generator().manual_seed(2)
    ref = torch.randn(4, 2, 800, generator=g)
    est = ref + 0.3 * torch.randn(4, 2, 800, generator=g)
    # speechbrain wants (T, B, C) and returns minus SI-SNR shaped (1, B, C)
    sb = -cal_si_snr(ref.permute(2, 0, 1).clone(), est.permute(2, 0, 1).clone())[0]
    torch.testing.assert_close(si_sdr(est, ref), sb, atol=1e-3, rtol=0)


@pytest.mark.parametrize("target_db", [-10.0, 0.0, 7.5, 30.0])
@pytest.mark.parametrize("scale", [1.0, 0.01, -5.0])
def test_si_sdr_closed_form_orthogonal_noise(target_db, scale):
    ref, noise = _orthogonal(1000, 2, seed=3) * 3.0
    est = scale * (ref + 10 ** (-target_db / 20) * noise)  # same-norm noise, target_db below
    assert float(si_sdr(est, ref)) == pytest.approx(target_db, abs=1e-9)


def test_si_sdr_zero_mean_option():
    ref, noise = _orthogonal(1000, 2, seed=4)
    est = ref + 0.1 * noise
    offset = 0.05
    assert float(si_sdr(est + offset, ref)) == pytest.approx(20.0, abs=1e-9)
    # without mean removal the constant is orthogonal to ref (zero-mean) and counts as distortion
    expected = 10 * math.log10(1.0 / (0.01 + offset**2 * 1000))
    assert float(si_sdr(est + offset, ref, zero_mean=False)) == pytest.approx(expected, abs=1e-9)


def test_si_sdr_clamp_and_dtype():
    ref = torch.randn(2, 300)
    assert si_sdr(ref, ref, clamp_db=100.0).tolist() == [100.0, 100.0]
    assert si_sdr(-ref, ref).dtype == torch.float32
    assert si_sdr(torch.zeros(2, 300), ref, clamp_db=100.0).tolist() == [-100.0, -100.0]


@pytest.mark.parametrize(
    "est_shape, ref_shape",
    [((2, 100), (2, 99)), ((1, 2, 100), (2, 100))],
)
def test_si_sdr_shape_mismatch_message(est_shape, ref_shape):
    with pytest.raises(ValueError, match=r"est and ref must have the same shape"):
        si_sdr(torch.randn(*est_shape), torch.randn(*ref_shape))


def test_si_sdr_rejects_non_tensor():
    with pytest.raises(ValueError, match="est must be a torch.Tensor"):
        si_sdr([0.0, 1.0], torch.randn(2))


def test_si_sdr_improvement_closed_form():
    s1, s2 = _orthogonal(1200, 2, seed=5)
    ref = torch.stack([s1, 2 * s2])[None]  # powers 1 and 4
    mix = ref.sum(1, keepdim=True)
    # mixture SI-SDR: source 1 -> 10log10(1/4), source 2 -> 10log10(4/1)
    np.testing.assert_allclose(si_sdr(mix.expand_as(ref), ref)[0].numpy(), [-6.0206, 6.0206], atol=1e-4)
    est = ref + 0.1 * torch.stack([s2, s1])[None] * torch.tensor([1.0, 2.0]).view(1, 2, 1)
    expected = si_sdr(est, ref) - si_sdr(mix.expand_as(ref), ref)
    torch.testing.assert_close(si_sdr_improvement(est, ref, mix), expected)
    np.testing.assert_allclose(si_sdr_improvement(est, ref, mix)[0].numpy(), [20 + 6.0206, 20 - 6.0206], atol=1e-4)
    assert si_sdr_improvement(mix.expand_as(ref), ref, mix).abs().max() < 1e-9


def test_si_sdr_improvement_bad_mix_shape():
    with pytest.raises(ValueError, match="mix shape"):
        si_sdr_improvement(torch.randn(1, 2, 100), torch.randn(1, 2, 100), torch.randn(3, 1, 100))


# --------------------------------------------------------------------------- SI-SIR and permutation
def test_si_bss_eval_closed_form():
    s1, s2, art = _orthogonal(2000, 3, seed=6)
    ref = torch.stack([s1, s2])[None]
    # est_1 = s1 + 0.1 s2 + 0.01 art : SIR 20 dB, SAR = 10log10(1.01 / 1e-4), SDR = 10log10(1/(0.01+1e-4))
    est = torch.stack([s1 + 0.1 * s2 + 0.01 * art, 0.5 * s2 + 0.05 * art])[None]
    sdr, sir, sar = si_bss_eval(est, ref)
    np.testing.assert_allclose(sir[0, 0], 20.0, atol=1e-8)
    np.testing.assert_allclose(sar[0, 0], 10 * math.log10(1.01 / 1e-4), atol=1e-8)
    np.testing.assert_allclose(sdr[0, 0], 10 * math.log10(1 / 0.0101), atol=1e-8)
    assert float(sir[0, 1]) > 100.0  # no interference at all (only rounding)
    assert float(si_bss_eval(est, ref, clamp_db=50.0)[1][0, 1]) == 50.0
    np.testing.assert_allclose(sar[0, 1], 20.0, atol=1e-8)
    # pairwise matrix: est 1 measured against ref 2 has SIR -20 dB
    np.testing.assert_allclose(pairwise_si_sir(est, ref)[0, 1, 0], -20.0, atol=1e-8)


@pytest.mark.parametrize("n_src", [2, 3])
def test_best_permutation_recovers_shuffled_estimates(n_src):
    g = torch.Generator().manual_seed(7 + n_src)
    ref = torch.randn(6, n_src, 1000, generator=g)
    est_aligned = ref + 0.5 * torch.randn(6, n_src, 1000, generator=g)
    # est_aligned leaks a bit of every other source, as a real separator would
    est_aligned = est_aligned + 0.2 * ref.sum(1, keepdim=True)
    true_perm = torch.stack([torch.randperm(n_src, generator=g) for _ in range(6)])
    shuffled = torch.empty_like(est_aligned)
    for b in range(6):
        shuffled[b, true_perm[b]] = est_aligned[b]  # est index true_perm[b,k] holds source k
    perm = best_permutation(shuffled, ref)
    assert torch.equal(perm, true_perm)
    torch.testing.assert_close(apply_permutation(shuffled, perm), est_aligned)


def test_best_permutation_uses_sir_not_sdr():
    """A case where mean SI-SDR and mean SI-SIR disagree: the SI-SIR choice must win."""
    s1, s2, art = _orthogonal(1000, 3, seed=8)
    ref = torch.stack([s1, s2])[None]
    # est 0: s1 dominant over s2 but buried in artifacts; est 1: s1 + 0.6 s2, no artifacts
    est = torch.stack([s1 + 0.5 * s2 + 10 * art, s1 + 0.6 * s2])[None]
    sdr = lambda e, r: float(si_sdr(e, r))  # noqa: E731
    sdr_identity = sdr(est[0, 0], s1) + sdr(est[0, 1], s2)
    sdr_swap = sdr(est[0, 1], s1) + sdr(est[0, 0], s2)
    assert sdr_swap > sdr_identity + 1.0  # SI-SDR would swap
    assert best_permutation(est, ref).tolist() == [[0, 1]]  # SI-SIR keeps the order


def test_matches_fast_bss_eval():
    fbe = pytest.importorskip("fast_bss_eval")
    g = torch.Generator().manual_seed(9)
    ref = torch.randn(5, 3, 1500, generator=g, dtype=torch.float64)
    mixing = 0.4 * torch.randn(5, 3, 3, generator=g, dtype=torch.float64) + torch.eye(3, dtype=torch.float64)
    est = (mixing @ ref + 0.3 * torch.randn(5, 3, 1500, generator=g, dtype=torch.float64))[:, [2, 0, 1]] + 0.05
    sdr, sir, sar, perm = fbe.si_bss_eval_sources(ref, est, zero_mean=False, compute_permutation=True)
    mine = best_permutation(est, ref)
    assert torch.equal(mine, perm)
    ours = si_bss_eval(apply_permutation(est, mine), ref)
    for a, b in zip(ours, (sdr, sir, sar)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- real speech
SENTENCES = {
    "slt": "The quick brown fox jumps over the lazy dog near the river bank.",
    "rms": "Please call Stella and ask her to bring these things with her from the store.",
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two 2.5 s real speech signals (flite voices slt and rms), at 16 kHz and 8 kHz."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    folder = tmp_path_factory.mktemp("speech")
    sigs = []
    for voice, text in SENTENCES.items():
        path = folder / f"{voice}.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True)
        x, fs = sf.read(path, dtype="float32")
        assert fs == 16000
        sigs.append(torch.from_numpy(x[: int(2.5 * fs)]))
    s16 = torch.stack(sigs)
    return {16000: s16, 8000: torchaudio.functional.resample(s16, 16000, 8000)}


def _add_noise(x, snr_db, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    return x + noise * x.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True) * 10 ** (-snr_db / 20)


@pytest.mark.parametrize("fs, max_pesq", [(8000, 4.55), (16000, 4.65)])
def test_pesq_and_estoi_on_speech(speech, fs, max_pesq):
    clean = speech[fs]
    p_clean = pesq_score(clean, clean, fs)
    assert p_clean.shape == (2,)
    assert ((p_clean > max_pesq - 0.1) & (p_clean <= max_pesq)).all()  # nb tops at 4.549, wb at 4.644
    np.testing.assert_allclose(estoi_score(clean, clean, fs).numpy(), 1.0, atol=1e-6)
    p_prev, e_prev = p_clean, torch.ones(2, dtype=torch.float64)
    for snr in (30, 10, 0):
        noisy = _add_noise(clean, snr, seed=snr)
        p, e = pesq_score(noisy, clean, fs), estoi_score(noisy, clean, fs)
        assert ((p >= 1.0) & (p < p_prev)).all(), (snr, p)
        assert ((e > 0) & (e < e_prev)).all(), (snr, e)
        p_prev, e_prev = p, e
    # the other talker is a very poor estimate
    assert (estoi_score(clean.flip(0), clean, fs) < 0.3).all()


def test_pesq_mode_matches_pesq_package(speech):
    from pesq import pesq

    clean, noisy = speech[16000][0], _add_noise(speech[16000][0], 10, seed=1)
    assert float(pesq_score(noisy, clean, 16000)) == pytest.approx(pesq(16000, clean.numpy(), noisy.numpy(), "wb"))
    assert float(pesq_score(noisy, clean, 16000, mode="nb")) == pytest.approx(pesq(16000, clean.numpy(), noisy.numpy(), "nb"))


def test_pesq_failure_gives_nan_and_warning(speech, caplog):
    clean = speech[8000][0]
    with caplog.at_level(logging.WARNING, logger="speechbrain_diffsep.metrics"):
        out = pesq_score(clean, torch.zeros_like(clean), 8000)
    assert math.isnan(float(out))
    assert "NoUtterancesError" in caplog.text


@pytest.mark.parametrize("fs, mode, match", [(44100, None, "fs must be 8000 or 16000"), (8000, "wb", "mode must be")])
def test_pesq_bad_rate_or_mode(fs, mode, match):
    with pytest.raises(ValueError, match=match):
        pesq_score(torch.randn(8000), torch.randn(8000), fs, mode=mode)


def test_dnsmos_speech_beats_noise(speech):
    pytest.importorskip("speechmos", reason="speechmos not installed (pip install speechbrain-diffsep[eval])")
    clean = speech[8000][0]
    noise = 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    scores = dnsmos(torch.stack([clean, noise]), 8000)
    assert set(scores) == {"ovrl", "sig", "bak"}
    for key, val in scores.items():
        assert val.shape == (2,)
        assert ((val >= 1.0) & (val <= 5.0)).all(), (key, val)
        assert val[0] > val[1] + 0.5, (key, val)


def test_dnsmos_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "speechmos", None)
    with pytest.raises(ImportError, match=r"pip install speechbrain-diffsep\[eval\]"):
        dnsmos(torch.randn(16000), 16000)


# --------------------------------------------------------------------------- utterance / stats
def test_evaluate_separation_on_speech(speech):
    ref = speech[8000]
    mix = ref.sum(0)
    est = _add_noise(ref, 15, seed=3).flip(0)  # swapped and noisy
    out = evaluate_separation(est, ref, mix, 8000, metrics=("si_sdr", "si_sdri", "si_sir", "pesq", "estoi"))
    assert out["perm"] == [1, 0]
    aligned = est.flip(0)
    np.testing.assert_allclose(out["si_sdr"], si_sdr(aligned, ref, zero_mean=False).numpy(), atol=1e-4)
    np.testing.assert_allclose(out["si_sdr"], [15.0, 15.0], atol=0.05)  # noise nearly orthogonal
    mix_sdr = si_sdr(mix.expand(2, -1), ref, zero_mean=False).double().numpy()
    np.testing.assert_allclose(out["si_sdri"], np.array(out["si_sdr"]) - mix_sdr, atol=1e-4)
    np.testing.assert_allclose(out["pesq"], pesq_score(aligned, ref, 8000).numpy())
    np.testing.assert_allclose(out["estoi"], estoi_score(aligned, ref, 8000).numpy())
    assert list(out) == ["si_sdr", "si_sdri", "si_sir", "pesq", "estoi", "perm"]


@pytest.mark.parametrize("bad", ["sdr", "stoi"])
def test_evaluate_separation_unknown_metric(bad):
    with pytest.raises(ValueError, match=f"unknown metric '{bad}'"):
        evaluate_separation(torch.randn(2, 100), torch.randn(2, 100), torch.randn(100), 8000, metrics=(bad,))


def test_separation_metric_stats(tmp_path):
    g = torch.Generator().manual_seed(10)
    ref = torch.randn(3, 2, 1600, generator=g)
    mix = ref.sum(1, keepdim=True)
    snrs = torch.tensor([5.0, 10.0, 20.0]).view(3, 1, 1)
    est = _add_noise(ref, snrs, seed=11)
    est[1] = est[1].flip(0)
    stats = SeparationMetricStats(fs=8000, metrics=("si_sdr", "si_sdri"))
    stats.append(["u1", "u2"], est[:2], ref[:2], mix[:2])
    stats.append(["u3"], est[2:], ref[2:], mix[2:, 0])  # (batch, samples) mixture also accepted
    summary = stats.summarize()
    per_utt = np.array([np.mean(evaluate_separation(est[b], ref[b], mix[b], 8000, ("si_sdr",))["si_sdr"]) for b in range(3)])
    np.testing.assert_allclose(per_utt, [5, 10, 20], atol=0.3)
    assert summary["n_utts"] == 3
    assert summary["si_sdr"] == pytest.approx(per_utt.mean())
    assert summary["si_sdr_std"] == pytest.approx(per_utt.std())
    assert stats.summarize("si_sdr") == summary["si_sdr"]

    path = tmp_path / "sub" / "metrics.csv"
    stats.write_csv(path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == ["u1", "u2", "u3", "avg"]
    assert list(rows[0]) == ["ID", "si_sdr", "si_sdr_s1", "si_sdr_s2", "si_sdri", "si_sdri_s1", "si_sdri_s2"]
    np.testing.assert_allclose([float(r["si_sdr"]) for r in rows[:3]], per_utt, rtol=1e-6)
    assert float(rows[3]["si_sdr"]) == pytest.approx(per_utt.mean())

    import io

    buf = io.StringIO()
    stats.write_stats(buf)
    assert buf.getvalue().startswith("3 utterances\nsi_sdr: ")


def test_separation_metric_stats_lengths_crop():
    g = torch.Generator().manual_seed(12)
    ref = torch.randn(1, 2, 2000, generator=g)
    est = ref + 0.1 * torch.randn(1, 2, 2000, generator=g)
    est[..., 1000:] = 0.0  # padding garbage: zeros where ref still has signal
    full = SeparationMetricStats(fs=8000, metrics=("si_sdr",))
    full.append(["a"], est, ref, ref.sum(1))
    cropped = SeparationMetricStats(fs=8000, metrics=("si_sdr",))
    cropped.append(["a"], est, ref, ref.sum(1), lengths=torch.tensor([0.5]))
    assert full.summarize("si_sdr") < 5.0
    assert cropped.summarize("si_sdr") == pytest.approx(20.0, abs=0.5)


def test_separation_metric_stats_errors():
    stats = SeparationMetricStats(fs=8000, metrics=("si_sdr",))
    with pytest.raises(ValueError, match="no utterance scored yet"):
        stats.summarize()
    with pytest.raises(ValueError, match="got 1 ids for a batch of 2"):
        stats.append(["a"], torch.randn(2, 2, 100), torch.randn(2, 2, 100), torch.randn(2, 1, 100))
