"""SpectralTransform against the authors' compression values, torchaudio and round trips."""
import re

import pytest
import torch
import torchaudio

from speechbrain_diffsep.frontend import SpectralTransform

COMPRESSION_CASES = {
    "icassp-separation (spec_factor=0.15)": 0.15,
    "config/model/default.yaml (spec_factor=0.33)": 0.33,
}


def _complex64(pairs):
    t = torch.tensor(pairs, dtype=torch.float64)
    return torch.complex(t[:, 0], t[:, 1])


@pytest.mark.parametrize("case", list(COMPRESSION_CASES))
def test_compression_matches_reference(ref_values, case):
    ref = ref_values["amplitude_compression"]
    values = ref["values"][case]
    transform = SpectralTransform(exponent=ref["alpha (spec_abs_exponent)"], factor=COMPRESSION_CASES[case])
    x = _complex64(values["input"])
    forward = transform.compress(x)
    expected = _complex64(values["forward c(x) = beta*|x|^0.5*exp(j*angle x) [re, im]"])
    assert (forward - expected).abs().max() <= 1e-10
    back = transform.decompress(forward)
    assert (back - _complex64(values["backward(forward(x)) [re, im]"])).abs().max() <= 1e-10
    assert (back - x).abs().max() <= 1e-12


@pytest.mark.parametrize("exponent, factor", [(0.5, 0.15), (1.0, 0.33), (0.667, 3.0), (2.0, 0.5)])
def test_compression_closed_form(exponent, factor):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x = torch.complex(x[:, 0], x[:, 1])
    transform = SpectralTransform(exponent=exponent, factor=factor)
    c = transform.compress(x)
    assert torch.allclose(c.abs(), factor * x.abs() ** exponent, rtol=1e-12, atol=0)
    assert torch.allclose(torch.angle(c), torch.angle(x), rtol=0, atol=1e-12)
    assert torch.allclose(transform.decompress(c), x, rtol=1e-12, atol=1e-14)


def test_zero_bins_stay_finite_with_gradients():
    transform = SpectralTransform()
    spec = torch.zeros(1, 1, 256, 3, dtype=torch.complex128, requires_grad=True)
    assert torch.equal(transform.compress(spec.detach()), spec.detach())
    wav = transform.inverse(spec, 300)
    wav.sum().backward()
    assert torch.isfinite(spec.grad).all()


def test_stft_matches_torchaudio_reference_pipeline(ref_values):
    """Same numbers as the reference: pad right, torchaudio Spectrogram, compression."""
    desc = ref_values["network_shapes_and_params"]
    n = desc["input_4s_8kHz"]["n_samples"]
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    ours = SpectralTransform()(wav)
    assert ours.shape == (2, 3, 256, desc["input_4s_8kHz"]["stft_frames"])
    stft = torchaudio.transforms.Spectrogram(n_fft=510, hop_length=128, center=True, pad_mode="constant", power=None)
    ref = stft.double()(torch.nn.functional.pad(wav, (0, 510 - 128)))
    ref = ref.abs() ** 0.5 * torch.exp(1j * ref.angle()) * 0.15
    assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("n", [1, 127, 128, 383, 8000, 32000])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_round_trip(n, dtype, tol):
    transform = SpectralTransform()
    g = torch.Generator().manual_seed(n)
    wav = torch.randn(2, 2, n, generator=g).to(dtype)
    spec = transform(wav)
    assert spec.shape == (2, 2, 256, transform.num_frames(n))
    assert spec.shape[-1] == 1 + (n + 382) // 128
    back = transform.inverse(spec, n)
    assert back.shape == wav.shape and back.dtype == dtype
    assert (back - wav).abs().max() <= tol


def test_inverse_pads_and_crops_to_length():
    transform = SpectralTransform()
    wav = torch.randn(1, 1, 1000, dtype=torch.float64)
    spec = transform(wav)
    natural = (spec.shape[-1] - 1) * 128
    longer = transform.inverse(spec, natural + 50)
    assert longer.shape[-1] == natural + 50
    assert torch.equal(longer[..., natural:], torch.zeros(1, 1, 50, dtype=torch.float64))
    assert torch.allclose(longer[..., :1000], wav, atol=1e-12)
    assert transform.inverse(spec, 10).shape[-1] == 10


def test_window_is_periodic_hann_and_not_saved():
    transform = SpectralTransform()
    assert torch.equal(transform.window, torch.hann_window(510, periodic=True))
    assert "window" not in transform.state_dict()


def exactly(message):
    """``pytest.raises(match=...)`` pattern for exactly this one-line message."""
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_fft=1), "n_fft must be an integer >= 2, got 1"),
        (dict(n_fft=2.5, hop_length=1), "n_fft must be an integer >= 2, got 2.5"),
        (dict(hop_length=0), "hop_length must be an integer in [1, n_fft=510], got 0"),
        (dict(hop_length=511), "hop_length must be an integer in [1, n_fft=510], got 511"),
        (dict(hop_length=127.5), "hop_length must be an integer in [1, n_fft=510], got 127.5"),
        (dict(exponent=0.0), "exponent must be > 0, got 0.0"),
        (dict(factor=-0.15), "factor must be > 0, got -0.15"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        SpectralTransform(**kwargs)


@pytest.mark.parametrize("n_fft, hop_length", [(2, 1), (2, 2), (16, 1), (16, 16), (510, 510)])
def test_smallest_and_largest_valid_arguments(n_fft, hop_length):
    """n_fft = 2 and 1 <= hop_length <= n_fft are valid (the bounds are inclusive)."""
    transform = SpectralTransform(n_fft=n_fft, hop_length=hop_length)
    assert (transform.n_fft, transform.hop_length, transform.num_freqs) == (n_fft, hop_length, n_fft // 2 + 1)
    spec = transform(torch.randn(1, 2, 37, generator=torch.Generator().manual_seed(0)))
    assert spec.shape == (1, 2, n_fft // 2 + 1, transform.num_frames(37))


def test_window_follows_the_input_device():
    """The window buffer stays where the module is; each call moves it to the input's device."""
    transform = SpectralTransform()
    wav = torch.empty(2, 3, 1000, device="meta", dtype=torch.float64)
    spec = transform(wav)
    assert spec.device.type == "meta" and spec.dtype == torch.complex128
    assert spec.shape == (2, 3, 256, transform.num_frames(1000))
    assert transform.window.device.type == "cpu"


def test_bad_inputs():
    transform = SpectralTransform()
    hint = "; add the channel axis with wav.unsqueeze(1)"
    wav_msg = "wav must be a real tensor shaped (batch, channels, samples), got "
    with pytest.raises(ValueError, match=exactly(wav_msg + "(2, 100)" + hint)):
        transform(torch.randn(2, 100))
    with pytest.raises(ValueError, match=exactly(wav_msg + "(1, 1, 100)" + hint)):
        transform(torch.randn(1, 1, 100, dtype=torch.complex64))
    with pytest.raises(ValueError, match=exactly(wav_msg + "list" + hint)):
        transform([0.0, 1.0])
    with pytest.raises(ValueError, match=exactly("wav must have at least one sample")):
        transform(torch.randn(1, 1, 0))
    spec = transform(torch.randn(1, 1, 500))
    assert spec.shape == (1, 1, 256, 7)
    spec_msg = "spec must be a complex tensor shaped (batch, channels, freqs, frames), got "
    with pytest.raises(ValueError, match=exactly(spec_msg + "(1, 1, 256, 7)")):
        transform.inverse(spec.real, 500)
    with pytest.raises(ValueError, match=exactly(spec_msg + "(256, 7)")):
        transform.inverse(spec[0, 0], 500)
    with pytest.raises(ValueError, match=exactly(spec_msg + "ndarray")):
        transform.inverse(spec.numpy(), 500)
    with pytest.raises(ValueError, match=exactly("spec has 100 frequency bins, expected n_fft // 2 + 1 = 256")):
        transform.inverse(spec[:, :, :100], 500)
    for length in (0, -3, 2.5):
        with pytest.raises(ValueError, match=exactly(f"length must be a positive integer, got {length}")):
            transform.inverse(spec, length)
