#!/usr/bin/env python3
"""Generate MiniMix: a small two-speaker mixture data set in the exact wsj0-2mix layout.

The speech is real synthesized speech (Debian ``flite`` voices kal16, awb, rms, slt and several
``espeak-ng`` voices with their own pitch and speed), speaking random English sentences built from
templates. The train, valid and test splits draw their nouns from disjoint word pools, so no
sentence (not even a noun) is shared between splits. Each mixture has two different speakers at
a random relative level uniform in [0, 5] dB (speaker 1 at +g/2 dB, speaker 2 at -g/2 dB around
the same active level, as wsj0-2mix), both truncated to the shorter one ("min" mode) and optionally
to ``max_seconds``; the three signals are then scaled together to a peak of 0.9 and written as
16-bit PCM wav (as wsj0-2mix), the mixture being the integer sum of the quantized sources, so
``mix == s1 + s2`` exactly (also after reading as float)::

    <out>/wav8k/min/{tr,cv,tt}/{mix,s1,s2}/<id>.wav
    <out>/metadata/{tr,cv,tt}.csv      (id, speakers, sentences, relative gain in dB)

Synthesized utterances are cached (``<out>/.synth_cache`` by default) and everything is drawn from
one seeded generator, so two runs with the same arguments write bit-identical files.

Usage::

    python recipes/MiniMix/generate_minimix.py --out DIR --n-train 300 --n-valid 30 --n-test 30 \
        --seed 0 [--max-seconds 4]
"""

import argparse
import csv
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SPLITS = ("tr", "cv", "tt")
INSTALL_HINT = "MiniMix needs flite and espeak-ng: apt-get install flite espeak-ng"

#: Speaker name -> (engine, voice, espeak pitch 0-99, espeak speed in words per minute).
SPEAKERS = {
    "flite-kal16": ("flite", "kal16", None, None),
    "flite-awb": ("flite", "awb", None, None),
    "flite-rms": ("flite", "rms", None, None),
    "flite-slt": ("flite", "slt", None, None),
    "espeak-usm3": ("espeak-ng", "en-us+m3", 35, 160),
    "espeak-usf2": ("espeak-ng", "en-us+f2", 70, 150),
    "espeak-gbm1": ("espeak-ng", "en-gb+m1", 45, 170),
    "espeak-rpf4": ("espeak-ng", "en-gb-x-rp+f4", 60, 140),
    "espeak-scm5": ("espeak-ng", "en-gb-scotland+m5", 25, 155),
    "espeak-caf3": ("espeak-ng", "en-029+f3", 80, 165),
}

# Nouns are split between the data splits (disjoint pools); the other words are shared.
NOUNS = {
    "tr": (
        "river garden window teacher doctor farmer market kitchen bottle letter mountain village "
        "engine pencil basket blanket bridge castle camera candle carpet ladder lemon mirror "
        "needle orange pocket rabbit saddle sailor tiger tunnel wagon whistle button circle "
        "dinner feather hammer island jacket kettle lantern meadow "
        "monkey napkin parrot pepper pillow planet rocket shovel spider summer ticket tower"
    ).split(),
    "cv": "anchor barrel cabin dragon falcon harbor helmet jungle magnet orchard puzzle violin".split(),
    "tt": "balloon chimney compass desert forest guitar insect lobster marble pirate statue wizard".split(),
}
ADJECTIVES = (
    "small large quiet noisy yellow purple golden silver ancient modern gentle angry happy "
    "tired clever lazy bright dark heavy empty famous hidden narrow wooden"
).split()
VERBS = (
    "found carried painted opened cleaned repaired watched followed pushed lifted "
    "borrowed dropped wrapped measured counted visited noticed"
).split()
PLACES = "near the station|behind the school|under the table|beside the lake|inside the shop|on the hill".split("|")
NAMES = "Anna Peter Maria David Sarah Thomas Laura Michael Emma Daniel".split()
TIMES = "yesterday|this morning|last winter|every Sunday|at midnight|before lunch".split("|")
TEMPLATES = (
    "The {adj} {noun} {verb} the {noun2} {place}.",
    "{name} {verb} the {adj} {noun} {time}.",
    "{time} the {noun} was {adj} and the {noun2} was {adj2}.",
    "Did {name} see the {adj} {noun} {place}?",
    "A {noun} and a {adj} {noun2} were {place} {time}.",
    "{name} said that the {noun} {verb} the {adj} {noun2}.",
)


class MiniMixError(RuntimeError):
    """A one-line, user-facing error of the generator."""


# --------------------------------------------------------------------------- sentences
def make_sentences(split, count, rng):
    """``count`` distinct random sentences whose nouns all come from ``split``'s noun pool."""
    nouns = NOUNS[split]
    sentences, seen = [], set()
    for _ in range(count * 200):
        if len(sentences) == count:
            break
        tpl = TEMPLATES[rng.integers(len(TEMPLATES))]
        n1, n2 = rng.choice(len(nouns), size=2, replace=False)
        a1, a2 = rng.choice(len(ADJECTIVES), size=2, replace=False)
        text = tpl.format(
            adj=ADJECTIVES[a1],
            adj2=ADJECTIVES[a2],
            noun=nouns[n1],
            noun2=nouns[n2],
            verb=VERBS[rng.integers(len(VERBS))],
            place=PLACES[rng.integers(len(PLACES))],
            name=NAMES[rng.integers(len(NAMES))],
            time=TIMES[rng.integers(len(TIMES))],
        )
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            sentences.append(text)
    if len(sentences) < count:
        raise MiniMixError(f"could not make {count} distinct sentences for split {split!r}; ask for fewer mixtures")
    return sentences


# --------------------------------------------------------------------------- synthesis
def check_tools():
    """Raise :class:`MiniMixError` (one line) if flite or espeak-ng is not installed."""
    missing = [tool for tool in ("flite", "espeak-ng") if shutil.which(tool) is None]
    if missing:
        raise MiniMixError(f"{' and '.join(missing)} not found; {INSTALL_HINT}")


def _synth_raw(speaker, text, wav_path):
    engine, voice, pitch, speed = SPEAKERS[speaker]
    if engine == "flite":
        cmd = ["flite", "-voice", voice, "-t", text, "-o", wav_path]
    else:
        cmd = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", wav_path, text]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(wav_path):
        raise MiniMixError(f"{engine} failed for voice {voice}: {proc.stderr.strip()[:200]}; {INSTALL_HINT}")


def trim_silence(x, sample_rate, threshold_db=-40.0, margin_s=0.05):
    """Cut leading and trailing parts quieter than ``threshold_db`` below the peak (10 ms frames)."""
    hop = max(1, int(0.01 * sample_rate))
    n_frames = len(x) // hop
    if n_frames == 0:
        return x
    energy = (x[: n_frames * hop].reshape(n_frames, hop) ** 2).mean(1)
    active = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 10))
    if active.size == 0:  # all silent
        return x
    margin = int(margin_s * sample_rate)
    start = max(0, active[0] * hop - margin)
    stop = min(len(x), (active[-1] + 1) * hop + margin)
    return x[start:stop]


def active_rms(x, sample_rate, threshold_db=-30.0):
    """RMS over the 10 ms frames within ``threshold_db`` of the loudest one (a simple active level)."""
    hop = max(1, int(0.01 * sample_rate))
    n_frames = max(1, len(x) // hop)
    energy = (x[: n_frames * hop].reshape(n_frames, -1) ** 2).mean(1)
    active = energy[energy >= energy.max() * 10 ** (threshold_db / 10)]
    rms = float(np.sqrt(active.mean()))
    if rms == 0.0:
        raise MiniMixError("a synthesized utterance is silent; check the flite / espeak-ng installation")
    return rms


def resample(x, rate, sample_rate):
    """``x`` (float32, 1-D) from ``rate`` to ``sample_rate`` with scipy's polyphase filter in float64.

    Deterministic whatever the thread count: the synthesis runs in worker threads, and torch's
    resampling convolution may sum in a different order there (MiniMix must be bit-identical
    for a seed, ``tests/test_minimix.py``). scipy's ``upfirdn`` is single-threaded C.
    """
    if rate == sample_rate:
        return np.asarray(x, dtype=np.float32)
    g = math.gcd(int(rate), int(sample_rate))
    y = resample_poly(np.asarray(x, dtype=np.float64), int(sample_rate) // g, int(rate) // g)
    return y.astype(np.float32)


def synthesize(speaker, text, sample_rate, cache_dir):
    """Speech of ``speaker`` saying ``text`` at ``sample_rate`` (float32, silence trimmed, cached)."""
    key = hashlib.sha1(f"{speaker}|{SPEAKERS[speaker]}|{sample_rate}|{text}|poly".encode()).hexdigest()
    path = os.path.join(cache_dir, f"{key}.npy")
    if os.path.isfile(path):
        return np.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        _synth_raw(speaker, text, raw)
        x, rate = sf.read(raw, dtype="float32", always_2d=True)
    x = resample(x[:, 0], rate, sample_rate)
    x = trim_silence(x, sample_rate)
    os.makedirs(cache_dir, exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp_path, x.astype(np.float32))
    os.replace(tmp_path, path)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- mixing
def plan_split(split, n_mix, rng):
    """The recipe of each mixture of a split: speakers, sentences and relative gain (dB)."""
    sentences = make_sentences(split, max(2, 2 * n_mix), rng)
    speakers = sorted(SPEAKERS)
    plan = []
    for i in range(n_mix):
        spk = rng.choice(len(speakers), size=2, replace=False)
        sent = rng.choice(len(sentences), size=2, replace=False)
        gain_db = float(rng.uniform(0.0, 5.0))
        plan.append(
            {
                "id": f"{split}{i:05d}_{speakers[spk[0]]}_{speakers[spk[1]]}",
                "spk1": speakers[spk[0]],
                "spk2": speakers[spk[1]],
                "text1": sentences[sent[0]],
                "text2": sentences[sent[1]],
                "gain_db": gain_db,
            }
        )
    return plan


def mix_pair(x1, x2, gain_db, sample_rate, max_samples=None):
    """wsj0-2mix style mixing: same active level, +-gain/2 dB, 'min' truncation, peak 0.9.

    Returns ``(mix, s1, s2)`` as int16 arrays (16-bit PCM, like wsj0-2mix) with ``mix == s1 + s2``
    exactly: the sources are quantized first and the mixture is their integer sum.
    """
    n = min(len(x1), len(x2))
    if max_samples is not None:
        n = min(n, max_samples)
    x1 = x1[:n].astype(np.float64) / active_rms(x1[:n], sample_rate) * 10 ** (gain_db / 40)
    x2 = x2[:n].astype(np.float64) / active_rms(x2[:n], sample_rate) * 10 ** (-gain_db / 40)
    peak = max(np.abs(x1).max(), np.abs(x2).max(), np.abs(x1 + x2).max())
    s1 = np.round(x1 * (0.9 * 32768 / peak)).astype(np.int32)
    s2 = np.round(x2 * (0.9 * 32768 / peak)).astype(np.int32)
    mix = s1 + s2  # |mix| <= 0.9 * 32768 + 1, no clipping
    return mix.astype(np.int16), s1.astype(np.int16), s2.astype(np.int16)


def generate_minimix(
    out_dir,
    n_train=300,
    n_valid=30,
    n_test=30,
    seed=0,
    max_seconds=None,
    sample_rate=8000,
    cache_dir=None,
    jobs=2,
    progress=True,
):
    """Write a MiniMix data set into ``out_dir`` (wsj0-2mix layout, see the module docstring).

    Arguments
    ---------
    out_dir : str
        Output folder; ``<out_dir>/wav8k/min/...`` is what ``prepare_wsj0mix`` reads.
    n_train, n_valid, n_test : int
        Number of mixtures in tr, cv and tt.
    seed : int
        Seed of the single random generator (same seed -> bit-identical files).
    max_seconds : float, optional
        Crop every mixture to at most this length.
    sample_rate : int
        8000 (``wav8k``, the default, as the paper) or 16000 (``wav16k``).
    cache_dir : str, optional
        Synthesis cache (default ``<out_dir>/.synth_cache``).
    jobs : int
        Parallel synthesizer processes.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict split -> list of the mixture recipes (id, speakers, sentences, gain_db).
    """
    counts = {"tr": n_train, "cv": n_valid, "tt": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of {split} mixtures must be a positive int, got {n!r}")
    if sample_rate not in (8000, 16000):
        raise ValueError(f"sample_rate must be 8000 or 16000, got {sample_rate!r}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    check_tools()

    rng = np.random.default_rng(seed)
    plans = {split: plan_split(split, counts[split], rng) for split in SPLITS}
    cache_dir = cache_dir or os.path.join(out_dir, ".synth_cache")
    max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))
    root = os.path.join(out_dir, f"wav{sample_rate // 1000}k", "min")

    # synthesize every distinct (speaker, sentence) once, in parallel, into the cache
    jobs_list = sorted({(m[f"spk{k}"], m[f"text{k}"]) for p in plans.values() for m in p for k in (1, 2)})
    bar = _tqdm(total=len(jobs_list) + sum(counts.values()), desc="MiniMix", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for _ in pool.map(lambda job: synthesize(job[0], job[1], sample_rate, cache_dir), jobs_list):
            bar.update(1)

    for split in SPLITS:
        folders = {name: os.path.join(root, split, name) for name in ("mix", "s1", "s2")}
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
        for m in plans[split]:
            x1 = synthesize(m["spk1"], m["text1"], sample_rate, cache_dir)
            x2 = synthesize(m["spk2"], m["text2"], sample_rate, cache_dir)
            signals = dict(zip(("mix", "s1", "s2"), mix_pair(x1, x2, m["gain_db"], sample_rate, max_samples)))
            for name, sig in signals.items():
                sf.write(os.path.join(folders[name], f"{m['id']}.wav"), sig, sample_rate, subtype="PCM_16")
            bar.update(1)
        _write_metadata(os.path.join(out_dir, "metadata", f"{split}.csv"), plans[split])
    bar.close()
    return plans


def _write_metadata(path, plan):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "spk1", "spk2", "text1", "text2", "gain_db"])
        writer.writeheader()
        for m in plan:
            writer.writerow({**m, "gain_db": f"{m['gain_db']:.6f}"})


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(**kwargs)


def main(argv=None):
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (gets wav8k/min/{tr,cv,tt})")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-valid", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None, help="crop every mixture to this length")
    parser.add_argument("--sample-rate", type=int, default=8000, choices=[8000, 16000])
    parser.add_argument("--cache-dir", default=None, help="synthesis cache (default <out>/.synth_cache)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel synthesizer processes")
    args = parser.parse_args(argv)
    try:
        generate_minimix(
            args.out,
            args.n_train,
            args.n_valid,
            args.n_test,
            seed=args.seed,
            max_seconds=args.max_seconds,
            sample_rate=args.sample_rate,
            cache_dir=args.cache_dir,
            jobs=args.jobs,
        )
    except (MiniMixError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MiniMix written to {os.path.abspath(args.out)}/wav{args.sample_rate // 1000}k/min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
