"""Tests for recipes/MiniMix/generate_minimix.py: layout, mixing, splits, determinism, prep."""

import csv
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from speechbrain_diffsep.dataprep import read_csv

from helpers import HAVE_TOOLS, load_script, needs_tools

COUNTS = {"tr": 4, "cv": 2, "tt": 2}


mm = load_script("recipes/MiniMix/generate_minimix.py")
wsj = load_script("recipes/WSJ0Mix/separation/prepare_wsj0mix.py")


def _generate(out, seed=0, cache=None, jobs=2):
    return mm.generate_minimix(
        str(out), COUNTS["tr"], COUNTS["cv"], COUNTS["tt"], seed=seed, max_seconds=1.0, cache_dir=cache,
        progress=False, jobs=jobs,
    )


@pytest.fixture(scope="module")
def minimix(tmp_path_factory):
    if not HAVE_TOOLS:
        pytest.skip("flite / espeak-ng not installed (apt-get install flite espeak-ng)")
    out = tmp_path_factory.mktemp("minimix")
    plans = _generate(out)
    return out, plans


def _metadata(out, split):
    with open(out / "metadata" / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


@needs_tools
def test_layout_rate_and_lengths(minimix):
    out, plans = minimix
    root = out / "wav8k" / "min"
    assert sorted(p.name for p in root.iterdir()) == ["cv", "tr", "tt"]
    for split, count in COUNTS.items():
        assert sorted(p.name for p in (root / split).iterdir()) == ["mix", "s1", "s2"]
        names = [sorted(p.name for p in (root / split / f).iterdir()) for f in ("mix", "s1", "s2")]
        assert names[0] == names[1] == names[2]
        assert names[0] == sorted(f"{m['id']}.wav" for m in plans[split])
        assert len(names[0]) == count
        for name in names[0]:
            infos = [sf.info(str(root / split / f / name)) for f in ("mix", "s1", "s2")]
            assert {i.samplerate for i in infos} == {8000}
            assert {i.channels for i in infos} == {1}
            assert {i.subtype for i in infos} == {"PCM_16"}
            assert len({i.frames for i in infos}) == 1
            assert 4000 <= infos[0].frames <= 8000  # cropped to max_seconds=1 (speech lasts > 0.5 s)


@needs_tools
def test_mixture_is_sum_of_sources_with_wsj0_gains(minimix):
    out, _ = minimix
    root = out / "wav8k" / "min"
    for split in COUNTS:
        for m in _metadata(out, split):
            mix, s1, s2 = (sf.read(str(root / split / f / f"{m['id']}.wav"))[0] for f in ("mix", "s1", "s2"))
            np.testing.assert_array_equal(mix, s1 + s2)
            assert 0.5 < np.abs(mix).max() <= 0.9 + 1e-4  # common scaling to a 0.9 peak
            gain = float(m["gain_db"])
            assert 0.0 <= gain <= 5.0
            measured = 20 * np.log10(mm.active_rms(s1, 8000) / mm.active_rms(s2, 8000))
            # 16-bit rounding can move a frame across the activity threshold: a few hundredths of a dB
            assert measured == pytest.approx(gain, abs=0.1)
            assert m["spk1"] != m["spk2"] and m["spk1"] in mm.SPEAKERS and m["spk2"] in mm.SPEAKERS
            assert m["text1"] != m["text2"]


@needs_tools
def test_sources_are_speech_not_silence(minimix):
    out, _ = minimix
    m = _metadata(out, "tt")[0]
    s1, _ = sf.read(str(out / "wav8k/min/tt/s1" / f"{m['id']}.wav"))
    frames = s1[: len(s1) // 80 * 80].reshape(-1, 80)
    energy_db = 10 * np.log10((frames**2).mean(1) + 1e-12)
    # speech: loud voiced frames and much quieter gaps -> wide dynamic range
    assert energy_db.max() - np.percentile(energy_db, 10) > 15
    spectrum = np.abs(np.fft.rfft(s1)) ** 2
    freqs = np.fft.rfftfreq(len(s1), 1 / 8000)
    assert spectrum[freqs < 1000].sum() > spectrum[freqs > 3000].sum()  # speech energy is low-frequency


@needs_tools
def test_splits_use_disjoint_sentences_and_nouns(minimix):
    out, _ = minimix
    sentences = {split: {t for m in _metadata(out, split) for t in (m["text1"], m["text2"])} for split in COUNTS}
    assert not sentences["tr"] & sentences["cv"]
    assert not sentences["tr"] & sentences["tt"]
    assert not sentences["cv"] & sentences["tt"]
    all_nouns = {n for pool in mm.NOUNS.values() for n in pool}
    for split, texts in sentences.items():
        for text in texts:
            words = set(re.findall(r"[a-z]+", text.lower()))
            assert words & all_nouns <= set(mm.NOUNS[split]), (split, text)
            assert words & set(mm.NOUNS[split])


def test_noun_pools_are_disjoint():
    pools = [set(p) for p in mm.NOUNS.values()]
    assert sum(len(p) for p in pools) == len(set.union(*pools))


@needs_tools
def test_deterministic_for_a_seed(minimix, tmp_path):
    out, _ = minimix
    again = tmp_path / "again"
    # re-synthesizes everything, in one thread instead of the fixture's two
    _generate(again, cache=str(tmp_path / "fresh_cache"), jobs=1)
    files = sorted(p.relative_to(out) for p in (out / "wav8k").rglob("*.wav"))
    assert files == sorted(p.relative_to(again) for p in (again / "wav8k").rglob("*.wav"))
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (out / "metadata/tr.csv").read_text() == (again / "metadata/tr.csv").read_text()

    other = tmp_path / "other"
    _generate(other, seed=1, cache=str(out / ".synth_cache"))
    assert _metadata(other, "tr") != _metadata(out, "tr")


@needs_tools
def test_prepare_wsj0mix_accepts_minimix(minimix, tmp_path):
    out, _ = minimix
    wsj.prepare_wsj0mix(str(out), str(tmp_path / "csv"))
    for split, folder in (("train", "tr"), ("valid", "cv"), ("test", "tt")):
        rows = read_csv(tmp_path / "csv" / f"{split}.csv")
        assert [r["ID"] for r in rows] == sorted(m["id"] for m in _metadata(out, folder))
        for r in rows:
            assert 0.5 <= float(r["duration"]) <= 1.0
            assert float(r["duration"]) == pytest.approx(sf.info(r["s2_wav"]).frames / 8000)


def test_missing_tools_message(monkeypatch, tmp_path, capsys):
    real_which = shutil.which
    monkeypatch.setattr(mm.shutil, "which", lambda tool: None if tool == "espeak-ng" else real_which(tool))
    with pytest.raises(mm.MiniMixError) as err:
        mm.generate_minimix(str(tmp_path), 1, 1, 1)
    assert str(err.value) == "espeak-ng not found; MiniMix needs flite and espeak-ng: apt-get install flite espeak-ng"
    assert mm.main(["--out", str(tmp_path), "--n-train", "1"]) == 1
    assert capsys.readouterr().err.strip().endswith("apt-get install flite espeak-ng")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 0}, "number of tr mixtures must be a positive int"),
        ({"max_seconds": -1.0}, "max_seconds must be positive"),
        ({"sample_rate": 44100}, "sample_rate must be 8000 or 16000"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mm.generate_minimix(str(tmp_path), **{"n_train": 1, "n_valid": 1, "n_test": 1, **kwargs})


def test_mix_pair_min_mode_and_exact_sum():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(1000).astype(np.float32)
    x2 = 3 * rng.standard_normal(700).astype(np.float32)
    mix, s1, s2 = mm.mix_pair(x1, x2, 4.0, 8000)
    assert len(mix) == len(s1) == len(s2) == 700  # truncated to the shorter one
    assert mix.dtype == np.int16
    np.testing.assert_array_equal(mix.astype(np.int32), s1.astype(np.int32) + s2.astype(np.int32))
    assert 20 * np.log10(mm.active_rms(s1.astype(float), 8000) / mm.active_rms(s2.astype(float), 8000)) == pytest.approx(
        4.0, abs=0.01
    )
    assert len(mm.mix_pair(x1, x2, 0.0, 8000, max_samples=300)[0]) == 300
