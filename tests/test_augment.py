"""speechbrain_diffsep.augment: each piece changes the signal as it says, measured; options; determinism."""

import math

import numpy as np
import pytest
import torch

from speechbrain_diffsep.augment import (
    DEFAULTS,
    SourceAugment,
    augment_and_remix,
    augment_source,
    biquad_coefficients,
    check_options,
)

SR = 8000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sine(freq, seconds=1.0, sr=SR):
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t).float()


def noise(seconds=2.0, seed=1):
    return torch.randn(int(seconds * SR), generator=gen(seed))


def band_energy(x, lo, hi, sr=SR):
    spec = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return float(spec[(f >= lo) & (f < hi)].sum())


def peak_freq(x, sr=SR):
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def db(x):
    return 10 * math.log10(x)


def rt60_of(h, sr=SR):
    """RT60 of an impulse response by Schroeder backward integration: a line fitted to the energy
    decay curve from 5 to 25 dB below its level 5 ms after the direct path, extrapolated to 60 dB."""
    h = np.asarray(h, dtype=np.float64)
    start = int(np.argmax(np.abs(h))) + int(0.005 * sr)
    edc = np.cumsum((h[start:] ** 2)[::-1])[::-1]
    if edc[0] == 0.0:
        return 0.0
    edc_db = 10 * np.log10(edc / edc[0] + 1e-30)
    sel = (edc_db <= -5) & (edc_db >= -25)
    if sel.sum() < 2:
        return 0.0
    t = np.arange(len(edc_db))[sel] / sr
    slope = np.polyfit(t, edc_db[sel], 1)[0]
    return -60.0 / slope


# --------------------------------------------------------------------------- options
def test_everything_is_off_by_default():
    x = noise()
    y = augment_source(x, SR, gen())
    assert torch.equal(x, y)
    assert all(DEFAULTS[k] == 0.0 for k in DEFAULTS if k.endswith("_prob"))
    assert not SourceAugment().active


def test_enabled_false_is_the_identity():
    x = noise()
    assert torch.equal(augment_source(x, SR, gen(), enabled=False, noise_prob=1.0), x)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"speeed_prob": 1.0}, "unknown augmentation option 'speeed_prob'; known options: bandlimit_order"),
        ({"noise_prob": 2.0}, "augmentation option noise_prob must lie in [0, 1], got 2.0"),
        ({"speed_range": [1.1, 0.9]}, "augmentation option speed_range must have low <= high, got [1.1, 0.9]"),
        ({"speed_range": [0.0, 1.1]}, "augmentation option speed_range must be positive"),
        ({"eq_types": ["notch"]}, "augmentation option eq_types must be a non-empty list among"),
        ({"reverb_method": "convolve"}, "augmentation option reverb_method must be one of ['ism', 'synthetic']"),
        ({"highpass_hz": [3000, 3500]}, "augmentation option highpass_hz [3000.0, 3500.0] must lie below lowpass_hz"),
        ({"noise_color": "blue"}, "augmentation option noise_color must be one of ['white', 'pink']"),
        ({"reverb_room_min": [1, 2]}, "augmentation option reverb_room_min must be 3 room dimensions"),
        ({"codec_bits": 1}, "augmentation option codec_bits must be an integer in [2, 16]"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as exc:
        check_options(options)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"wav must be a 1-D tensor \(samples,\), got \(2, 10\)"):
        augment_source(torch.zeros(2, 10), SR, gen(), noise_prob=1.0)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got int"):
        augment_source(torch.zeros(10), SR, 0, noise_prob=1.0)


ALL_ON = dict(speed_prob=1.0, formant_prob=1.0, eq_prob=1.0, level_prob=1.0, reverb_prob=1.0,
              reverb_method="synthetic", bandlimit_prob=1.0, codec_prob=1.0, noise_prob=1.0)


def test_deterministic_for_a_generator_and_different_for_another():
    x = noise(1.0)
    a = augment_source(x, SR, gen(3), **ALL_ON)
    b = augment_source(x, SR, gen(3), **ALL_ON)
    c = augment_source(x, SR, gen(4), **ALL_ON)
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.allclose(a, c)


def test_switching_a_piece_off_keeps_the_draws_of_the_others():
    x = noise(1.0)
    with_level = augment_source(x, SR, gen(5), noise_prob=1.0, level_prob=1.0, level_db=[0.0, 0.0])
    without = augment_source(x, SR, gen(5), noise_prob=1.0)
    assert torch.allclose(with_level, without, atol=1e-6)


# --------------------------------------------------------------------------- speed and formants
@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_speed_changes_duration_and_pitch_by_the_factor(factor):
    x = sine(500.0, 1.0)
    y = augment_source(x, SR, gen(), speed_prob=1.0, speed_range=[factor, factor])
    assert abs(y.shape[-1] - x.shape[-1] / factor) <= 1
    assert abs(peak_freq(y) - 500.0 * factor) <= 5.0


def test_speed_draws_within_the_range():
    x = sine(400.0, 1.0)
    lengths = {augment_source(x, SR, gen(s), speed_prob=1.0, speed_range=[0.9, 1.1]).shape[-1] for s in range(8)}
    assert len(lengths) > 1
    assert all(SR / 1.1 - 1 <= n <= SR / 0.9 + 1 for n in lengths)


@pytest.mark.parametrize("alpha", [0.85, 1.2])
def test_formant_shift_keeps_the_duration_and_moves_the_spectrum(alpha):
    x = sine(500.0, 1.0)
    y = augment_source(x, SR, gen(), formant_prob=1.0, formant_alpha=[alpha, alpha])
    assert y.shape == x.shape
    assert abs(peak_freq(y[1000:-1000]) - 500.0 * alpha) <= 10.0


def test_formant_shift_without_stretch_changes_the_duration():
    x = sine(500.0, 1.0)
    y = augment_source(x, SR, gen(), formant_prob=1.0, formant_alpha=[1.2, 1.2], formant_keep_duration=False)
    assert abs(y.shape[-1] - SR / 1.2) <= 1
    assert SourceAugment(formant_prob=1.0, formant_alpha=[0.9, 1.2], formant_keep_duration=False,
                         speed_prob=1.0, speed_range=[0.9, 1.1]).max_length_factor == pytest.approx(1.2 * 1.1 + 0.01)


# --------------------------------------------------------------------------- EQ and level
@pytest.mark.parametrize("gain_db", [-6.0, 9.0])
def test_eq_gain_at_the_centre_frequency_within_1_db(gain_db):
    x = sine(1000.0, 1.0)
    y = augment_source(x, SR, gen(), eq_prob=1.0, eq_bands=1, eq_types=["peaking"], eq_freq_hz=[1000, 1000],
                       eq_gain_db=[gain_db, gain_db], eq_q=[1.0, 1.0])
    measured = db(float((y[2000:] ** 2).mean() / (x[2000:] ** 2).mean()))
    assert abs(measured - gain_db) < 1.0
    # far from the centre the peaking filter leaves the signal alone
    far = sine(100.0, 1.0)
    y_far = augment_source(far, SR, gen(), eq_prob=1.0, eq_bands=1, eq_types=["peaking"], eq_freq_hz=[1000, 1000],
                           eq_gain_db=[gain_db, gain_db], eq_q=[2.0, 2.0])
    assert abs(db(float((y_far[2000:] ** 2).mean() / (far[2000:] ** 2).mean()))) < 0.5


@pytest.mark.parametrize("kind, low_db, high_db", [("lowshelf", 6.0, 0.0), ("highshelf", 0.0, 6.0)])
def test_shelves_lift_their_side_of_the_spectrum(kind, low_db, high_db):
    from scipy.signal import freqz

    b, a = biquad_coefficients(kind, 1000.0, 6.0, 1 / math.sqrt(2), SR)
    _, h = freqz(b, a, worN=[50.0, 3900.0], fs=SR)
    assert 20 * np.log10(np.abs(h)) == pytest.approx([low_db, high_db], abs=0.3)


def test_level_gain_in_range():
    x = noise(1.0)
    for seed in range(5):
        y = augment_source(x, SR, gen(seed), level_prob=1.0, level_db=[-6.0, 3.0])
        g = db(float((y**2).mean() / (x**2).mean()))
        assert -6.0 - 1e-4 <= g <= 3.0 + 1e-4


# --------------------------------------------------------------------------- reverberation
def impulse(seconds=2.0):
    x = torch.zeros(int(seconds * SR))
    x[100] = 1.0
    return x


@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_synthetic_reverb_gives_the_requested_rt60_within_15_percent(rt60):
    x = impulse()
    assert rt60_of(x) == 0.0  # a dry impulse does not decay
    y = augment_source(x, SR, gen(), reverb_prob=1.0, reverb_method="synthetic", reverb_rt60=[rt60, rt60],
                       reverb_drr_db=[0.0, 0.0])
    assert y.shape == x.shape
    assert int(torch.argmax(y.abs())) == 100  # direct path aligned with the dry signal
    assert float(y[100]) == pytest.approx(1.0)
    assert abs(rt60_of(y) - rt60) < 0.15 * rt60


def test_ism_reverb_lengthens_the_decay_or_names_the_missing_package():
    try:
        import pyroomacoustics  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"reverb_method 'ism' needs pyroomacoustics; pip install"):
            SourceAugment(reverb_prob=1.0, reverb_method="ism")
        return
    x = impulse()
    measured = []
    for rt60 in (0.25, 0.6):
        y = augment_source(x, SR, gen(), reverb_prob=1.0, reverb_method="ism", reverb_rt60=[rt60, rt60],
                           reverb_room_min=[5, 4, 3], reverb_room_max=[5, 4, 3])
        assert y.shape == x.shape and int(torch.argmax(y.abs())) == 100
        measured.append(rt60_of(y))
        # Sabine's inversion and the image method agree within 25 % (measured: 0.237 s, 0.657 s)
        assert 0.75 * rt60 < measured[-1] < 1.25 * rt60
    assert measured[1] > 1.5 * measured[0]


def test_ism_without_pyroomacoustics_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyroomacoustics", None)  # import fails as if not installed
    with pytest.raises(ValueError) as exc:
        SourceAugment(reverb_prob=0.5, reverb_method="ism")
    assert str(exc.value) == ("augmentation option reverb_method 'ism' needs pyroomacoustics; "
                              "pip install 'speechbrain-diffsep[augment]' (or set reverb_method: synthetic)")
    SourceAugment(reverb_prob=0.0, reverb_method="ism")  # not needed while reverberation is off


def test_reverb_bank_reuses_a_fixed_set_of_rooms():
    aug = SourceAugment(reverb_prob=1.0, reverb_method="synthetic", reverb_bank_size=2, reverb_bank_seed=7)
    x = impulse(1.0)
    outs = [aug(x, SR, gen(s)) for s in range(8)]
    distinct = {tuple(o[100:400].numpy().round(6)) for o in outs}
    assert len(distinct) == 2
    other = SourceAugment(reverb_prob=1.0, reverb_method="synthetic", reverb_bank_size=2, reverb_bank_seed=7)
    assert torch.equal(other(x, SR, gen(0)), outs[0])  # the bank depends on its seed only


# --------------------------------------------------------------------------- band-limiting, codec, noise
def test_bandlimit_removes_energy_outside_the_telephone_band():
    x = noise(2.0)
    y = augment_source(x, SR, gen(), bandlimit_prob=1.0, lowpass_hz=[3000, 3000], highpass_hz=[300, 300])
    stop_high = db(band_energy(y, 3600, 4000) / band_energy(x, 3600, 4000))
    stop_low = db(band_energy(y, 0, 120) / band_energy(x, 0, 120))
    pass_band = db(band_energy(y, 800, 2400) / band_energy(x, 800, 2400))
    assert stop_high < -30.0
    assert stop_low < -30.0
    assert abs(pass_band) < 0.5


def test_lowpass_only_and_above_nyquist_is_skipped():
    x = noise(2.0)
    y = augment_source(x, SR, gen(), bandlimit_prob=1.0, lowpass_hz=[3400, 3400], highpass_hz=None)
    assert db(band_energy(y, 3800, 4000) / band_energy(x, 3800, 4000)) < -25.0
    assert abs(db(band_energy(y, 0, 1000) / band_energy(x, 0, 1000))) < 0.5
    same = augment_source(x, SR, gen(), bandlimit_prob=1.0, lowpass_hz=[7000, 7000], highpass_hz=None)
    assert torch.allclose(same, x, atol=1e-6)


def test_mu_law_quantizes_to_256_levels_at_about_38_db_snr():
    x = 0.5 * sine(300.0, 1.0) + 0.01 * noise(1.0)
    y = augment_source(x, SR, gen(), codec_prob=1.0, codec_bits=8)
    levels = torch.unique(torch.round(y / float(x.abs().max()) * 1e5))
    assert 30 < levels.numel() <= 256
    snr = db(float((x**2).mean() / ((y - x) ** 2).mean()))
    assert 25.0 < snr < 45.0


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr_db", [10.0, 25.0])
def test_noise_at_the_requested_snr_within_half_a_db(color, snr_db):
    x = sine(440.0, 1.0) * 0.3
    y = augment_source(x, SR, gen(), noise_prob=1.0, noise_snr_db=[snr_db, snr_db], noise_color=color)
    assert abs(db(float((x**2).mean() / ((y - x) ** 2).mean())) - snr_db) < 0.5
    if color == "pink":  # more noise energy below 500 Hz than above 2 kHz
        n = y - x
        assert band_energy(n, 20, 500) > 3 * band_energy(n, 2000, 4000)


def test_probability_is_respected():
    x = noise(0.2)
    changed = sum(not torch.equal(augment_source(x, SR, gen(s), noise_prob=0.5), x) for s in range(200))
    assert 70 < changed < 130


# --------------------------------------------------------------------------- re-mixing
def test_augment_and_remix_mixture_is_the_sum_of_the_sources():
    src = torch.stack([noise(0.5, 1), noise(0.5, 2)])
    mix, out = augment_and_remix(src, SR, gen(), dict(ALL_ON, speed_range=[1.1, 1.1]))
    assert out.shape == src.shape
    assert torch.equal(mix, out.sum(0))
    assert not torch.allclose(out, src)
