"""On-the-fly voice and channel augmentation of each SOURCE before mixing.

Every piece is off by default (probability 0) and tuned from the yaml's ``augmentation:`` block.
They run in this order on one source ``wav`` (1-D tensor), each with its own probability:

============  ===============================================================================
piece         what it does (options)
============  ===============================================================================
speed         speed perturbation: resample by ``s`` (``speed_range``, quantized to 1 % as
              SpeechBrain's ``SpeedPerturb``), so the duration is divided by ``s`` and every
              frequency multiplied by it (:func:`resample_by`)
formant       vocal-tract-length perturbation: resample by ``alpha`` (``formant_alpha``) to move
              pitch and formants by ``alpha``; with ``formant_keep_duration`` a phase-vocoder
              time-stretch restores the duration (a pitch/formant shift), without it the duration
              changes by ``1 / alpha`` as well. One synthetic voice becomes many speakers.
eq            ``eq_bands`` random biquads (RBJ cookbook peaking / low-shelf / high-shelf,
              ``eq_types``), centre frequency log-uniform in ``eq_freq_hz``, gain uniform in
              ``eq_gain_db``, Q uniform in ``eq_q`` (shelves use Q = 0.707)
level         a gain uniform in ``level_db`` (a no-op under dynamic mixing, which sets the
              level of each source after augmentation)
reverb        room reverberation with a simulated impulse response (see below), RT60 uniform in
              ``reverb_rt60``; the direct path stays aligned with the dry signal, length kept
reverb_method ``"ism"``: pyroomacoustics' ShoeBox image-source method (``pip install
              speechbrain-diffsep[augment]``), room size uniform between ``reverb_room_min`` and
              ``reverb_room_max`` (metres), source and microphone anywhere 0.5 m from the walls,
              wall absorption from Sabine's formula for the RT60 (``reverb_max_order`` caps the
              image order, for speed); ``"synthetic"``: a direct path plus exponentially decaying
              Gaussian noise (60 dB down at the RT60) at a direct-to-reverberant ratio uniform in
              ``reverb_drr_db``, no dependency. ``reverb_bank_size`` > 0 draws from a fixed bank
              of that many rooms (from ``reverb_bank_seed``, each computed once then cached),
              because an ISM room costs 0.1-2 s of CPU.
bandlimit     telephone-like band-limiting: Butterworth (``bandlimit_order``) low-pass at a
              cutoff uniform in ``lowpass_hz`` (skipped above 0.49 x the sample rate) and, unless
              ``highpass_hz`` is null, a high-pass at a cutoff uniform in ``highpass_hz``
codec         codec simulation: ``codec_bits``-bit mu-law companding (G.711 at 8 bits,
              ``torchaudio.functional.mu_law_encoding``), of the signal scaled to its peak
noise         mild noise (``noise_color`` white or pink) at an SNR uniform in ``noise_snr_db``
              (exact: the SNR is the ratio of the source's power to the added noise's power)
============  ===============================================================================

Targets of the separation (DiffSep needs estimates that sum to the mixture, so the mixture must
be EXACTLY the sum of the targets, :mod:`speechbrain_diffsep.dynamic_mixing`):

* reverberation: the mixture is the sum of the reverberant sources, so the targets are the
  REVERBERANT sources (the model separates, it does not dereverberate);
* noise is "channel" noise of each source, added to each source separately (as if every talker
  had their own noisy microphone): the noise belongs to its source's target, and the mixture,
  the sum of the noisy sources, still equals the sum of the targets. (The alternative, one
  common noise split equally among the K targets, would ask the model to split a signal that
  belongs to no talker in an arbitrary way.)
* band-limiting and the codec are applied per source as well (a per-talker channel); they are
  not applied to the mixture afterwards, which would break ``mix == sum(sources)``.

Determinism: everything is drawn from the ``torch.Generator`` passed in; each piece draws from
its own child generator seeded from it, so switching one piece on or off does not change the
draws of the others.

Entry points: :func:`augment_source` (one call, options as keywords) and :class:`SourceAugment`
(the options checked once, usable from hyperpyyaml: ``!new:speechbrain_diffsep.augment.SourceAugment``
or ``SourceAugment(**hparams["augmentation"])``); :func:`augment_and_remix` re-mixes fixed
sources (e.g. a fixed CSV's ``s1_wav ... s<K>_wav``) after augmenting each one.

Example
-------
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(8000)
>>> y = augment_source(x, 8000, g, speed_prob=1.0, speed_range=[1.25, 1.25])
>>> y.shape
torch.Size([6400])
>>> augment_source(x, 8000, g, speeed_prob=1.0)
Traceback (most recent call last):
...
ValueError: unknown augmentation option 'speeed_prob'; known options: bandlimit_order, bandlimit_prob, codec, codec_bits, codec_prob, enabled, eq_bands, eq_freq_hz, eq_gain_db, eq_prob, eq_q, eq_types, formant_alpha, formant_keep_duration, formant_prob, highpass_hz, level_db, level_prob, lowpass_hz, noise_color, noise_prob, noise_snr_db, reverb_bank_seed, reverb_bank_size, reverb_drr_db, reverb_max_order, reverb_method, reverb_prob, reverb_room_max, reverb_room_min, reverb_rt60, speed_prob, speed_range
"""

import math
from fractions import Fraction

import numpy as np
import torch
from scipy import signal as sps

#: Every option with its default: all pieces off (probability 0).
DEFAULTS = {
    "enabled": True,
    # speed perturbation
    "speed_prob": 0.0,
    "speed_range": (0.9, 1.1),
    # vocal-tract-length (pitch + formant) perturbation
    "formant_prob": 0.0,
    "formant_alpha": (0.9, 1.12),
    "formant_keep_duration": True,
    # random EQ
    "eq_prob": 0.0,
    "eq_bands": 3,
    "eq_gain_db": (-6.0, 6.0),
    "eq_freq_hz": (150.0, 3500.0),
    "eq_q": (0.7, 2.0),
    "eq_types": ("peaking", "lowshelf", "highshelf"),
    # level
    "level_prob": 0.0,
    "level_db": (-6.0, 6.0),
    # reverberation
    "reverb_prob": 0.0,
    "reverb_method": "ism",
    "reverb_rt60": (0.2, 0.6),
    "reverb_room_min": (3.0, 3.0, 2.5),
    "reverb_room_max": (8.0, 6.0, 3.5),
    "reverb_drr_db": (0.0, 10.0),
    "reverb_max_order": None,
    "reverb_bank_size": 0,
    "reverb_bank_seed": 0,
    # band-limiting
    "bandlimit_prob": 0.0,
    "lowpass_hz": (3000.0, 3700.0),
    "highpass_hz": (200.0, 400.0),
    "bandlimit_order": 6,
    # codec
    "codec_prob": 0.0,
    "codec": "mulaw",
    "codec_bits": 8,
    # noise
    "noise_prob": 0.0,
    "noise_snr_db": (20.0, 40.0),
    "noise_color": "white",
}

PIECES = ("speed", "formant", "eq", "level", "reverb", "bandlimit", "codec", "noise")
EQ_TYPES = ("peaking", "lowshelf", "highshelf")
REVERB_METHODS = ("ism", "synthetic")
NOISE_COLORS = ("white", "pink")
CODECS = ("mulaw",)
INSTALL_HINT = "pip install 'speechbrain-diffsep[augment]' (or set reverb_method: synthetic)"


# --------------------------------------------------------------------------- option checks
def _range(name, value, low=None, positive=False):
    """``(lo, hi)`` floats from a 2-list, with ``lo <= hi`` (and ``lo > 0`` / ``lo >= low``)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"augmentation option {name} must be a [low, high] pair of numbers, got {value!r}") from None
    if lo > hi:
        raise ValueError(f"augmentation option {name} must have low <= high, got {[lo, hi]}")
    if positive and lo <= 0:
        raise ValueError(f"augmentation option {name} must be positive, got {[lo, hi]}")
    if low is not None and lo < low:
        raise ValueError(f"augmentation option {name} must be >= {low}, got {[lo, hi]}")
    return lo, hi


def check_options(options):
    """The full option dict (defaults filled in), checked; ``ValueError`` with one line otherwise.

    Example
    -------
    >>> check_options({"noise_prob": 0.5})["noise_snr_db"]
    (20.0, 40.0)
    >>> check_options({"noise_prob": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: augmentation option noise_prob must lie in [0, 1], got 1.5
    """
    unknown = sorted(k for k in options if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown augmentation option {unknown[0]!r}; known options: {', '.join(sorted(DEFAULTS))}")
    opts = dict(DEFAULTS, **options)
    opts["enabled"] = bool(opts["enabled"])
    for piece in PIECES:
        p = opts[f"{piece}_prob"]
        if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"augmentation option {piece}_prob must lie in [0, 1], got {p!r}")
        opts[f"{piece}_prob"] = float(p)
    opts["speed_range"] = _range("speed_range", opts["speed_range"], positive=True)
    opts["formant_alpha"] = _range("formant_alpha", opts["formant_alpha"], positive=True)
    opts["formant_keep_duration"] = bool(opts["formant_keep_duration"])
    opts["eq_gain_db"] = _range("eq_gain_db", opts["eq_gain_db"])
    opts["eq_freq_hz"] = _range("eq_freq_hz", opts["eq_freq_hz"], positive=True)
    opts["eq_q"] = _range("eq_q", opts["eq_q"], positive=True)
    types = opts["eq_types"]
    types = (types,) if isinstance(types, str) else tuple(types)
    bad = [t for t in types if t not in EQ_TYPES]
    if not types or bad:
        raise ValueError(f"augmentation option eq_types must be a non-empty list among {list(EQ_TYPES)}, got {list(types)}")
    opts["eq_types"] = types
    if not isinstance(opts["eq_bands"], int) or opts["eq_bands"] < 1:
        raise ValueError(f"augmentation option eq_bands must be an integer >= 1, got {opts['eq_bands']!r}")
    opts["level_db"] = _range("level_db", opts["level_db"])
    if opts["reverb_method"] not in REVERB_METHODS:
        raise ValueError(
            f"augmentation option reverb_method must be one of {list(REVERB_METHODS)}, got {opts['reverb_method']!r}"
        )
    opts["reverb_rt60"] = _range("reverb_rt60", opts["reverb_rt60"], positive=True)
    opts["reverb_drr_db"] = _range("reverb_drr_db", opts["reverb_drr_db"])
    for key in ("reverb_room_min", "reverb_room_max"):
        try:
            dims = tuple(float(v) for v in opts[key])
        except (TypeError, ValueError):
            dims = ()
        if len(dims) != 3 or min(dims) < 1.5:
            raise ValueError(f"augmentation option {key} must be 3 room dimensions of at least 1.5 m, got {opts[key]!r}")
        opts[key] = dims
    if any(a > b for a, b in zip(opts["reverb_room_min"], opts["reverb_room_max"])):
        raise ValueError(
            f"augmentation option reverb_room_min {list(opts['reverb_room_min'])} exceeds reverb_room_max "
            f"{list(opts['reverb_room_max'])}"
        )
    mo = opts["reverb_max_order"]
    if mo is not None and (not isinstance(mo, int) or mo < 0):
        raise ValueError(f"augmentation option reverb_max_order must be null or an integer >= 0, got {mo!r}")
    for key in ("reverb_bank_size", "reverb_bank_seed"):
        if not isinstance(opts[key], int) or opts[key] < 0:
            raise ValueError(f"augmentation option {key} must be an integer >= 0, got {opts[key]!r}")
    if opts["enabled"] and opts["reverb_prob"] > 0 and opts["reverb_method"] == "ism":
        try:
            import pyroomacoustics  # noqa: F401
        except ImportError:
            raise ValueError(f"augmentation option reverb_method 'ism' needs pyroomacoustics; {INSTALL_HINT}") from None
    opts["lowpass_hz"] = _range("lowpass_hz", opts["lowpass_hz"], positive=True)
    if opts["highpass_hz"] is not None:
        opts["highpass_hz"] = _range("highpass_hz", opts["highpass_hz"], positive=True)
        if opts["highpass_hz"][1] >= opts["lowpass_hz"][0]:
            raise ValueError(
                f"augmentation option highpass_hz {list(opts['highpass_hz'])} must lie below lowpass_hz "
                f"{list(opts['lowpass_hz'])}"
            )
    if not isinstance(opts["bandlimit_order"], int) or not 1 <= opts["bandlimit_order"] <= 16:
        raise ValueError(f"augmentation option bandlimit_order must be an integer in [1, 16], got {opts['bandlimit_order']!r}")
    if opts["codec"] not in CODECS:
        raise ValueError(f"augmentation option codec must be one of {list(CODECS)}, got {opts['codec']!r}")
    if not isinstance(opts["codec_bits"], int) or not 2 <= opts["codec_bits"] <= 16:
        raise ValueError(f"augmentation option codec_bits must be an integer in [2, 16], got {opts['codec_bits']!r}")
    opts["noise_snr_db"] = _range("noise_snr_db", opts["noise_snr_db"])
    if opts["noise_color"] not in NOISE_COLORS:
        raise ValueError(f"augmentation option noise_color must be one of {list(NOISE_COLORS)}, got {opts['noise_color']!r}")
    return opts


# --------------------------------------------------------------------------- random helpers
def _uniform(generator, lo, hi):
    return float(lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64))


def _log_uniform(generator, lo, hi):
    return math.exp(_uniform(generator, math.log(lo), math.log(hi)))


def _child(generator):
    """A new generator seeded from one draw of ``generator``."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- pieces
def resample_by(wav, factor):
    """Resample a 1-D tensor by ``factor`` (quantized to 1 %): length / factor, frequencies x factor.

    ``scipy.signal.resample_poly(x, 100, round(100 factor))`` (polyphase, Kaiser-windowed FIR).
    SpeechBrain's :class:`~speechbrain.augment.time_domain.Resample` (what its ``SpeedPerturb``
    uses) does the same with the same 1 % grid, but measured 30-50x slower per call on CPU for
    ratios such as 107/100 (and 0.4 s to build each ratio's kernel), too slow for per-source
    augmentation in the data loader; its ``SpeedPerturb`` also draws from the global RNG, not from
    a generator.
    """
    frac = Fraction(int(round(100 * float(factor))), 100)
    if frac == 1:
        return wav.clone()
    y = sps.resample_poly(wav.double().numpy(), frac.denominator, frac.numerator)
    return torch.from_numpy(np.ascontiguousarray(y)).float()


def time_stretch(wav, rate, sample_rate):
    """Phase-vocoder time-stretch of a 1-D tensor to ``round(len / rate)`` samples, pitch kept."""
    import torchaudio.functional as AF

    n_fft = 2 ** int(round(math.log2(0.032 * sample_rate)))
    hop = n_fft // 4
    window = torch.hann_window(n_fft, dtype=torch.float32)
    n = wav.shape[-1]
    spec = torch.stft(wav.float(), n_fft, hop, window=window, return_complex=True, center=True)
    advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[..., None]
    stretched = AF.phase_vocoder(spec, float(rate), advance)
    length = int(round(n / float(rate)))
    return torch.istft(stretched, n_fft, hop, window=window, length=length)


def biquad_coefficients(kind, freq_hz, gain_db, q, sample_rate):
    """``(b, a)`` of an RBJ-cookbook biquad: ``"peaking"``, ``"lowshelf"`` or ``"highshelf"``.

    The peaking filter has exactly ``gain_db`` at ``freq_hz``; the shelves reach it far below /
    above ``freq_hz`` (half of it, in dB, at ``freq_hz``).

    Example
    -------
    >>> b, a = biquad_coefficients("peaking", 1000.0, 6.0, 1.0, 8000)
    >>> from scipy.signal import freqz
    >>> _, h = freqz(b, a, worN=[1000.0], fs=8000)
    >>> round(20 * float(np.log10(abs(h[0]))), 6)
    6.0
    """
    A = 10.0 ** (gain_db / 40.0)
    w0 = 2 * math.pi * freq_hz / sample_rate
    cw, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    if kind == "peaking":
        b = [1 + alpha * A, -2 * cw, 1 - alpha * A]
        a = [1 + alpha / A, -2 * cw, 1 - alpha / A]
    elif kind in ("lowshelf", "highshelf"):
        s = 1 if kind == "lowshelf" else -1
        sa = 2 * math.sqrt(A) * alpha
        b = [A * ((A + 1) - s * (A - 1) * cw + sa), s * 2 * A * ((A - 1) - s * (A + 1) * cw),
             A * ((A + 1) - s * (A - 1) * cw - sa)]
        a = [(A + 1) + s * (A - 1) * cw + sa, -s * 2 * ((A - 1) + s * (A + 1) * cw), (A + 1) + s * (A - 1) * cw - sa]
    else:
        raise ValueError(f"kind must be one of {list(EQ_TYPES)}, got {kind!r}")
    b, a = np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)
    return b / a[0], a / a[0]


def pink_noise(n, generator):
    """Gaussian noise of ``n`` samples with a 1/f power spectrum (white noise shaped in frequency)."""
    white = torch.randn(n, generator=generator, dtype=torch.float64)
    spec = torch.fft.rfft(white)
    f = torch.arange(spec.shape[0], dtype=torch.float64)
    f[0] = 1.0
    return torch.fft.irfft(spec / f.sqrt(), n=n)


def add_noise_at_snr(wav, snr_db, noise):
    """``wav + c * noise`` with ``c`` such that ``power(wav) / power(c * noise) = snr_db`` exactly."""
    p_sig = float(torch.mean(wav.double() ** 2))
    p_noise = float(torch.mean(noise.double() ** 2))
    if p_sig == 0.0 or p_noise == 0.0:
        return wav.clone()
    scale = math.sqrt(p_sig / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (wav.double() + scale * noise.double()).to(wav.dtype)


def synthetic_rir(rt60, drr_db, sample_rate, generator):
    """Direct path (1 at sample 0) plus Gaussian noise decaying 60 dB in ``rt60`` seconds.

    The tail starts 1 ms after the direct path (the first reflections) and lasts ``1.2 rt60``;
    its energy is ``drr_db`` below the direct path's.
    """
    n = int(math.ceil(1.2 * rt60 * sample_rate)) + 1
    start = max(1, int(round(0.001 * sample_rate)))
    t = torch.arange(n - start, dtype=torch.float64) / sample_rate
    tail = torch.randn(n - start, generator=generator, dtype=torch.float64) * torch.exp(-3 * math.log(10) * t / rt60)
    tail = tail * math.sqrt(10.0 ** (-drr_db / 10.0) / float(torch.sum(tail**2)))
    h = torch.zeros(n, dtype=torch.float64)
    h[0] = 1.0
    h[start:] = tail
    return h.numpy()


def ism_rir(room_dim, source, mic, rt60, sample_rate, max_order=None):
    """Impulse response of a shoebox room by pyroomacoustics' image-source method.

    Wall absorption and image order from Sabine's formula for ``rt60``
    (``pyroomacoustics.inverse_sabine``); a ``rt60`` too short for the room (absorption above 1)
    falls back to nearly anechoic walls. ``max_order`` caps the image order.
    """
    import pyroomacoustics as pra

    try:
        absorption, order = pra.inverse_sabine(rt60, room_dim)
    except ValueError:
        absorption, order = 0.99, 1
    if max_order is not None:
        order = min(order, int(max_order))
    room = pra.ShoeBox(list(room_dim), fs=int(sample_rate), materials=pra.Material(absorption), max_order=order)
    room.add_source(list(source))
    room.add_microphone(list(mic))
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


def reverberate(wav, rir):
    """Convolve with ``rir``, its strongest tap (the direct path) aligned to sample 0 and scaled to 1.

    The output has the input's length (the tail past the end is cut).
    """
    rir = np.asarray(rir, dtype=np.float64)
    peak = int(np.argmax(np.abs(rir)))
    rir = rir / abs(rir[peak])
    n = wav.shape[-1]
    y = sps.fftconvolve(wav.double().numpy(), rir)[peak : peak + n]
    return torch.from_numpy(np.ascontiguousarray(y)).to(wav.dtype)


def bandlimit(wav, sample_rate, lowpass_hz, highpass_hz=None, order=6):
    """Causal Butterworth low-pass at ``lowpass_hz`` (skipped at or above 0.49 x the sample rate),
    then high-pass at ``highpass_hz`` (unless None)."""
    x = wav.double().numpy()
    if lowpass_hz is not None and lowpass_hz < 0.49 * sample_rate:
        x = sps.sosfilt(sps.butter(order, lowpass_hz, btype="lowpass", fs=sample_rate, output="sos"), x)
    if highpass_hz is not None:
        x = sps.sosfilt(sps.butter(order, highpass_hz, btype="highpass", fs=sample_rate, output="sos"), x)
    return torch.from_numpy(np.ascontiguousarray(x)).to(wav.dtype)


def mu_law(wav, bits=8):
    """Mu-law companding with ``2 ** bits`` levels of the signal scaled to its peak (G.711-like)."""
    import torchaudio.functional as AF

    peak = float(wav.abs().max()) if wav.numel() else 0.0
    if peak == 0.0:
        return wav.clone()
    channels = 2**bits
    x = (wav.double() / peak).clamp(-1.0, 1.0)
    y = AF.mu_law_decoding(AF.mu_law_encoding(x, channels), channels)
    return (y * peak).to(wav.dtype)


# --------------------------------------------------------------------------- the augmenter
class SourceAugment:
    """Voice and channel augmentation of one source, options checked once (see the module docstring).

    Arguments
    ---------
    **options
        Any of :data:`DEFAULTS` (unknown names are a one-line ``ValueError``); ``enabled: False``
        turns the whole thing into the identity.

    Example
    -------
    >>> aug = SourceAugment(noise_prob=1.0, noise_snr_db=[30, 30])
    >>> x = torch.sin(torch.arange(8000) * 0.1)
    >>> y = aug(x, 8000, torch.Generator().manual_seed(0))
    >>> round(10 * math.log10(float((x**2).mean() / ((y - x) ** 2).mean())), 3)
    30.0
    """

    def __init__(self, **options):
        self.options = check_options(options)
        self._rir_cache = {}

    @property
    def active(self):
        """True when at least one piece may run."""
        return self.options["enabled"] and any(self.options[f"{p}_prob"] > 0 for p in PIECES)

    @property
    def max_length_factor(self):
        """Largest ratio input length / output length (speed up, formant shift without stretch):
        read ``segment * max_length_factor`` samples to have a full segment after augmentation."""
        o = self.options
        factor = 1.0
        if not self.active:
            return factor
        if o["speed_prob"] > 0:
            factor *= max(1.0, o["speed_range"][1])
        if o["formant_prob"] > 0 and not o["formant_keep_duration"]:
            factor *= max(1.0, o["formant_alpha"][1])
        return factor + 0.01  # the 1 % quantization of the factors

    def __call__(self, wav, sample_rate, generator):
        """Augment a 1-D tensor ``wav`` at ``sample_rate``; draws from ``generator`` only."""
        if not torch.is_tensor(wav) or wav.dim() != 1:
            shape = tuple(wav.shape) if torch.is_tensor(wav) else type(wav).__name__
            raise ValueError(f"wav must be a 1-D tensor (samples,), got {shape}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        sample_rate = int(sample_rate)
        if not self.active:
            return wav
        o = self.options
        # one child generator per piece, always drawn, so the pieces do not shift each other's draws
        gens = {p: _child(generator) for p in PIECES}
        x = wav.float()
        for piece in PIECES:
            g = gens[piece]
            if o[f"{piece}_prob"] <= 0 or float(torch.rand((), generator=g)) >= o[f"{piece}_prob"]:
                continue
            x = getattr(self, f"_{piece}")(x, sample_rate, g)
        return x

    # each piece: (wav 1-D float32, sample_rate, generator) -> wav
    def _speed(self, x, sr, g):
        return resample_by(x, _uniform(g, *self.options["speed_range"]))

    def _formant(self, x, sr, g):
        alpha = Fraction(int(round(100 * _uniform(g, *self.options["formant_alpha"]))), 100)
        y = resample_by(x, alpha)  # frequencies x alpha, duration / alpha
        if self.options["formant_keep_duration"] and alpha != 1:
            n = x.shape[-1]
            y = time_stretch(y, y.shape[-1] / n, sr)[:n]
            y = torch.nn.functional.pad(y, (0, n - y.shape[-1]))
        return y

    def _eq(self, x, sr, g):
        o = self.options
        sos = []
        for _ in range(o["eq_bands"]):
            kind = o["eq_types"][int(torch.randint(len(o["eq_types"]), (), generator=g))]
            lo, hi = o["eq_freq_hz"]
            freq = min(_log_uniform(g, lo, hi), 0.45 * sr)
            gain = _uniform(g, *o["eq_gain_db"])
            q = _uniform(g, *o["eq_q"]) if kind == "peaking" else 1 / math.sqrt(2)
            b, a = biquad_coefficients(kind, freq, gain, q, sr)
            sos.append(np.concatenate([b, a]))
        y = sps.sosfilt(np.stack(sos), x.double().numpy())
        return torch.from_numpy(np.ascontiguousarray(y)).float()

    def _level(self, x, sr, g):
        return x * 10.0 ** (_uniform(g, *self.options["level_db"]) / 20.0)

    def _draw_room(self, g, sr):
        o = self.options
        rt60 = _uniform(g, *o["reverb_rt60"])
        if o["reverb_method"] == "synthetic":
            drr = _uniform(g, *o["reverb_drr_db"])
            return synthetic_rir(rt60, drr, sr, g)
        dims = [_uniform(g, lo, hi) for lo, hi in zip(o["reverb_room_min"], o["reverb_room_max"])]
        src = [_uniform(g, 0.5, d - 0.5) for d in dims]
        mic = [_uniform(g, 0.5, d - 0.5) for d in dims]
        return ism_rir(dims, src, mic, rt60, sr, o["reverb_max_order"])

    def _reverb(self, x, sr, g):
        o = self.options
        if o["reverb_bank_size"] > 0:
            idx = int(torch.randint(o["reverb_bank_size"], (), generator=g))
            key = (idx, sr)
            if key not in self._rir_cache:
                seed = int(np.random.SeedSequence([o["reverb_bank_seed"], idx]).generate_state(1, np.uint64)[0] >> 2)
                self._rir_cache[key] = self._draw_room(torch.Generator().manual_seed(seed), sr)
            rir = self._rir_cache[key]
        else:
            rir = self._draw_room(g, sr)
        return reverberate(x, rir)

    def _bandlimit(self, x, sr, g):
        o = self.options
        lp = _uniform(g, *o["lowpass_hz"])
        hp = _uniform(g, *o["highpass_hz"]) if o["highpass_hz"] is not None else None
        return bandlimit(x, sr, lp, hp, o["bandlimit_order"])

    def _codec(self, x, sr, g):
        return mu_law(x, self.options["codec_bits"])

    def _noise(self, x, sr, g):
        snr = _uniform(g, *self.options["noise_snr_db"])
        n = x.shape[-1]
        noise = torch.randn(n, generator=g, dtype=torch.float64) if self.options["noise_color"] == "white" else pink_noise(n, g)
        return add_noise_at_snr(x, snr, noise)

    def __repr__(self):
        on = [p for p in PIECES if self.options[f"{p}_prob"] > 0] if self.options["enabled"] else []
        return f"SourceAugment({', '.join(on) if on else 'off'})"


def augment_source(wav, sample_rate, generator, **options):
    """Augment one source ``wav`` (1-D tensor) at ``sample_rate`` with ``options`` (see
    :data:`DEFAULTS`; all pieces off by default), drawing from the ``torch.Generator`` only.

    The length changes only with speed perturbation (``/ s``) and a formant shift without
    ``formant_keep_duration`` (``/ alpha``).
    """
    return SourceAugment(**options)(wav, sample_rate, generator)


def augment_and_remix(sources, sample_rate, generator, augment):
    """Augment each row of ``sources`` (K, n) and return ``(mix (n,), sources (K, n))``, the mixture
    being exactly the sum of the augmented sources (lengths kept: cut or zero-padded at the end).

    For fixed mixtures (a CSV's ``s1_wav ... s<K>_wav``): replace the CSV's ``mix_wav`` by this
    mixture. ``augment`` is a :class:`SourceAugment` or a dict of its options.
    """
    if not isinstance(augment, SourceAugment):
        augment = SourceAugment(**dict(augment or {}))
    if not torch.is_tensor(sources) or sources.dim() != 2:
        shape = tuple(sources.shape) if torch.is_tensor(sources) else type(sources).__name__
        raise ValueError(f"sources must be a tensor shaped (K, samples), got {shape}")
    n = sources.shape[-1]
    out = []
    for src in sources:
        y = augment(src, sample_rate, _child(generator))[:n]
        out.append(torch.nn.functional.pad(y, (0, n - y.shape[-1])))
    out = torch.stack(out).float()
    return out.sum(0), out


__all__ = [
    "DEFAULTS",
    "SourceAugment",
    "augment_source",
    "augment_and_remix",
    "check_options",
    "biquad_coefficients",
    "resample_by",
    "time_stretch",
    "synthetic_rir",
    "ism_rir",
    "reverberate",
    "bandlimit",
    "mu_law",
    "add_noise_at_snr",
    "pink_noise",
]
