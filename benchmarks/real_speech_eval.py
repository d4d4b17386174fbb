"""Real recorded human speech, reserved for evaluation: build 2-speaker mixtures and score separators.

The only sources of this held-out set are recordings of people that ship inside packages (listed in
:data:`RESERVED`): the Asterisk telephony voice prompts of Debian (one professional voice per
package, five languages), alsa-utils' channel-test voice, two test sentences of codec2-examples,
pocketsphinx-testdata's test utterances and the two speakers of pyannote.audio's sample conversation
(single-speaker turns of its RTTM). None of it may be used for training, validation or tuning:
:func:`is_reserved_path` tells a training pipeline which files to keep out, the builder refuses any
file that is not on the list, and the set is written as a test split only (no ``tr``/``cv``).

**Build** (the files are never committed, their licences vary; the same command rebuilds them
bit for bit from the same package versions, which ``sources.csv`` records)::

    apt-get install -y --no-install-recommends $(python benchmarks/real_speech_eval.py --print-apt)
    python benchmarks/real_speech_eval.py --build data/real_speech [--n-mix 24 --seed 0 --max-seconds 4]

``--install`` runs that apt-get line and ``pip download --no-deps pyannote.audio==4.0.7`` (only the
wheel is read, from ``<build>/.wheels``; nothing is installed from it). Mixing is wsj0-2mix's, with
MiniMix's helpers: each source is one utterance (or a chain of utterances of the same voice, up to
``--max-seconds``) resampled to 8 kHz with ``scipy.signal.resample_poly`` and trimmed of leading and
trailing silence; both sources at the same active level, then +g/2 and -g/2 dB with g uniform in
[0, 5] dB, truncated to the shorter ("min") and to ``--max-seconds``, scaled together to a 0.9 peak,
16-bit PCM with ``mix == s1 + s2`` exactly::

    <build>/wav8k/min/tt/{mix,s1,s2}/<id>.wav
    <build>/metadata.csv    id, spk1, spk2, voice1, voice2, package1, package2, lang1, lang2, gain_db,
                            seconds, utts1, utts2
    <build>/sources.csv     voice, speaker, package, version, language, files, seconds, sha256

The two sources of a mixture always come from different speakers *and* different packages (so a
package whose files hold several people, such as codec2-examples, never gives both sources), and the
voices are drawn in turn so that every voice appears about equally often.

**Evaluate** model folders on the built set and on any other wsj0-2mix-layout test folder::

    python benchmarks/real_speech_eval.py --data data/real_speech --data minimix=data/minimix \\
        --model pretrained/diffsep-small-minimix --model pretrained/diffsep-minimix \\
        --conv-tasnet pretrained/diffsep-minimix/convtasnet --out benchmarks/results/real_speech

``--model`` folders load with ``DiffSepSeparation.from_hparams`` and separate with their default
sampler (seed = the mixture's index); ``--conv-tasnet`` folders load as the refiner's initial
separator does. Scores per mixture: SI-SDRi with the best (SI-SIR) permutation, narrow-band PESQ and
ESTOI (``speechbrain_diffsep.metrics.evaluate_separation``), averaged over sources and mixtures; the
unprocessed mixture is always the first row. Writes ``real_speech_eval.md`` (the tables) and
``real_speech_eval.json`` (every mixture's scores) into ``--out``; ``--merge DIR... --out DIR``
combines the reports of several runs into one.
"""

import argparse
import csv
import fnmatch
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes", "MiniMix"))
from generate_minimix import active_rms, mix_pair, resample, trim_silence  # noqa: E402

SAMPLE_RATE = 8000
PYANNOTE_WHEEL = "pyannote.audio==4.0.7"
PYANNOTE_SAMPLE = "pyannote/audio/sample/sample"
SKIP_DIRS = ("silence",)  # Asterisk's silence/*.wav files are not speech


@dataclass(frozen=True)
class Voice:
    """One person's voice inside one package: the unit the mixtures draw from.

    ``patterns`` are globs relative to the file-system root (Debian packages) or, for ``kind ==
    "wheel"``, the member of the wheel whose single-speaker RTTM turns of ``speaker_label`` are used.
    ``kind``: ``audio`` (anything libsndfile reads), ``gsm`` (headerless GSM 6.10 at 8 kHz, Asterisk's
    ``.gsm``), ``raw8k`` / ``raw16k`` (headerless 16-bit little-endian mono), ``wheel``.
    """

    key: str
    speaker: str
    package: str
    language: str
    kind: str
    patterns: tuple
    credit: str
    exclude: tuple = ()
    speaker_label: str = ""
    min_seconds: float = 1.5


#: The reserved evaluation sources: nothing else may enter the set, none of it may enter training.
RESERVED = (
    Voice("allison-en", "allison-smith", "asterisk-core-sounds-en-wav", "en-US", "audio",
          ("usr/share/asterisk/sounds/en_US_f_Allison/**/*.wav",), "Allison Smith (package CREDITS)"),
    Voice("allison-es", "allison-smith", "asterisk-core-sounds-es-wav", "es-MX", "audio",
          ("usr/share/asterisk/sounds/es_MX_f_Allison/**/*.wav",), "Allison Smith (package CREDITS)"),
    Voice("june-fr", "june-wallack", "asterisk-core-sounds-fr-wav", "fr-CA", "audio",
          ("usr/share/asterisk/sounds/fr_CA_f_June/**/*.wav",), "June Wallack (package CREDITS)"),
    Voice("carlo-it", "carlo-flora", "asterisk-core-sounds-it-wav", "it-IT", "audio",
          ("usr/share/asterisk/sounds/it_IT_m_Carlo/**/*.wav",), "Carlo Flora (package CREDITS)"),
    Voice("ivrvoice-ru", "ivrvoice-ru", "asterisk-core-sounds-ru-wav", "ru-RU", "audio",
          ("usr/share/asterisk/sounds/ru_RU_f_IvrvoiceRU/**/*.wav",), "ivrvoice.ru female voice (package CREDITS)"),
    Voice("july-es", "july-jimenez", "asterisk-prompt-es-co", "es-CO", "gsm",
          ("usr/share/asterisk/sounds/es/*.gsm", "usr/share/asterisk/sounds/digits/es/*.gsm"),
          "July E. Jimenez (package LEEME)"),
    Voice("armelle-fr", "armelle-desjardins", "asterisk-prompt-fr-armelle", "fr-FR", "gsm",
          ("usr/share/asterisk/sounds/fr/*.gsm", "usr/share/asterisk/sounds/digits/fr/*.gsm",
           "usr/share/asterisk/sounds/letters/fr/*.gsm", "usr/share/asterisk/sounds/phonetic/fr/*.gsm",
           "usr/share/asterisk/sounds/dictate/fr/*.gsm"), "Armelle Desjardins (package copyright)"),
    Voice("paola-it", "paola-dal-zot", "asterisk-prompt-it-menardi-wav", "it-IT", "audio",
          ("usr/share/asterisk/sounds/it_IT_f_Menardi/**/*.wav",), "Paola Dal Zot (package copyright)"),
    Voice("alsa", "alsa-test-voice", "alsa-utils", "en", "audio",
          ("usr/share/sounds/alsa/*.wav",), "speaker-test's channel names", exclude=("*/Noise.wav",),
          min_seconds=1.0),
    Voice("codec2-hts1", "codec2-hts1", "codec2-examples", "en", "raw8k",
          ("usr/share/codec2/raw/hts1.raw",), "codec2 test sentence hts1 (male)"),
    Voice("codec2-hts2", "codec2-hts2", "codec2-examples", "en", "raw8k",
          ("usr/share/codec2/raw/hts2.raw",), "codec2 test sentence hts2 (female)"),
    Voice("pocketsphinx", "pocketsphinx-testdata", "pocketsphinx-testdata", "en-US", "raw16k",
          ("usr/share/pocketsphinx/test/data/goforward.raw", "usr/share/pocketsphinx/test/data/numbers.raw",
           "usr/share/pocketsphinx/test/data/something.raw", "usr/share/pocketsphinx/test/data/tidigits/*.raw",
           "usr/share/pocketsphinx/test/data/cards/*.wav"),
          "pocketsphinx test utterances (one or more CMU speakers, counted as one)", min_seconds=1.0),
    Voice("pyannote-90", "pyannote-speaker90", PYANNOTE_WHEEL, "en-US", "wheel", (PYANNOTE_SAMPLE + ".wav",),
          "pyannote.audio sample conversation, speaker90 (RTTM)", speaker_label="speaker90", min_seconds=1.0),
    Voice("pyannote-91", "pyannote-speaker91", PYANNOTE_WHEEL, "en-US", "wheel", (PYANNOTE_SAMPLE + ".wav",),
          "pyannote.audio sample conversation, speaker91 (RTTM)", speaker_label="speaker91", min_seconds=1.0),
)
"""pocketsphinx-testdata's LibriVox excerpts are left out: LibriVox readers are LibriSpeech's
(and so Libri2Mix's) speakers, which a recipe here may train on."""

RESERVED_PACKAGES = tuple(dict.fromkeys(v.package for v in RESERVED))
APT_PACKAGES = tuple(p for p in RESERVED_PACKAGES if "==" not in p)


class ReservedSetError(RuntimeError):
    """The reserved sources are missing or a file outside them was offered."""


@dataclass
class Utterance:
    """One reserved recording (or one RTTM turn of the wheel's sample)."""

    voice: Voice
    path: str  # relative to the root (Debian) or the wheel member
    start: float = 0.0  # seconds, wheel turns only
    stop: float = 0.0
    wheel: str = ""  # path of the wheel file, kind "wheel"

    @property
    def uid(self):
        if self.voice.kind == "wheel":
            return f"{self.voice.package}:{self.path}@{self.start:.2f}-{self.stop:.2f}"
        return f"{self.voice.package}:/{self.path}"


# --------------------------------------------------------------------------- the reserved list
def _matches(voice, rel):
    rel = rel.replace(os.sep, "/")
    if any(fnmatch.fnmatch("/" + rel, pat) for pat in voice.exclude):
        return False
    if any(f"/{d}/" in "/" + rel for d in SKIP_DIRS):
        return False
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")) for pat in voice.patterns)


def reserved_voice(path, root="/"):
    """The :class:`Voice` whose patterns ``path`` (a file under ``root``) matches, else None."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel.startswith(".."):
        return None
    for voice in RESERVED:
        if voice.kind != "wheel" and _matches(voice, rel):
            return voice
    return None


def is_reserved_path(path, root="/"):
    """Whether ``path`` is one of the reserved evaluation recordings (training must skip it).

    Example
    -------
    >>> is_reserved_path("/usr/share/sounds/alsa/Front_Left.wav"), is_reserved_path("/usr/share/sounds/alsa/Noise.wav")
    (True, False)
    """
    return reserved_voice(path, root) is not None


def check_reserved(utt, root="/"):
    """Raise :class:`ReservedSetError` unless ``utt`` is a file of its own reserved voice."""
    if utt.voice not in RESERVED:
        raise ReservedSetError(f"{utt.uid}: voice {utt.voice.key!r} is not in the reserved list (RESERVED)")
    if utt.voice.kind == "wheel":
        name, version = utt.voice.package.split("==")
        if utt.path not in utt.voice.patterns or not fnmatch.fnmatch(
                os.path.basename(utt.wheel), f"{name.replace('.', '_')}-{version}-*.whl"):
            raise ReservedSetError(f"{utt.uid}: not the reserved member {utt.voice.patterns[0]} of the {utt.voice.package} wheel")
        return
    found = reserved_voice(os.path.join(root, utt.path), root)
    if found is None or found.key != utt.voice.key:
        raise ReservedSetError(
            f"{utt.path}: not in the reserved evaluation list for voice {utt.voice.key!r}; only the packaged "
            "recordings of RESERVED may enter this set"
        )


# --------------------------------------------------------------------------- collecting
def _read_rttm(text, label):
    """Single-speaker turns of ``label``: its RTTM turns minus every other speaker's turns."""
    turns = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            turns.setdefault(f[7], []).append((float(f[3]), float(f[3]) + float(f[4])))
    others = sorted(t for spk, ts in turns.items() if spk != label for t in ts)
    out = []
    for start, stop in sorted(turns.get(label, [])):
        pieces = [(start, stop)]
        for o0, o1 in others:
            nxt = []
            for a, b in pieces:
                if o1 <= a or o0 >= b:
                    nxt.append((a, b))
                    continue
                if o0 > a:
                    nxt.append((a, o0))
                if o1 < b:
                    nxt.append((o1, b))
            pieces = nxt
        out.extend(pieces)
    return out


def find_wheel(wheel_dir):
    """The pyannote.audio wheel of :data:`PYANNOTE_WHEEL` in ``wheel_dir``, or None."""
    name, version = PYANNOTE_WHEEL.split("==")
    hits = sorted(glob.glob(os.path.join(wheel_dir or "", f"{name.replace('.', '_')}-{version}-*.whl")))
    return hits[0] if hits else None


def collect_utterances(root="/", wheel_dir=None, allow_missing=False):
    """Every reserved utterance, per voice key (sorted; files shorter than the voice's minimum left out).

    Raises :class:`ReservedSetError` naming the packages to install when a voice has no files, unless
    ``allow_missing`` (then that voice is left out).
    """
    found, missing = {}, []
    wheel = find_wheel(wheel_dir)
    for voice in RESERVED:
        utts = []
        if voice.kind == "wheel":
            if wheel is not None:
                with zipfile.ZipFile(wheel) as z:
                    rttm = z.read(PYANNOTE_SAMPLE + ".rttm").decode()
                for a, b in _read_rttm(rttm, voice.speaker_label):
                    if b - a >= voice.min_seconds:
                        utts.append(Utterance(voice, voice.patterns[0], round(a, 3), round(b, 3), wheel))
        else:
            paths = set()
            for pat in voice.patterns:
                paths.update(glob.glob(os.path.join(root, pat), recursive=True))
            for path in sorted(paths):
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if _matches(voice, rel) and _duration(voice, path) >= voice.min_seconds:
                    utts.append(Utterance(voice, rel))
        if utts:
            found[voice.key] = utts
        else:
            missing.append(voice)
    if missing and not allow_missing:
        pkgs = sorted({v.package for v in missing})
        raise ReservedSetError(
            f"no recordings of {', '.join(v.key for v in missing)}: install {' '.join(pkgs)} "
            "(apt-get install --no-install-recommends / pip download --no-deps into the wheel folder; or --install)"
        )
    return found


def _duration(voice, path):
    if voice.kind == "gsm":
        return os.path.getsize(path) // 33 * 160 / 8000
    if voice.kind in ("raw8k", "raw16k"):
        return os.path.getsize(path) / 2 / (8000 if voice.kind == "raw8k" else 16000)
    try:
        return sf.info(path).duration
    except RuntimeError:
        return 0.0


def read_utterance(utt, root="/"):
    """``(samples float32 mono, rate)`` of a reserved utterance (checked against the list first)."""
    check_reserved(utt, root)
    kind = utt.voice.kind
    if kind == "wheel":
        with zipfile.ZipFile(utt.wheel) as z:
            x, rate = sf.read(io.BytesIO(z.read(utt.path)), dtype="float32", always_2d=True)
        x = x[int(round(utt.start * rate)): int(round(utt.stop * rate))]
    else:
        path = os.path.join(root, utt.path)
        if kind == "gsm":
            x, rate = sf.read(path, format="RAW", subtype="GSM610", samplerate=8000, channels=1,
                              dtype="float32", always_2d=True)
        elif kind in ("raw8k", "raw16k"):
            x = (np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0)[:, None]
            rate = 8000 if kind == "raw8k" else 16000
        else:
            x, rate = sf.read(path, dtype="float32", always_2d=True)
    return x.mean(1).astype(np.float32), int(rate)


def _load_8k(utt, root, cache):
    if utt.uid not in cache:
        x, rate = read_utterance(utt, root)
        cache[utt.uid] = trim_silence(resample(x, rate, SAMPLE_RATE), SAMPLE_RATE)
    return cache[utt.uid]


# --------------------------------------------------------------------------- planning and mixing
def compatible(a, b):
    """Two voices may share a mixture: different speakers and different packages."""
    return a.speaker != b.speaker and a.package != b.package


def plan_pairs(voices, n_mix, rng):
    """``n_mix`` (voice, voice) pairs: voices drawn in shuffled rounds (each about equally often),
    each paired with the next compatible voice in the queue, avoiding repeated pairs where possible."""
    by_key = {v.key: v for v in voices}
    keys = sorted(by_key)
    if not any(compatible(by_key[a], by_key[b]) for a in keys for b in keys):
        raise ReservedSetError("no two voices from different speakers and packages: cannot build a mixture")
    queue, pairs, seen = [], [], set()
    while len(pairs) < n_mix:
        while len(queue) < 2 * len(keys) + 2:
            queue.extend(keys[i] for i in rng.permutation(len(keys)))
        a = queue.pop(0)
        options = [j for j, b in enumerate(queue) if compatible(by_key[a], by_key[b])]
        fresh = [j for j in options if frozenset((a, queue[j])) not in seen]
        j = (fresh or options)[0]
        b = queue.pop(j)
        seen.add(frozenset((a, b)))
        pairs.append((by_key[a], by_key[b]))
    return pairs


class _UtteranceCycle:
    """Each voice's utterances in a seeded order, handed out in turn (reused only after all were used)."""

    def __init__(self, utts, rng):
        self.utts = [utts[i] for i in rng.permutation(len(utts))]
        self.pos = 0

    def chain(self, root, cache, max_samples):
        """Utterances taken in turn until they add up to ``max_samples`` (none repeated in a chain)."""
        picked, total = [], 0
        for _ in range(len(self.utts)):
            utt = self.utts[self.pos % len(self.utts)]
            self.pos += 1
            picked.append(utt)
            total += len(_load_8k(utt, root, cache))
            if total >= max_samples:
                break
        return picked


def build_real_speech(out_dir, n_mix=24, seed=0, max_seconds=4.0, root="/", wheel_dir=None,
                      allow_missing=False, progress=True):
    """Write the reserved real-speech test set into ``out_dir`` (see the module docstring).

    Returns the list of mixture records (the rows of ``metadata.csv``).
    """
    if not isinstance(n_mix, int) or n_mix < 1:
        raise ValueError(f"n_mix must be a positive int, got {n_mix!r}")
    if max_seconds is None or max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    for split in ("tr", "cv"):
        if os.path.isdir(os.path.join(out_dir, "wav8k", "min", split)):
            raise ReservedSetError(f"{out_dir} holds a {split}/ split: the reserved set must not share a folder with training data")
    utts = collect_utterances(root, wheel_dir, allow_missing)
    voices = [v for v in RESERVED if v.key in utts]
    rng = np.random.default_rng(seed)
    cycles = {v.key: _UtteranceCycle(utts[v.key], rng) for v in voices}
    pairs = plan_pairs(voices, n_mix, rng)
    gains = rng.uniform(0.0, 5.0, size=n_mix)
    max_samples = int(round(max_seconds * SAMPLE_RATE))

    tt = os.path.join(out_dir, "wav8k", "min", "tt")
    if os.path.isdir(tt):
        shutil.rmtree(tt)  # a rebuild replaces the old set (fewer mixtures leave no stale files)
    for name in ("mix", "s1", "s2"):
        os.makedirs(os.path.join(tt, name), exist_ok=True)
    cache, rows = {}, []
    for i, ((v1, v2), gain) in enumerate(_progress(list(zip(pairs, gains)), progress, "real speech")):
        chains = [cycles[v.key].chain(root, cache, max_samples) for v in (v1, v2)]
        x1, x2 = (np.concatenate([_load_8k(u, root, cache) for u in c]) for c in chains)
        mix, s1, s2 = mix_pair(x1, x2, float(gain), SAMPLE_RATE, max_samples)
        mid = f"rs{i:03d}_{v1.key}_{v2.key}"
        for name, sig in (("mix", mix), ("s1", s1), ("s2", s2)):
            sf.write(os.path.join(tt, name, f"{mid}.wav"), sig, SAMPLE_RATE, subtype="PCM_16")
        rows.append(dict(id=mid, spk1=v1.speaker, spk2=v2.speaker, voice1=v1.key, voice2=v2.key,
                         package1=v1.package, package2=v2.package, lang1=v1.language, lang2=v2.language,
                         gain_db=f"{gain:.6f}", seconds=f"{len(mix) / SAMPLE_RATE:.3f}",
                         utts1=";".join(u.uid for u in chains[0]), utts2=";".join(u.uid for u in chains[1])))
    _write_csv(os.path.join(out_dir, "metadata.csv"), rows)
    _write_csv(os.path.join(out_dir, "sources.csv"), _source_rows(voices, utts, root))
    with open(os.path.join(out_dir, ".gitignore"), "w", encoding="utf-8") as f:
        f.write("# built by benchmarks/real_speech_eval.py: never commit (the recordings' licences vary)\n*\n")
    with open(os.path.join(out_dir, "RESERVED_FOR_EVALUATION.txt"), "w", encoding="utf-8") as f:
        f.write("Real recorded speech reserved for evaluation (benchmarks/real_speech_eval.py).\n"
                "Never train, validate or tune on these files or on the packaged recordings they come from.\n")
    return rows


def _source_rows(voices, utts, root):
    rows = []
    for v in voices:
        h, seconds = hashlib.sha256(), 0.0
        for u in utts[v.key]:
            data = open(u.wheel, "rb").read() if v.kind == "wheel" else open(os.path.join(root, u.path), "rb").read()
            h.update(u.uid.encode() + b"\0" + hashlib.sha256(data).digest())
            seconds += (u.stop - u.start) if v.kind == "wheel" else _duration(v, os.path.join(root, u.path))
        rows.append(dict(voice=v.key, speaker=v.speaker, package=v.package, version=_package_version(v.package),
                         language=v.language, files=len(utts[v.key]), seconds=f"{seconds:.1f}",
                         credit=v.credit, sha256=h.hexdigest()[:16]))
    return rows


def _package_version(package):
    if "==" in package:
        return package.split("==")[1]
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


def install(wheel_dir):
    """apt-get install the Debian packages and pip download the pyannote.audio wheel (no dependencies)."""
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES], check=True)
    if find_wheel(wheel_dir) is None:
        os.makedirs(wheel_dir, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", wheel_dir, PYANNOTE_WHEEL], check=True)


# --------------------------------------------------------------------------- evaluation
def find_test_folder(folder):
    """``<folder>/wav8k/min/tt`` (or ``folder`` itself when it holds mix/, s1/, s2/)."""
    for cand in (os.path.join(folder, "wav8k", "min", "tt"), os.path.join(folder, "wav16k", "min", "tt"), folder):
        if all(os.path.isdir(os.path.join(cand, d)) for d in ("mix", "s1", "s2")):
            return cand
    raise ValueError(f"{folder}: no wav8k/min/tt/{{mix,s1,s2}} (nor mix/, s1/, s2/) folders; build or generate it first")


def list_mixtures(folder, n=None):
    """Sorted ``(id, mix, s1, s2)`` paths of a wsj0-2mix-layout test folder (the first ``n``)."""
    tt = find_test_folder(folder)
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(tt, "mix")) if f.endswith(".wav"))
    if not ids:
        raise ValueError(f"{tt}/mix: no .wav files")
    return [(i, *(os.path.join(tt, d, f"{i}.wav") for d in ("mix", "s1", "s2"))) for i in ids[:n]]


def read_mixture(paths, rate):
    """``(mix (T,), refs (2, T))`` float32 tensors at ``rate``."""
    import torch

    sigs = []
    for p in paths:
        x, fs = sf.read(p, dtype="float32", always_2d=True)
        sigs.append(resample(x.mean(1), fs, rate))
    n = min(len(s) for s in sigs)
    sigs = [torch.from_numpy(np.ascontiguousarray(s[:n])) for s in sigs]
    return sigs[0], torch.stack(sigs[1:])


def score_mixture(est, refs, mix, rate):
    """Per-mixture means of SI-SDRi (best permutation), SI-SDR, PESQ (nb) and ESTOI."""
    from speechbrain_diffsep.metrics import evaluate_separation

    out = evaluate_separation(est, refs, mix, rate, metrics=("si_sdr", "si_sdri", "pesq", "estoi"))
    row = {k: float(np.nanmean(out[k])) if not all(math.isnan(v) for v in out[k]) else math.nan
           for k in ("si_sdri", "si_sdr", "pesq", "estoi")}
    row["per_source_si_sdri"] = [float(v) for v in out["si_sdri"]]
    return row


class Separator:
    """A model folder behind one call ``(mix (T,), seed) -> (K, T)``; ``kind`` diffsep / conv-tasnet / mixture."""

    def __init__(self, kind, folder=None, label=None):
        self.kind, self.folder = kind, folder
        self.label = label or ("mixture (unprocessed)" if kind == "mixture" else _display(folder))
        self.model, self.rate = None, SAMPLE_RATE
        if kind == "diffsep":
            from speechbrain_diffsep.inference import DiffSepSeparation

            self.model = DiffSepSeparation.from_hparams(source=folder, savedir=folder)
            self.rate = int(self.model.hparams.sample_rate)
        elif kind == "conv-tasnet":
            from speechbrain_diffsep.inference import _load_separator

            self.model = _load_separator(folder)
            self.rate = int(self.model.hparams.sample_rate)
            self.label = label or f"{_display(folder)} (Conv-TasNet alone)"
        elif kind != "mixture":
            raise ValueError(f"kind must be diffsep, conv-tasnet or mixture, got {kind!r}")

    def __call__(self, mix, seed):
        import torch

        if self.kind == "mixture":
            return mix.expand(2, -1).clone()
        with torch.no_grad():
            if self.kind == "diffsep":
                est = self.model.separate_batch(mix[None], seed=seed)[0].T
            else:
                est = self.model.separate_batch(mix[None])[0].T
        n = mix.shape[-1]
        est = est[:, :n] if est.shape[-1] >= n else torch.nn.functional.pad(est, (0, n - est.shape[-1]))
        return est.float().cpu()


def evaluate(separators, datasets, n=None, progress=True):
    """Scores of every separator on every data set: ``{"results": [...], "mixtures": {...}}``.

    ``datasets``: ``(label, folder)`` pairs; mixtures are separated one at a time with seed = index.
    """
    import torch

    results, per_mix = [], {}
    for ds_label, folder in datasets:
        mixtures = list_mixtures(folder, n)
        meta = _read_metadata(folder)
        for sep in separators:
            torch.manual_seed(0)
            rows, t0 = [], time.time()
            for i, (mid, *paths) in enumerate(_progress(mixtures, progress, f"{sep.label} | {ds_label}")):
                mix, refs = read_mixture(paths, sep.rate)
                est = sep(mix, i)
                row = score_mixture(est, refs, mix, sep.rate)
                rows.append(dict(id=mid, **row))
            summary = dict(model=sep.label, data=ds_label, n=len(rows), seconds=round(time.time() - t0, 1))
            for k in ("si_sdri", "si_sdr", "pesq", "estoi"):
                vals = [r[k] for r in rows if not math.isnan(r[k])]
                summary[k] = float(np.mean(vals)) if vals else math.nan
            if meta:
                summary["by_language"] = _by_field(rows, meta, "lang", lambda lang: lang.split("-")[0])
                summary["by_voice"] = _by_field(rows, meta, "voice")
            results.append(summary)
            per_mix[f"{sep.label} | {ds_label}"] = rows
            print(f"{sep.label:45s} {ds_label:16s} n={len(rows):3d} SI-SDRi={summary['si_sdri']:6.2f} dB "
                  f"PESQ={summary['pesq']:.2f} ESTOI={summary['estoi']:.3f}", flush=True)
    return {"results": results, "mixtures": per_mix}


def _read_metadata(folder):
    path = os.path.join(folder, "metadata.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["id"]: r for r in csv.DictReader(f) if "voice1" in r}


def _by_field(rows, meta, field_name, group=lambda v: v):
    """Mean per-source SI-SDRi grouped by ``group`` of each source's language or voice (metadata.csv)."""
    groups = {}
    for r in rows:
        m = meta.get(r["id"])
        if m is None:
            continue
        for k, val in enumerate(r["per_source_si_sdri"]):
            groups.setdefault(group(m[f"{field_name}{k + 1}"]), []).append(val)
    return {g: dict(si_sdri=float(np.mean(v)), n=len(v)) for g, v in sorted(groups.items())}


def _display(path):
    """A path for the shipped tables: relative to the working directory, else its last two parts."""
    if path is None:
        return ""
    rel = os.path.relpath(os.path.abspath(path), os.getcwd())
    if not rel.startswith(".."):
        return rel.replace(os.sep, "/")
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def _fmt(x, digits=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"


def markdown_tables(report):
    """The markdown of :func:`evaluate`'s report: a long table and an SI-SDRi model x data set table."""
    res = report["results"]
    lines = ["| model | data set | mixtures | SI-SDRi (dB) | SI-SDR (dB) | PESQ (nb) | ESTOI |",
             "|---|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['model']} | {r['data']} | {r['n']} | {_fmt(r['si_sdri'])} | {_fmt(r['si_sdr'])} | "
                     f"{_fmt(r['pesq'])} | {_fmt(r['estoi'], 3)} |")
    models = list(dict.fromkeys(r["model"] for r in res))
    data = list(dict.fromkeys(r["data"] for r in res))
    cell = {(r["model"], r["data"]): r for r in res}
    lines += ["", "SI-SDRi (dB), model x data set:", "", "| model | " + " | ".join(data) + " |",
              "|---|" + "---|" * len(data)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_fmt(cell[(m, d)]["si_sdri"]) if (m, d) in cell else "" for d in data) + " |")
    langs = [r for r in res if r.get("by_language")]
    if langs:
        keys = list(dict.fromkeys(k for r in langs for k in r["by_language"]))
        lines += ["", "Per-source SI-SDRi (dB) by the source's language (built real-speech sets):", "",
                  "| model | data set | " + " | ".join(f"{k} (n={langs[0]['by_language'].get(k, {}).get('n', 0)})"
                                                       for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in langs:
            lines.append(f"| {r['model']} | {r['data']} | " + " | ".join(
                _fmt(r["by_language"][k]["si_sdri"]) if k in r["by_language"] else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(report, out_dir, command=None):
    os.makedirs(out_dir, exist_ok=True)
    md = markdown_tables(report)
    with open(os.path.join(out_dir, "real_speech_eval.md"), "w", encoding="utf-8") as f:
        if command:
            f.write(f"```bash\n{command}\n```\n\n")
        f.write(md)
    with open(os.path.join(out_dir, "real_speech_eval.json"), "w", encoding="utf-8") as f:
        json.dump(dict(report, command=command), f, indent=1, allow_nan=True)
    return md


def merge_reports(folders, out_dir):
    """One report from the ``real_speech_eval.json`` of several runs (rows in the order given)."""
    merged = {"results": [], "mixtures": {}, "commands": []}
    for folder in folders:
        with open(os.path.join(folder, "real_speech_eval.json"), encoding="utf-8") as f:
            rep = json.load(f)
        seen = {(r["model"], r["data"]) for r in merged["results"]}
        merged["results"] += [r for r in rep["results"] if (r["model"], r["data"]) not in seen]
        merged["mixtures"].update(rep["mixtures"])
        merged["commands"].append(rep.get("command"))
    command = "\n".join(c for c in merged.pop("commands") if c)
    return write_report(merged, out_dir, command)


def _dataset_arg(spec):
    label, sep, folder = spec.partition("=")
    if not sep:
        folder = spec
        label = os.path.basename(os.path.normpath(spec))
    return label, folder


def _command_line(argv):
    """The command as run, with this machine's absolute paths shortened (for the shipped files)."""
    parts = ["python", "benchmarks/real_speech_eval.py"]
    for a in argv:
        if os.path.isabs(a.split("=")[-1]):
            head, _, tail = a.rpartition("=")
            a = (head + "=" if head else "") + _display(tail)
        parts.append(a)
    return " ".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", metavar="DIR", help="build the reserved real-speech set into DIR")
    p.add_argument("--n-mix", type=int, default=24, help="mixtures to build (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=4.0)
    p.add_argument("--root", default="/", help="file-system root of the Debian packages (tests use a fake one)")
    p.add_argument("--wheel-dir", help="folder with the pyannote.audio wheel (default <build>/.wheels)")
    p.add_argument("--allow-missing", action="store_true", help="build without the voices whose package is missing")
    p.add_argument("--install", action="store_true", help="apt-get install the packages and pip download the wheel first")
    p.add_argument("--print-apt", action="store_true", help="print the Debian packages and exit")
    p.add_argument("--list", action="store_true", help="print the reserved voices and exit")
    p.add_argument("--model", action="append", default=[], help="DiffSep model folder (repeatable)")
    p.add_argument("--conv-tasnet", action="append", default=[], help="Conv-TasNet model folder (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="[LABEL=]DIR",
                   help="wsj0-2mix-layout folder to evaluate on (repeatable); --build DIR is evaluated first")
    p.add_argument("--n", type=int, help="evaluate at most this many mixtures per data set")
    p.add_argument("--out", help="folder for real_speech_eval.md / .json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="only merge the reports of earlier runs into --out")
    args = p.parse_args(argv)

    if args.print_apt:
        print(" ".join(APT_PACKAGES))
        return 0
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        print(merge_reports(args.merge, args.out))
        return 0
    if args.list:
        for v in RESERVED:
            print(f"{v.key:14s} {v.speaker:22s} {v.language:6s} {v.package:32s} {v.credit}")
        return 0
    wheel_dir = args.wheel_dir or (os.path.join(args.build, ".wheels") if args.build else None)
    if args.install:
        install(wheel_dir or ".wheels")
    datasets = [_dataset_arg(d) for d in args.data]
    if args.build:
        try:
            rows = build_real_speech(args.build, args.n_mix, args.seed, args.max_seconds, args.root, wheel_dir,
                                     args.allow_missing, progress=not args.no_progress)
        except (ReservedSetError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        spk = {r[k] for r in rows for k in ("spk1", "spk2")}
        langs = {r[k].split("-")[0] for r in rows for k in ("lang1", "lang2")}
        pkgs = {r[k] for r in rows for k in ("package1", "package2")}
        print(f"built {len(rows)} mixtures in {args.build}/wav8k/min/tt: {len(spk)} speakers, "
              f"{len(langs)} languages ({', '.join(sorted(langs))}), {len(pkgs)} packages")
        if args.build not in (d for _, d in datasets):
            datasets.insert(0, (os.path.basename(os.path.normpath(args.build)), args.build))
    separators_spec = [("diffsep", m) for m in args.model] + [("conv-tasnet", m) for m in args.conv_tasnet]
    if not separators_spec:
        if not args.build:
            p.error("nothing to do: give --build DIR and/or --model / --conv-tasnet with --data")
        return 0
    if not datasets:
        p.error("no data set: give --data DIR (or --build DIR)")
    import torch

    torch.set_num_threads(args.threads)
    separators = [Separator("mixture")] + [Separator(k, f) for k, f in separators_spec]
    report = evaluate(separators, datasets, args.n, progress=not args.no_progress)
    md = markdown_tables(report)
    print(md)
    if args.out:
        write_report(report, args.out, _command_line(argv))
        print(f"wrote {args.out}/real_speech_eval.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
