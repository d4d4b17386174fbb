"""Time-frequency front end of the DiffSep score network.

The score network works on compressed complex STFTs (SGMSE+ / DiffSep convention):

* the waveform is right-padded with ``n_fft - hop_length`` zeros, so that the last samples are
  covered by a full frame;
* STFT with a periodic Hann window of length ``n_fft``, ``center=True`` with zero padding,
  one-sided, not normalized (``n_fft=510`` gives 256 frequency bins);
* amplitude compression ``c(X) = beta * |X|**alpha * exp(j angle X)`` (``alpha=0.5``,
  ``beta=0.15``; the authors' code *multiplies* by ``beta``).

The inverse undoes the compression, ``(|X| / beta)**(1 / alpha) * exp(j angle X)``, runs the
inverse STFT and crops (or zero-pads) the result to the requested length.
"""

import torch


def _check_positive(value, name):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


class SpectralTransform(torch.nn.Module):
    """Waveform <-> compressed complex spectrogram, as used around the NCSN++ backbone.

    Arguments
    ---------
    n_fft : int
        FFT size (and window length); ``n_fft // 2 + 1`` frequency bins.
    hop_length : int
        Hop between frames, in samples.
    exponent : float
        Magnitude compression exponent ``alpha`` (0 < alpha).
    factor : float
        Magnitude scale ``beta`` applied after compression (0 < beta).

    Example
    -------
    >>> transform = SpectralTransform()
    >>> wav = torch.randn(2, 3, 8000)
    >>> spec = transform(wav)
    >>> spec.shape, spec.dtype
    (torch.Size([2, 3, 256, 66]), torch.complex64)
    >>> back = transform.inverse(spec, 8000)
    >>> bool((back - wav).abs().max() < 1e-4)
    True
    """

    def __init__(self, n_fft=510, hop_length=128, exponent=0.5, factor=0.15):
        super().__init__()
        if int(n_fft) != n_fft or n_fft < 2:
            raise ValueError(f"n_fft must be an integer >= 2, got {n_fft}")
        if int(hop_length) != hop_length or not 0 < hop_length <= n_fft:
            raise ValueError(f"hop_length must be an integer in [1, n_fft={n_fft}], got {hop_length}")
        _check_positive(exponent, "exponent")
        _check_positive(factor, "factor")
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.exponent = float(exponent)
        self.factor = float(factor)
        # Not persistent: a constant, so checkpoints only hold learned weights.
        self.register_buffer(
            "window", torch.hann_window(self.n_fft, periodic=True), persistent=False
        )

    @property
    def num_freqs(self):
        """Number of frequency bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    def num_frames(self, num_samples):
        """Number of STFT frames :meth:`forward` gives for ``num_samples`` samples."""
        return 1 + (num_samples + self.n_fft - self.hop_length) // self.hop_length

    def compress(self, spec):
        """Amplitude compression ``beta * |X|**alpha * exp(j angle X)`` of a complex tensor."""
        mag = spec.abs()
        if self.exponent == 1.0:
            return spec * self.factor
        # X * |X|**(alpha-1) == |X|**alpha * exp(j angle X); 0 stays 0 (no atan2/sin/cos needed).
        gain = torch.where(mag > 0, mag, torch.ones_like(mag)).pow(self.exponent - 1.0)
        return spec * (gain * self.factor)

    def decompress(self, spec):
        """Inverse of :meth:`compress`: ``(|X| / beta)**(1 / alpha) * exp(j angle X)``."""
        spec = spec / self.factor
        if self.exponent == 1.0:
            return spec
        # (X / beta) * |X / beta|**(1/alpha - 1); smooth at 0 for alpha <= 1 (no angle()).
        return spec * spec.abs().pow(1.0 / self.exponent - 1.0)

    def _window_for(self, x):
        return self.window.to(device=x.device, dtype=x.real.dtype)

    def forward(self, wav):
        """Compressed complex spectrogram of a batch of multichannel waveforms.

        Arguments
        ---------
        wav : torch.Tensor
            Real waveforms shaped ``(batch, channels, samples)``.

        Returns
        -------
        torch.Tensor
            Complex tensor shaped ``(batch, channels, n_fft // 2 + 1, frames)`` with
            ``frames = 1 + (samples + n_fft - hop_length) // hop_length``.
        """
        if not torch.is_tensor(wav) or wav.dim() != 3 or wav.is_complex():
            shape = tuple(wav.shape) if torch.is_tensor(wav) else type(wav).__name__
            raise ValueError(
                f"wav must be a real tensor shaped (batch, channels, samples), got {shape}; "
                "add the channel axis with wav.unsqueeze(1)"
            )
        if wav.shape[-1] < 1:
            raise ValueError("wav must have at least one sample")
        batch, channels, _ = wav.shape
        wav = torch.nn.functional.pad(wav, (0, self.n_fft - self.hop_length))
        spec = torch.stft(
            wav.reshape(batch * channels, -1),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self._window_for(wav),
            center=True,
            pad_mode="constant",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = spec.reshape(batch, channels, *spec.shape[-2:])
        return self.compress(spec)

    def inverse(self, spec, length):
        """Waveforms from compressed complex spectrograms (inverse of :meth:`forward`).

        Arguments
        ---------
        spec : torch.Tensor
            Complex tensor shaped ``(batch, channels, n_fft // 2 + 1, frames)``.
        length : int
            Number of output samples; the inverse STFT is cropped or zero-padded to it.

        Returns
        -------
        torch.Tensor
            Real tensor shaped ``(batch, channels, length)``.
        """
        if not torch.is_tensor(spec) or not spec.is_complex() or spec.dim() != 4:
            shape = tuple(spec.shape) if torch.is_tensor(spec) else type(spec).__name__
            raise ValueError(
                f"spec must be a complex tensor shaped (batch, channels, freqs, frames), got {shape}"
            )
        if spec.shape[2] != self.num_freqs:
            raise ValueError(
                f"spec has {spec.shape[2]} frequency bins, expected n_fft // 2 + 1 = {self.num_freqs}"
            )
        if int(length) != length or length < 1:
            raise ValueError(f"length must be a positive integer, got {length}")
        length = int(length)
        batch, channels = spec.shape[:2]
        spec = self.decompress(spec)
        wav = torch.istft(
            spec.reshape(batch * channels, *spec.shape[-2:]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self._window_for(spec),
            center=True,
            normalized=False,
            onesided=True,
        )
        wav = wav.reshape(batch, channels, -1)
        if wav.shape[-1] >= length:
            return wav[..., :length]
        return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
