"""benchmarks/real_speech_eval.py without the Debian packages: a fake file-system root with synthetic
files at the reserved paths (and a fake pyannote.audio wheel), the mixing, the reserved-list guard and
the evaluation path (metrics tables, and one real bundled model on one mixture)."""

import csv
import importlib.util
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_speech_eval", ROOT / "benchmarks" / "real_speech_eval.py")
rse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rse)

VOICES = {v.key: v for v in rse.RESERVED}


def _speechlike(seconds, rate, f0, seed):
    """Voiced harmonics with a syllable-rate envelope and a little noise, between short silences."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12) if k * f0 < rate / 2 - 200)
    x = x * np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) + 0.01 * rng.standard_normal(len(t))
    pad = np.zeros(int(0.2 * rate))
    return (0.3 * np.concatenate([pad, x / np.abs(x).max(), pad])).astype(np.float32)


def _wav(path, seconds, rate, f0, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _speechlike(seconds, rate, f0, seed), rate, subtype="PCM_16")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """Synthetic recordings at the paths of six reserved voices (three kinds of file), plus files that
    must be left out (ALSA's Noise.wav, Asterisk's silence/), plus a fake pyannote.audio wheel."""
    root = tmp_path_factory.mktemp("root")
    snd = root / "usr/share/asterisk/sounds"
    for i in range(3):
        _wav(snd / f"en_US_f_Allison/prompt{i}.wav", 1.8 + 0.4 * i, 8000, 200, i)
        _wav(snd / f"es_MX_f_Allison/prompt{i}.wav", 2.0, 8000, 210, 10 + i)
        _wav(snd / f"it_IT_m_Carlo/prompt{i}.wav", 2.2, 8000, 120, 20 + i)
    _wav(snd / "en_US_f_Allison/silence/5.wav", 5.0, 8000, 200, 99)
    (snd / "fr").mkdir(parents=True)
    for i in range(2):  # headerless GSM 6.10, as Asterisk's .gsm prompts
        with sf.SoundFile(snd / f"fr/p{i}.gsm", "w", 8000, 1, "GSM610", format="RAW") as f:
            f.write(_speechlike(2.0, 8000, 230, 30 + i))
    for i, name in enumerate(("Front_Left", "Front_Right", "Rear_Left", "Noise")):
        _wav(root / f"usr/share/sounds/alsa/{name}.wav", 1.1, 48000, 190, 40 + i)
    raw = root / "usr/share/codec2/raw"
    raw.mkdir(parents=True)
    for name, f0 in (("hts1", 110), ("hts2", 180)):
        (np.round(_speechlike(5.0, 8000, f0, f0) * 32767).astype("<i2")).tofile(raw / f"{name}.raw")
    wheels = tmp_path_factory.mktemp("wheels")
    buf = wheels / "sample.wav"
    conv = np.concatenate([_speechlike(3.0, 16000, 120, 1), _speechlike(3.0, 16000, 220, 2)])
    sf.write(buf, conv, 16000, subtype="PCM_16")
    with zipfile.ZipFile(wheels / "pyannote_audio-4.0.7-py3-none-any.whl", "w") as z:
        z.write(buf, rse.PYANNOTE_SAMPLE + ".wav")
        z.writestr(rse.PYANNOTE_SAMPLE + ".rttm",
                   "SPEAKER sample 1 0.000 3.300 <NA> <NA> speaker90 <NA> <NA>\n"
                   "SPEAKER sample 1 3.100 3.300 <NA> <NA> speaker91 <NA> <NA>\n")
    buf.unlink()
    return root, wheels


def _build(fake_root, out, seed=0, n_mix=8):
    root, wheels = fake_root
    return rse.build_real_speech(str(out), n_mix=n_mix, seed=seed, max_seconds=4.0, root=str(root),
                                 wheel_dir=str(wheels), allow_missing=True, progress=False)


def test_mixtures_are_exact_sums_of_two_different_speakers_at_8khz(fake_root, tmp_path):
    rows = _build(fake_root, tmp_path / "rs")
    tt = tmp_path / "rs/wav8k/min/tt"
    assert len(rows) == 8 and not (tmp_path / "rs/wav8k/min/tr").exists()
    for r in rows:
        sigs = {}
        for name in ("mix", "s1", "s2"):
            info = sf.info(tt / name / f"{r['id']}.wav")
            assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
            sigs[name] = sf.read(tt / name / f"{r['id']}.wav", dtype="int16")[0].astype(np.int32)
        assert np.array_equal(sigs["mix"], sigs["s1"] + sigs["s2"])
        assert 1.0 <= len(sigs["mix"]) / 8000 <= 4.0 and float(r["seconds"]) == len(sigs["mix"]) / 8000
        # different speakers and different packages (Allison's English and Spanish voices are one speaker)
        assert r["spk1"] != r["spk2"] and r["package1"] != r["package2"]
        assert {r["voice1"], r["voice2"]} != {"allison-en", "allison-es"}
        assert 0.0 <= float(r["gain_db"]) <= 5.0
        for k in ("utts1", "utts2"):
            assert "Noise.wav" not in r[k] and "/silence/" not in r[k]
    counts = Counter(r[k] for r in rows for k in ("voice1", "voice2"))
    assert max(counts.values()) - min(counts.values()) <= 2  # voices drawn in turn
    with open(tmp_path / "rs/metadata.csv", newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [r["id"] for r in rows]
    with open(tmp_path / "rs/sources.csv", newline="") as f:
        sources = {r["voice"]: r for r in csv.DictReader(f)}
    assert set(sources) == {"allison-en", "allison-es", "carlo-it", "armelle-fr", "alsa", "codec2-hts1",
                            "codec2-hts2", "pyannote-90", "pyannote-91"}
    assert sources["alsa"]["files"] == "3" and sources["allison-en"]["files"] == "3"  # not Noise.wav, not silence/
    assert (tmp_path / "rs/.gitignore").read_text().splitlines()[-1] == "*"


def test_same_seed_same_bytes_other_seed_other_set(fake_root, tmp_path):
    a = _build(fake_root, tmp_path / "a", seed=3)
    b = _build(fake_root, tmp_path / "b", seed=3)
    c = _build(fake_root, tmp_path / "c", seed=4)
    assert a == b
    for r in a:
        for name in ("mix", "s1", "s2"):
            rel = f"wav8k/min/tt/{name}/{r['id']}.wav"
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert [(r["id"], r["gain_db"]) for r in a] != [(r["id"], r["gain_db"]) for r in c]
    _build(fake_root, tmp_path / "a", seed=3, n_mix=2)  # a rebuild replaces the set, no stale files
    assert len(os.listdir(tmp_path / "a/wav8k/min/tt/mix")) == 2


def test_files_outside_the_reserved_list_are_refused(fake_root, tmp_path):
    root, wheels = fake_root
    alsa = VOICES["alsa"]
    ok = rse.Utterance(alsa, "usr/share/sounds/alsa/Front_Left.wav")
    x, rate = rse.read_utterance(ok, str(root))
    assert rate == 48000 and x.ndim == 1 and len(x) > 0
    outsider = tmp_path / "elsewhere/mine.wav"
    _wav(outsider, 1.0, 8000, 150, 0)
    for bad in (rse.Utterance(alsa, "usr/share/sounds/alsa/Noise.wav"),          # excluded from the voice
                rse.Utterance(alsa, os.path.relpath(outsider, root)),           # not under the reserved paths
                rse.Utterance(alsa, "usr/share/asterisk/sounds/it_IT_m_Carlo/prompt0.wav"),  # another voice's file
                rse.Utterance(rse.Voice("mine", "me", "my-package", "en", "audio", ("**/*.wav",), "me"), "x.wav"),
                rse.Utterance(VOICES["pyannote-90"], "other/member.wav", 0.0, 1.0, str(wheels / "x.whl"))):
        with pytest.raises(rse.ReservedSetError, match="reserved"):
            rse.read_utterance(bad, str(root))
    assert rse.is_reserved_path(root / "usr/share/codec2/raw/hts1.raw", root)
    assert not rse.is_reserved_path(root / "usr/share/sounds/alsa/Noise.wav", root)
    assert not rse.is_reserved_path(root / "usr/share/asterisk/sounds/en_US_f_Allison/silence/5.wav", root)
    # the set is a test split only: never built into a folder that holds training data
    (tmp_path / "train/wav8k/min/tr").mkdir(parents=True)
    with pytest.raises(rse.ReservedSetError, match="training"):
        _build(fake_root, tmp_path / "train")
    # a missing package is named, unless the voices may be left out
    with pytest.raises(rse.ReservedSetError, match="asterisk-core-sounds-ru-wav"):
        rse.collect_utterances(str(root), str(wheels), allow_missing=False)


def test_rttm_turns_keep_only_single_speaker_time():
    text = ("SPEAKER s 1 0.0 4.0 <NA> <NA> a <NA> <NA>\nSPEAKER s 1 1.0 0.5 <NA> <NA> b <NA> <NA>\n"
            "SPEAKER s 1 3.5 2.0 <NA> <NA> b <NA> <NA>\n")
    assert rse._read_rttm(text, "a") == [(0.0, 1.0), (1.5, 3.5)]
    assert rse._read_rttm(text, "b") == [(4.0, 5.5)]


class _Oracle:
    """A fake separator returning the references (optionally swapped and scaled)."""

    def __init__(self, folder, swap, label):
        self.folder, self.swap, self.label, self.rate = folder, swap, label, 8000
        self.mix_ids = iter(sorted(f[:-4] for f in os.listdir(Path(folder) / "wav8k/min/tt/mix")))

    def __call__(self, mix, seed):
        mid = next(self.mix_ids)
        refs = torch.stack([torch.from_numpy(sf.read(Path(self.folder) / f"wav8k/min/tt/{s}/{mid}.wav",
                                                     dtype="float32")[0]) for s in ("s1", "s2")])
        return 0.5 * (refs.flip(0) if self.swap else refs)


def test_tables_on_fake_estimates_and_one_bundled_model(fake_root, tmp_path):
    folder = tmp_path / "rs"
    _build(fake_root, folder, n_mix=3)
    seps = [rse.Separator("mixture"), _Oracle(folder, False, "oracle"), _Oracle(folder, True, "oracle swapped")]
    report = rse.evaluate(seps, [("fake", str(folder))], progress=False)
    res = {r["model"]: r for r in report["results"]}
    assert abs(res["mixture (unprocessed)"]["si_sdri"]) < 1e-6
    assert res["oracle"]["si_sdri"] > 50 and res["oracle swapped"]["si_sdri"] == pytest.approx(res["oracle"]["si_sdri"])
    assert res["oracle"]["estoi"] > 0.99 and set(res["oracle"]["by_language"]) <= {"en", "es", "fr", "it"}
    md = rse.write_report(report, str(tmp_path / "out"), "python benchmarks/real_speech_eval.py --data fake")
    assert "| oracle swapped | fake | 3 |" in md and "model x data set" in md
    saved = json.loads((tmp_path / "out/real_speech_eval.json").read_text())
    assert len(saved["mixtures"]["oracle | fake"]) == 3

    # the command-line path end to end with a bundled model folder, one mixture
    assert rse.main(["--data", f"fake={folder}", "--model", str(ROOT / "pretrained/diffsep-small-minimix"),
                     "--n", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "cli")]) == 0
    saved = json.loads((tmp_path / "cli/real_speech_eval.json").read_text())
    (model_row,) = [r for r in saved["results"] if r["model"].endswith("diffsep-small-minimix")]
    assert model_row["n"] == 1 and -30 < model_row["si_sdri"] < 100
    assert str(tmp_path) not in (tmp_path / "cli/real_speech_eval.md").read_text()  # no absolute paths
    merged = rse.merge_reports([str(tmp_path / "out"), str(tmp_path / "cli")], str(tmp_path / "merged"))
    assert merged.count("| mixture (unprocessed) | fake | 3 |") == 1 and "| oracle | fake | 3 |" in merged
    assert model_row["model"] in merged and "| mixture (unprocessed) | fake | 1 |" not in merged  # first run wins
