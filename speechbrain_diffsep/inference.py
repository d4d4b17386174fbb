"""Ready-to-use DiffSep separation and enhancement with SpeechBrain's ``Pretrained`` interface.

A *model folder* holds ``hyperparams.yaml`` (top-level keys ``score_model``, ``sde``,
``sample_rate``, ``num_spks``, ``modules``, ``pretrainer`` and the sampling defaults ``sampler``,
``num_steps``, ``sampler_options``, ``sampler_presets``, ``seed``, ``chunk_seconds``,
``overlap_seconds``) and ``score_model.ckpt`` (the score network's weights).
``python -m speechbrain_diffsep.export`` makes one from a recipe's checkpoint or from the authors'
released checkpoint; ``from_hparams`` loads it from a local folder without any network access.

:class:`DiffSepSeparation` is a drop-in replacement for SpeechBrain's ``SepformerSeparation``:
``separate_batch(mix [batch, time]) -> [batch, time, K]`` and ``separate_file(path) -> [1, time, K]``
(resampled to the model's rate and peak-normalized per source, as ``SepformerSeparation``).
:class:`DiffSepEnhancement` follows SpeechBrain's enhancement interfaces: ``enhance_batch(noisy,
lengths=None) -> [batch, time]`` and ``enhance_file(filename, output_filename=None) -> [time]``.

Documented behaviour on unusual input (``read_audio``):

- another sample rate: resampled to the model's rate (``torchaudio.functional.resample``); the
  outputs are at the model's rate;
- several channels: averaged to mono, with a ``UserWarning`` (``SepformerSeparation`` also averages
  the channels when it resamples);
- all-zero signal: the estimates are all zeros, with a ``UserWarning`` (no NaN from normalizing);
- empty file, NaN/inf samples, a file that is not audio, a truncated WAV: ``ValueError`` naming the
  file and the problem.
"""

import inspect
import os
import struct
import warnings
from pathlib import Path

import soundfile
import torch
import torchaudio.functional as AF

from speechbrain.dataio import audio_io
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.data_utils import split_path
from speechbrain.utils.fetching import LocalStrategy, fetch
from speechbrain.utils.logger import get_logger

from .chunking import separate_in_chunks
from .pipeline import separate_mixture
from .flow import SeparationFlow
from .sampling import get_sampler

logger = get_logger(__name__)

HPARAMS_FILE = "hyperparams.yaml"
CHECKPOINT_FILE = "score_model.ckpt"
DEFAULTS = {
    "sampler": "pc",
    "num_steps": 30,
    "sampler_options": {},
    "sampler_presets": {},
    "seed": None,
    "chunk_seconds": None,
    "overlap_seconds": 1.0,
    "crossfade": "hann",
    "t_start": None,
    "consistency": False,
    "init_separator": None,
}
"""Sampling defaults used when ``hyperparams.yaml`` does not set them."""


def _one_line(err):
    """First non-empty line of an exception's message (for one-line errors)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


# --------------------------------------------------------------------------- audio input
def _wav_missing_bytes(path):
    """Bytes missing from a RIFF/WAVE file's ``data`` chunk (0 if complete or not a plain WAV).

    libsndfile silently reads a WAV whose data stops before the size its header declares; we
    walk the RIFF chunks to notice it.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):  # streamed WAV: length unknown
                    return 0
                return max(0, pos + 8 + chunk_size - size)
            pos += 8 + chunk_size + (chunk_size & 1)
    return 0


def check_waveform(wav, name):
    """Raise ``ValueError`` naming ``name`` if ``wav`` is empty or has NaN/inf samples."""
    if wav.numel() == 0 or wav.shape[-1] == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    if not torch.isfinite(wav).all():
        bad = int((~torch.isfinite(wav)).sum())
        raise ValueError(f"{name}: the audio has {bad} NaN or inf samples; clean the file first")


def read_audio(path, sample_rate=None):
    """Read an audio file as a mono float32 tensor shaped (1, samples).

    Several channels are averaged (with a ``UserWarning``); a file at another rate is resampled to
    ``sample_rate`` (when given). Raises ``ValueError`` with a one-line message naming the file for
    a missing, unreadable (not audio), truncated or empty file and for NaN/inf samples.

    Returns
    -------
    (wav, file_rate) : (torch.Tensor, int)

    Example
    -------
    >>> import tempfile, soundfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/x.wav"
    >>> soundfile.write(path, np.zeros((1600, 2)), 16000)
    >>> with warnings.catch_warnings(record=True):
    ...     wav, rate = read_audio(path, 8000)
    >>> wav.shape, rate
    (torch.Size([1, 800]), 16000)
    """
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an audio file")
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports unreadable files in several ways
        raise ValueError(f"{path}: not a readable audio file ({_one_line(err)})") from None
    missing = _wav_missing_bytes(path)
    if missing:
        raise ValueError(f"{path}: truncated WAV file ({missing} bytes of audio data missing); re-create the file")
    wav = torch.from_numpy(data).T.contiguous()  # (channels, samples)
    check_waveform(wav, path)
    if wav.shape[0] > 1:
        warnings.warn(f"{path}: {wav.shape[0]} channels averaged to mono", UserWarning, stacklevel=2)
        wav = wav.mean(dim=0, keepdim=True)
    if sample_rate is not None and int(rate) != int(sample_rate):
        logger.info(f"Resampling {path} from {rate} Hz to {sample_rate} Hz")
        wav = AF.resample(wav, int(rate), int(sample_rate))
    return wav, int(rate)


def _local_audio_path(path, savedir=None):
    """A local path for ``path``: itself if it exists, else fetched (URL / Hugging Face) as SpeechBrain."""
    if os.path.exists(str(path)):
        return str(path)
    source, name = split_path(str(path))
    try:
        return str(fetch(name, source=source, savedir=savedir, local_strategy=LocalStrategy.SYMLINK))
    except Exception as err:
        raise ValueError(f"{path}: no such file (and fetching it failed: {_one_line(err)})") from None


# --------------------------------------------------------------------------- checkpoint loading
def _state_dict_mismatch(expected, found):
    """One-line description of how two state dicts differ in keys or shapes ('' if they match)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in found and torch.is_tensor(found[k]) and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]}, checkpoint vs model)")
    return "; ".join(parts)


def read_state_dict(path, mmap=False):
    """``torch.load`` a state dict (weights only) with a one-line ``ValueError`` if unreadable."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({_one_line(err)}); re-export the model folder"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: does not hold a state dict of tensors; re-export the model folder")
    return state


def load_checkpoint_strict(module, path):
    """Pretrainer hook: load ``path`` into ``module`` requiring identical keys and shapes.

    SpeechBrain's default transfer hook loads non-strictly (missing weights only log a warning),
    which would silently leave parts of the network random; this hook raises a one-line
    ``ValueError`` instead.
    """
    state = read_state_dict(path)
    problem = _state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise ValueError(
            f"{path} does not match the score_model of {HPARAMS_FILE}: {problem}; "
            "was it exported with another nf or num_spks?"
        )
    module.load_state_dict(state, strict=True)


def check_model_folder(folder, hparams_file=HPARAMS_FILE):
    """Raise a one-line ``ValueError`` unless ``folder`` holds a hyperparams file and a checkpoint."""
    path = Path(folder)
    if not path.exists():
        raise ValueError(
            f"model folder {folder} does not exist; make one with python -m speechbrain_diffsep.export"
        )
    if not path.is_dir():
        raise ValueError(f"model folder {folder} is not a directory")
    missing = [name for name in (hparams_file, CHECKPOINT_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"model folder {folder} lacks {' and '.join(missing)}; make one with python -m speechbrain_diffsep.export"
        )


def _looks_local(source):
    """Whether ``source`` names a local folder (anything but a URL or a Hugging Face ``owner/name``
    id that does not exist locally)."""
    s = str(source)
    if s.startswith(("http://", "https://")):
        return False
    return Path(s).expanduser().exists() or s.startswith((".", "/", "~")) or s.count("/") != 1


class ConvTasNetSeparation(Pretrained):
    """A Conv-TasNet trained by this project's recipes (SpeechBrain's ``conv_tasnet`` lobes).

    Same usage as ``SepformerSeparation`` (``separate_batch(mix [B, T]) -> [B, T, K]``,
    ``separate_file``); the refiner mode of :class:`DiffSepSeparation` can start from it. Model
    folders are written by ``python -m speechbrain_diffsep.export --from-recipe <convtasnet run>``.
    """

    MODULES_NEEDED = ["encoder", "masknet", "decoder"]
    HPARAMS_NEEDED = ["num_spks", "sample_rate"]

    def separate_batch(self, mix):
        """[batch, time] mixtures -> [batch, time, K] estimates."""
        from .brain import conv_tasnet_forward

        if not torch.is_tensor(mix) or mix.dim() != 2:
            raise ValueError(f"mix must be a tensor shaped [batch, time], got {getattr(mix, 'shape', type(mix).__name__)}")
        check_waveform(mix, "mix")
        with torch.no_grad():
            est = conv_tasnet_forward(self.mods.encoder, self.mods.masknet, self.mods.decoder, mix.to(self.device).float())
        return est.transpose(1, 2)

    def separate_file(self, path, savedir=None):
        """Separate an audio file (mono, resampled to the model's rate); peak-normalized [1, T, K]."""
        wav, _ = read_audio(_local_audio_path(path, savedir), self.hparams.sample_rate)
        est = self.separate_batch(wav)
        peak = est.abs().amax(dim=1, keepdim=True)
        return torch.where(peak > 0, est / torch.where(peak > 0, peak, torch.ones_like(peak)), est)

    def forward(self, mix):
        return self.separate_batch(mix)


def _load_separator(folder, device="cpu"):
    """Load a SpeechBrain separation folder: a :class:`ConvTasNetSeparation` folder of this project
    (its yaml names ``interface: ConvTasNetSeparation``) or any ``SepformerSeparation`` folder."""
    from speechbrain.inference.separation import SepformerSeparation

    folder = Path(folder)
    if not (folder / HPARAMS_FILE).is_file():
        raise ValueError(f"initial separator {folder}: no {HPARAMS_FILE} (expected a SepformerSeparation model folder)")
    text = (folder / HPARAMS_FILE).read_text(encoding="utf-8", errors="replace")
    cls = ConvTasNetSeparation if "interface: ConvTasNetSeparation" in text else SepformerSeparation
    try:
        return cls.from_hparams(source=str(folder), savedir=str(folder), run_opts={"device": device})
    except Exception as err:
        raise ValueError(f"initial separator {folder}: could not load it ({type(err).__name__}: {_one_line(err)})") from None


# --------------------------------------------------------------------------- interfaces
class _DiffSepInterface(Pretrained):
    """Shared loading, checking and sampling of the DiffSep interfaces."""

    MODULES_NEEDED = ["score_model"]
    HPARAMS_NEEDED = ["sde", "sample_rate", "num_spks"]
    REQUIRED_NUM_SOURCES = None

    def __init__(self, *args, num_spks=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_num_sources(num_spks)
        self.last_nfe = 0
        self.init_separator = None

    # ------------------------------------------------------------------ refiner mode
    def set_initial_separator(self, separator, t_start=None):
        """Refiner mode: start the reverse process at ``t_start`` around ``separator``'s output.

        ``separator`` is any object with SpeechBrain's ``separate_batch(mix [B, T]) -> [B, T, K]``
        (a ``SepformerSeparation``, e.g. SpeechBrain's Conv-TasNet or SepFormer models), a
        callable with that signature, or ``"self"`` for a fast first pass of this model (ODE, 2
        steps; Euler, 2 steps, for a flow-matching model). ``None`` switches refining off. ``t_start`` (default: the yaml's, else 0.5) sets
        how much of the estimate is kept: smaller keeps more.
        """
        if separator is not None and separator != "self" and not (
            callable(separator) or hasattr(separator, "separate_batch")
        ):
            raise ValueError("separator must have separate_batch(mix) -> [batch, time, K], be callable, or be 'self'")
        self.init_separator = separator
        if t_start is not None:
            self.hparams.t_start = float(t_start)

    def _initial_estimate(self, piece, generator=None):
        """(batch, 1, time) -> (batch, K, time) from the initial separator, or None. ``generator``:
        the draws of the 'self' fast pass (the same seed gives the same result)."""
        sep = self.init_separator
        if sep is None:
            return None
        if sep == "self":
            flow = isinstance(self.hparams.sde, SeparationFlow)  # a flow-matching model: its own sampler
            est, nfe = separate_mixture(self.mods.score_model, self.hparams.sde, piece,
                                        sampler="euler" if flow else "ode", num_steps=2, generator=generator)
            self.last_nfe += nfe
            return est
        fn = sep.separate_batch if hasattr(sep, "separate_batch") else sep
        est = fn(piece[:, 0, :]).to(piece.dtype)
        if est.dim() != 3 or est.shape[0] != piece.shape[0] or est.shape[2] != self.hparams.num_spks:
            raise ValueError(
                f"the initial separator returned shape {tuple(est.shape)}, expected [batch, time, K={self.hparams.num_spks}]"
            )
        n = piece.shape[-1]
        est = est[:, :n] if est.shape[1] >= n else torch.nn.functional.pad(est, (0, 0, 0, n - est.shape[1]))
        return est.transpose(1, 2)

    @classmethod
    def from_hparams(cls, source, hparams_file=HPARAMS_FILE, **kwargs):
        """Load a model folder (local path; a Hugging Face id or URL goes through SpeechBrain's fetch).

        Any failure becomes a one-line ``ValueError`` naming ``source``. Extra keyword arguments go
        to ``Pretrained.from_hparams`` (``savedir``, ``run_opts={"device": ...}``, ``overrides``,
        ...) and ``num_spks=K`` to check that the model separates K sources.
        """
        local = _looks_local(source)
        if local:
            check_model_folder(Path(str(source)).expanduser(), hparams_file)
            source = str(Path(str(source)).expanduser())
        try:
            obj = super().from_hparams(source=source, hparams_file=hparams_file, **kwargs)
        except ValueError as err:
            raise ValueError(f"model folder {source}: {_one_line(err)}") from None
        except Exception as err:
            where = "could not load the model" if local else "not a local folder, and fetching it failed"
            raise ValueError(f"model folder {source}: {where} ({type(err).__name__}: {_one_line(err)})") from None
        obj._verify_weights(source, local)
        init = obj._hparam("init_separator")
        if init is not None:
            obj.set_initial_separator(init if init == "self" else _load_separator(Path(source) / init, obj.device))
        return obj

    def _verify_weights(self, source, local):
        """Guard against a hyperparams.yaml whose pretrainer loaded the checkpoint non-strictly."""
        hooks = getattr(getattr(self.hparams, "pretrainer", None), "custom_hooks", {})
        if not local or hooks.get("score_model") is load_checkpoint_strict:
            return
        found = read_state_dict(Path(source) / CHECKPOINT_FILE, mmap=True)
        problem = _state_dict_mismatch(self.mods.score_model.state_dict(), found)
        if problem:
            raise ValueError(f"model folder {source}: {CHECKPOINT_FILE} does not match the score_model: {problem}")

    def _check_num_sources(self, asked):
        sde_k = int(self.hparams.sde.num_sources)
        hp_k = int(self.hparams.num_spks)
        net_k = getattr(self.mods.score_model, "num_sources", sde_k)
        if not sde_k == hp_k == int(net_k):
            raise ValueError(
                f"inconsistent model: num_spks={hp_k}, sde.num_sources={sde_k}, score_model.num_sources={net_k}; "
                "fix hyperparams.yaml"
            )
        if asked is not None and int(asked) != hp_k:
            raise ValueError(f"the model separates K={hp_k} sources but num_spks={asked} was asked")
        if self.REQUIRED_NUM_SOURCES is not None and hp_k != self.REQUIRED_NUM_SOURCES:
            raise ValueError(
                f"{type(self).__name__} needs a model with K={self.REQUIRED_NUM_SOURCES} targets, this one has K={hp_k}"
            )

    # ------------------------------------------------------------------ options
    def _hparam(self, name):
        return getattr(self.hparams, name, DEFAULTS[name])

    def _sampling_plan(self, sampler, num_steps, seed, sampler_options):
        """Merge the options and check them against the sampler's signature.

        From weakest to strongest: the yaml's ``sampler_presets[name]`` (what this model wants for a
        sampler chosen by name, e.g. ``pc: {restart_t: 0.2, snr: 0.25}``), the yaml's
        ``sampler_options`` (for its default ``sampler`` only), the per-call options."""
        yaml_sampler = self._hparam("sampler")
        name = yaml_sampler if sampler is None else sampler
        fn = get_sampler(name)
        presets = self._hparam("sampler_presets") or {}
        if not hasattr(presets, "get"):
            raise ValueError(f"sampler_presets in hyperparams.yaml must map sampler names to options, got {presets!r}")
        opts = dict(presets.get(name) or {}) if isinstance(name, str) else {}
        if name == yaml_sampler:
            opts.update(self._hparam("sampler_options") or {})
        opts.update(sampler_options)
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            allowed = set(params) - {"score_fn", "sde", "y", "generator", "num_steps"}
            unknown = sorted(set(opts) - allowed)
            if unknown:
                raise ValueError(
                    f"sampler {name!r} has no option {unknown[0]!r}; its options are {sorted(allowed)}"
                )
        steps = self._hparam("num_steps") if num_steps is None else num_steps
        if steps is not None and (int(steps) != steps or steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {steps!r}")
        seed = self._hparam("seed") if seed is None else seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return name, steps, generator, opts

    def _model_dtype(self):
        p = next(self.mods.score_model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def _separate(self, mix, sampler=None, num_steps=None, seed=None, chunk_seconds=None,
                  overlap_seconds=None, sampler_options=None, consistency=None):
        """(batch, 1, time) -> (batch, K, time) on the model's device and dtype."""
        name, steps, generator, opts = self._sampling_plan(sampler, num_steps, seed, sampler_options or {})
        chunk = self._hparam("chunk_seconds") if chunk_seconds is None else chunk_seconds
        if overlap_seconds is None:  # the yaml's default shrinks to fit short chunks; an explicit value is checked
            overlap = min(self._hparam("overlap_seconds"), chunk / 2) if chunk else None
        else:
            overlap = overlap_seconds
        model, sde = self.mods.score_model, self.hparams.sde
        mix_consistency = self._hparam("consistency") if consistency is None else consistency
        self.last_nfe = 0

        def separate_fn(piece):
            init = self._initial_estimate(piece, generator)
            if init is not None:
                opts["init"] = init
                opts["t_start"] = self._hparam("t_start") or 0.5
            try:
                est, nfe = separate_mixture(model, sde, piece, sampler=name, num_steps=steps, generator=generator,
                                            consistency=bool(mix_consistency), **opts)
            except TypeError as err:
                if "unexpected keyword argument" not in str(err):
                    raise
                raise ValueError(f"sampler {name!r}: {_one_line(err)}") from None
            self.last_nfe += nfe
            return est

        with torch.no_grad():
            if chunk:
                return separate_in_chunks(
                    separate_fn, mix, self.hparams.sample_rate, chunk, overlap, crossfade=self._hparam("crossfade"),
                )
            return separate_fn(mix)

    def _prepare_batch(self, wavs, name="mix"):
        if not torch.is_tensor(wavs) or wavs.dim() != 2:
            shape = tuple(wavs.shape) if torch.is_tensor(wavs) else type(wavs).__name__
            raise ValueError(f"{name} must be a tensor shaped [batch, time], got {shape}; use {name}.unsqueeze(0) for one signal")
        if wavs.shape[1] < 2:
            raise ValueError(f"{name} must have at least 2 samples, got {wavs.shape[1]}")
        check_waveform(wavs, name)
        return wavs.to(device=self.device, dtype=self._model_dtype())[:, None, :]


class DiffSepSeparation(_DiffSepInterface):
    """Separate mixtures with a DiffSep model; same usage as SpeechBrain's ``SepformerSeparation``.

    Sampling options come from the model's ``hyperparams.yaml`` (``sampler``, ``num_steps``,
    ``sampler_options``, ``seed``, ``chunk_seconds``, ``overlap_seconds``) and can be overridden per
    call with the keyword arguments of the same names (extra keywords go to the sampler).

    Example
    -------
    >>> import os, speechbrain_diffsep
    >>> repo = os.path.dirname(os.path.dirname(speechbrain_diffsep.__file__))  # a source checkout
    >>> folder = os.path.join(repo, "pretrained", "diffsep-minimix")  # the bundled MiniMix model
    >>> model = DiffSepSeparation.from_hparams(source=folder, savedir=folder)
    >>> est = model.separate_file(path=os.path.join(repo, "examples", "minimix_ex1_mix.wav"), seed=0)
    >>> est.shape  # [1, time, K]
    torch.Size([1, 25600, 2])
    """

    def separate_batch(self, mix, *, sampler=None, num_steps=None, seed=None, chunk_seconds=None,
                       overlap_seconds=None, consistency=None, **sampler_options):
        """Separate a batch of mixtures.

        Arguments
        ---------
        mix : torch.Tensor
            [batch, time] mixtures at the model's sample rate.
        sampler, num_steps, seed, chunk_seconds, overlap_seconds :
            Per-call overrides of the yaml's sampling options (``seed`` makes the result
            deterministic; ``chunk_seconds`` processes long input in chunks).
        consistency : bool, optional
            Project the estimates so that they sum to the mixture (default: the yaml's, False).
        **sampler_options :
            Extra options of the sampler (e.g. ``snr=0.5``, ``dt="reference"`` for "pc").

        Returns
        -------
        torch.Tensor
            [batch, time, K] estimates in the model's dtype (float32), each scaled by its
            least-squares gain onto the mixture.
        """
        est = self._separate(self._prepare_batch(mix), sampler, num_steps, seed, chunk_seconds,
                             overlap_seconds, sampler_options, consistency)
        return est.transpose(1, 2)

    def separate_file(self, path, savedir=None, **kwargs):
        """Separate the sources of an audio file.

        The file is averaged to mono if needed and resampled to the model's rate; every estimate
        is peak-normalized to 1 (as ``SepformerSeparation.separate_file``; a silent file gives
        zeros). ``kwargs`` are those of :meth:`separate_batch`.

        Returns
        -------
        torch.Tensor
            [1, time, K] at the model's sample rate.
        """
        local = _local_audio_path(path, savedir)
        wav, _ = read_audio(local, self.hparams.sample_rate)
        if not wav.abs().max() > 0:
            warnings.warn(f"{path}: the signal is silent (all zeros); the estimates are zeros", UserWarning, stacklevel=2)
        est = self.separate_batch(wav, **kwargs)
        peak = est.abs().amax(dim=1, keepdim=True)
        return torch.where(peak > 0, est / torch.where(peak > 0, peak, torch.ones_like(peak)), est)

    def forward(self, mix, **kwargs):
        """Runs separation on the input mix (``separate_batch``)."""
        return self.separate_batch(mix, **kwargs)


class DiffSepEnhancement(_DiffSepInterface):
    """Speech enhancement with a DiffSep model trained on K=2 targets [clean, noise].

    Follows SpeechBrain's ``WaveformEnhancement``: ``enhance_batch(noisy, lengths=None)`` and
    ``enhance_file(filename, output_filename=None)``; returns the clean-speech estimate
    (target ``clean_index`` of the yaml, 0 by default), scaled by its least-squares gain onto the
    noisy input.
    """

    REQUIRED_NUM_SOURCES = 2

    def enhance_batch(self, noisy, lengths=None, **kwargs):
        """Enhance a batch of noisy waveforms.

        Arguments
        ---------
        noisy : torch.Tensor
            [batch, time] at the model's sample rate.
        lengths : torch.Tensor, optional
            Relative lengths in (0, 1] (SpeechBrain's convention); each example is enhanced on its
            own valid part and the padding is returned as zeros.
        **kwargs :
            The sampling options of :meth:`DiffSepSeparation.separate_batch`.

        Returns
        -------
        torch.Tensor
            [batch, time] enhanced waveforms.
        """
        batch = self._prepare_batch(noisy, "noisy")
        index = int(getattr(self.hparams, "clean_index", 0))
        opts = self._split_kwargs(kwargs)
        if lengths is None:
            return self._separate(batch, **opts)[:, index]
        lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten()
        if lengths.numel() != batch.shape[0] or not ((lengths > 0) & (lengths <= 1)).all():
            raise ValueError(f"lengths must hold {batch.shape[0]} relative lengths in (0, 1], got {lengths.tolist()}")
        out = torch.zeros(batch.shape[0], batch.shape[-1], dtype=batch.dtype, device=batch.device)
        for b, rel in enumerate(lengths.tolist()):
            n = max(2, int(round(rel * batch.shape[-1])))
            out[b, :n] = self._separate(batch[b : b + 1, :, :n], **opts)[0, index]
        return out

    @staticmethod
    def _split_kwargs(kwargs):
        named = ("sampler", "num_steps", "seed", "chunk_seconds", "overlap_seconds")
        opts = {k: kwargs.pop(k) for k in named if k in kwargs}
        opts["sampler_options"] = kwargs
        return opts

    def enhance_file(self, filename, output_filename=None, savedir=None, **kwargs):
        """Enhance an audio file (mono average, resampled to the model's rate).

        Writes the result to ``output_filename`` when given and returns it as a [time] tensor.
        """
        local = _local_audio_path(filename, savedir)
        wav, _ = read_audio(local, self.hparams.sample_rate)
        if not wav.abs().max() > 0:
            warnings.warn(f"{filename}: the signal is silent (all zeros); the estimate is zeros", UserWarning, stacklevel=2)
        enhanced = self.enhance_batch(wav, **kwargs)
        if output_filename is not None:
            audio_io.save(path=str(output_filename), src=enhanced.cpu(), sample_rate=self.hparams.sample_rate)
        return enhanced.squeeze(0)

    def forward(self, noisy, lengths=None, **kwargs):
        """Runs enhancement on the noisy input (``enhance_batch``)."""
        return self.enhance_batch(noisy, lengths, **kwargs)
