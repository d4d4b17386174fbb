"""Tests for the data preparation: layouts of wsj0-mix, LibriMix, VoiceBank-DEMAND on tiny fixtures."""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from speechbrain_diffsep.dataprep import DataLayoutError, read_csv, require_dirs, write_csv

from helpers import load_script


wsj = load_script("recipes/WSJ0Mix/separation/prepare_wsj0mix.py")
libri = load_script("recipes/LibriMix/separation/prepare_librimix.py")
vb = load_script("recipes/Voicebank/enhance/prepare_voicebank.py")


def _wav(path, n, rate, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    sf.write(path, x, rate, subtype="PCM_16")


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- wsj0-mix
WSJ_COUNTS = {"tr": 3, "cv": 2, "tt": 2}


def make_wsj0mix(root, n_spks=2, rate=8000, version="min", counts=WSJ_COUNTS):
    """Tiny wsj0-mix tree; utterance i of a split lasts (i + 1) * 100 samples."""
    for split, count in counts.items():
        for i in range(count):
            name = f"{split}_utt{i}_x_{i}.wav"
            for folder in ["mix"] + [f"s{k}" for k in range(1, n_spks + 1)]:
                _wav(root / f"wav{rate // 1000}k" / version / split / folder / name, (i + 1) * 100, rate, i)
    return root


@pytest.mark.parametrize("n_spks", [2, 3])
def test_wsj0mix_csvs(tmp_path, n_spks):
    data = make_wsj0mix(tmp_path / "wsj", n_spks=n_spks)
    save = tmp_path / "save"
    wsj.prepare_wsj0mix(str(data), str(save), n_spks=n_spks)
    expected_cols = ["ID", "duration", "mix_wav"] + [f"s{k}_wav" for k in range(1, n_spks + 1)]
    for split, folder in (("train", "tr"), ("valid", "cv"), ("test", "tt")):
        rows = read_csv(save / f"{split}.csv")
        assert list(rows[0]) == expected_cols
        assert [r["ID"] for r in rows] == [f"{folder}_utt{i}_x_{i}" for i in range(WSJ_COUNTS[folder])]
        assert [float(r["duration"]) for r in rows] == pytest.approx([(i + 1) * 100 / 8000 for i in range(len(rows))])
        for r in rows:
            for col in expected_cols[2:]:
                assert os.path.isabs(r[col]) and os.path.isfile(r[col])
            assert r["s1_wav"] == str(data / "wav8k" / "min" / folder / "s1" / f"{r['ID']}.wav")


def test_wsj0mix_16k_max_and_nested_speakers_folder(tmp_path):
    make_wsj0mix(tmp_path / "wsj" / "2speakers", rate=16000, version="max")
    wsj.prepare_wsj0mix(str(tmp_path / "wsj"), str(tmp_path / "save"), sample_rate=16000, version="max")
    rows = read_csv(tmp_path / "save" / "test.csv")
    assert "/2speakers/wav16k/max/tt/mix/" in rows[0]["mix_wav"]
    assert float(rows[1]["duration"]) == pytest.approx(200 / 16000)


def test_wsj0mix_missing_source_folder(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    shutil.rmtree(data / "wav8k/min/tt/s2")
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(data), str(tmp_path / "save"))
    assert _one_line(err) == (
        f"wsj0-mix: missing folder {data}/wav8k/min/tt/s2 (expected {{mix,s1,s2}} under {data}/wav8k/min/tt); "
        "set --data_folder to the folder that contains wav8k/"
    )


@pytest.mark.parametrize(
    "src, dst, missing, found",
    [
        ("wav8k/min/tt/s2", "wav8k/min/tt/S2", "wav8k/min/tt/s2", "'S2'"),
        ("wav8k/min/cv", "wav8k/min/cv_", "wav8k/min/cv", "'cv_'"),
        ("wav8k", "wav8K", "wav8k", "'wav8K'"),
    ],
)
def test_wsj0mix_misnamed_folder(tmp_path, src, dst, missing, found):
    data = make_wsj0mix(tmp_path / "wsj")
    os.rename(data / src, data / dst)
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(data), str(tmp_path / "save"))
    msg = _one_line(err)
    assert msg.startswith(f"wsj0-mix: missing folder {data}/{missing} (expected ")
    assert f"found {found} instead, misnamed?" in msg
    assert msg.endswith("set --data_folder to the folder that contains wav8k/")


def test_wsj0mix_points_at_wrong_level(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(data / "wav8k"), str(tmp_path / "save"))
    assert _one_line(err).startswith(f"wsj0-mix: missing folder {data}/wav8k/wav8k (expected wav8k under {data}/wav8k")


def test_wsj0mix_mismatched_file_names(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    tt = data / "wav8k/min/tt"
    os.remove(tt / "s2" / "tt_utt1_x_1.wav")
    _wav(tt / "s2" / "tt_extra.wav", 100, 8000)
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(data), str(tmp_path / "save"))
    assert _one_line(err) == (
        f"wsj0-mix: file names differ between {tt}/mix and {tt}/s2: 1 file(s) of mix missing in s2 "
        "(e.g. 'tt_utt1_x_1.wav'); 1 file(s) of s2 missing in mix (e.g. 'tt_extra.wav'); "
        "every mix file needs a same-named file in each source folder"
    )


def test_wsj0mix_missing_data_folder(tmp_path):
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(tmp_path / "nope"), str(tmp_path / "save"))
    assert _one_line(err) == (
        f"wsj0-mix: data folder {tmp_path}/nope does not exist; set --data_folder to the folder that contains wav8k/"
    )
    assert isinstance(err.value, FileNotFoundError)


def test_wsj0mix_empty_folder_and_wrong_rate(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    for f in (data / "wav8k/min/cv/s1").iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match=r"no \.wav files in .*/wav8k/min/cv/s1"):
        wsj.prepare_wsj0mix(str(data), str(tmp_path / "save"))

    data = make_wsj0mix(tmp_path / "wsj2")
    _wav(data / "wav8k/min/tr/mix/tr_utt0_x_0.wav", 100, 16000)
    with pytest.raises(DataLayoutError) as err:
        wsj.prepare_wsj0mix(str(data), str(tmp_path / "save2"))
    assert "tr_utt0_x_0.wav is sampled at 16000 Hz, expected 8000 Hz" in _one_line(err)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_spks": 4}, "n_spks must be 2 or 3"), ({"sample_rate": 44100}, "sample_rate must be"), ({"version": "mid"}, "version")],
)
def test_wsj0mix_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        wsj.prepare_wsj0mix(str(tmp_path), str(tmp_path / "save"), **kwargs)


def test_wsj0mix_skip_conventions(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    save = tmp_path / "save"
    # skip_prep: nothing written, no error even without data
    wsj.prepare_wsj0mix(str(tmp_path / "missing"), str(save), skip_prep=True)
    assert not save.exists()
    wsj.prepare_wsj0mix(str(data), str(save))
    marker = "ID,duration,mix_wav,s1_wav,s2_wav\nkept,1.0,a,b,c\n"
    (save / "test.csv").write_text(marker)
    wsj.prepare_wsj0mix(str(data), str(save))  # same options: CSVs are up to date, not rewritten
    assert (save / "test.csv").read_text() == marker
    wsj.prepare_wsj0mix(str(data), str(save), skip_prep=True)
    assert (save / "test.csv").read_text() == marker
    shutil.rmtree(data / "wav8k/min/tt/s2")  # changed data is not even looked at with skip_prep
    wsj.prepare_wsj0mix(str(data), str(save), skip_prep=True)
    make_wsj0mix(data, n_spks=3)
    wsj.prepare_wsj0mix(str(data), str(save), n_spks=3)  # other options: rewritten
    assert list(read_csv(save / "test.csv")[0]) == ["ID", "duration", "mix_wav", "s1_wav", "s2_wav", "s3_wav"]


# --------------------------------------------------------------------------- LibriMix
LIBRI_COUNTS = {"train-100": 2, "train-360": 3, "dev": 2, "test": 1}


def make_librimix(root, parts=LIBRI_COUNTS, folders=("mix_clean", "mix_both", "s1", "s2", "noise")):
    for part, count in parts.items():
        for i in range(count):
            for folder in folders:
                _wav(root / "Libri2Mix/wav8k/min" / part / folder / f"{part}-{i}_{i}.wav", 80 * (i + 1), 8000, i)
    return root


def test_librimix_clean_two_train_splits(tmp_path):
    data = make_librimix(tmp_path / "libri")
    save = tmp_path / "save"
    libri.prepare_librimix(str(data), str(save), train_splits=("train-100", "train-360"))
    train = read_csv(save / "train.csv")
    assert list(train[0]) == ["ID", "duration", "mix_wav", "s1_wav", "s2_wav"]
    assert [r["ID"] for r in train] == ["train-100-0_0", "train-100-1_1", "train-360-0_0", "train-360-1_1", "train-360-2_2"]
    assert "/Libri2Mix/wav8k/min/train-360/mix_clean/" in train[-1]["mix_wav"]
    assert float(train[-1]["duration"]) == pytest.approx(240 / 8000)
    assert [r["ID"] for r in read_csv(save / "valid.csv")] == ["dev-0_0", "dev-1_1"]
    assert [r["ID"] for r in read_csv(save / "test.csv")] == ["test-0_0"]


def test_librimix_noisy_mixtures_and_folder_itself(tmp_path):
    data = make_librimix(tmp_path / "libri")
    libri.prepare_librimix(str(data / "Libri2Mix"), str(tmp_path / "save"), mixture="both")
    test = read_csv(tmp_path / "save" / "test.csv")
    assert list(test[0]) == ["ID", "duration", "mix_wav", "s1_wav", "s2_wav", "noise_wav"]
    assert test[0]["mix_wav"].endswith("/test/mix_both/test-0_0.wav")
    assert test[0]["noise_wav"].endswith("/test/noise/test-0_0.wav")
    assert len(read_csv(tmp_path / "save" / "train.csv")) == 3  # default: train-360


def test_librimix_only_needed_folders_are_checked(tmp_path):
    data = make_librimix(tmp_path / "libri", parts={"train-100": 1, "dev": 1, "test": 1}, folders=("mix_clean", "s1", "s2"))
    libri.prepare_librimix(str(data), str(tmp_path / "save"), train_splits="train-100")
    with pytest.raises(DataLayoutError) as err:
        libri.prepare_librimix(str(data), str(tmp_path / "save2"), train_splits=["train-360"])
    version_dir = data / "Libri2Mix/wav8k/min"
    assert _one_line(err) == (
        f"LibriMix: missing folder {version_dir}/train-360 (expected {{train-360,dev,test}} under {version_dir}); "
        "set --data_folder to the folder that contains Libri2Mix/"
    )
    with pytest.raises(DataLayoutError) as err:
        libri.prepare_librimix(str(data), str(tmp_path / "save3"), train_splits="train-100", mixture="both")
    assert _one_line(err).startswith(f"LibriMix: missing folder {version_dir}/train-100/mix_both (expected {{mix_both,s1,s2,noise}}")


def test_librimix_missing_libri_folder_and_bad_args(tmp_path):
    (tmp_path / "libri" / "libri2mix").mkdir(parents=True)
    with pytest.raises(DataLayoutError) as err:
        libri.prepare_librimix(str(tmp_path / "libri"), str(tmp_path / "save"))
    assert "missing folder" in _one_line(err) and "found 'libri2mix' instead, misnamed?" in _one_line(err)
    with pytest.raises(ValueError, match="train_splits must be a non-empty subset"):
        libri.prepare_librimix(str(tmp_path), str(tmp_path / "save"), train_splits=["train-500"])
    with pytest.raises(ValueError, match="mixture must be 'clean' or 'both'"):
        libri.prepare_librimix(str(tmp_path), str(tmp_path / "save"), mixture="noisy")


def test_librimix_mismatch(tmp_path):
    data = make_librimix(tmp_path / "libri")
    os.remove(data / "Libri2Mix/wav8k/min/dev/s1/dev-1_1.wav")
    with pytest.raises(DataLayoutError) as err:
        libri.prepare_librimix(str(data), str(tmp_path / "save"))
    assert "1 file(s) of mix_clean missing in s1 (e.g. 'dev-1_1.wav')" in _one_line(err)


# --------------------------------------------------------------------------- VoiceBank-DEMAND
VB_TRAIN = {"p226": 2, "p227": 2, "p287": 1}
VB_TEST = {"p232": 2}


def make_voicebank(root):
    """48 kHz tiny VoiceBank; clean files hold a 1 kHz sine of amplitude 0.5 (n = 480 * (i + 2))."""
    for folder_kind, speakers in (("trainset_28spk", VB_TRAIN), ("testset", VB_TEST)):
        for spk, count in speakers.items():
            for i in range(count):
                n = 480 * (i + 2)
                name = f"{spk}_{i + 1:03d}.wav"
                t = np.arange(n) / 48000
                (root / f"clean_{folder_kind}_wav").mkdir(parents=True, exist_ok=True)
                sine = 0.5 * np.sin(2 * np.pi * 1000 * t)
                sf.write(root / f"clean_{folder_kind}_wav" / name, sine, 48000, subtype="PCM_16")
                _wav(root / f"noisy_{folder_kind}_wav" / name, n, 48000, i)
    return root


def test_voicebank_resample_and_speaker_split(tmp_path):
    data = make_voicebank(tmp_path / "vb")
    save = tmp_path / "save"
    vb.prepare_voicebank(str(data), str(save))
    train, valid, test = (read_csv(save / f"{s}.csv") for s in ("train", "valid", "test"))
    assert list(train[0]) == ["ID", "duration", "noisy_wav", "clean_wav"]
    assert [r["ID"] for r in train] == ["p227_001", "p227_002"]
    assert [r["ID"] for r in valid] == ["p226_001", "p226_002", "p287_001"]
    assert [r["ID"] for r in test] == ["p232_001", "p232_002"]
    assert [float(r["duration"]) for r in test] == pytest.approx([0.02, 0.03])
    row = train[1]
    assert row["clean_wav"] == str(save / "wav16k/clean_trainset_28spk_wav/p227_002.wav")
    assert row["noisy_wav"] == str(save / "wav16k/noisy_trainset_28spk_wav/p227_002.wav")
    clean, rate = sf.read(row["clean_wav"])
    assert rate == 16000 and len(clean) == 480
    # the 1 kHz sine survives resampling (compare away from the edges)
    t = np.arange(480) / 16000
    np.testing.assert_allclose(clean[64:-64], 0.5 * np.sin(2 * np.pi * 1000 * t)[64:-64], atol=2e-3)


def test_voicebank_resamples_once(tmp_path):
    data = make_voicebank(tmp_path / "vb")
    save = tmp_path / "save"
    vb.prepare_voicebank(str(data), str(save))
    out = save / "wav16k/noisy_testset_wav/p232_001.wav"
    os.utime(out, (1, 1))
    (save / "test.csv").unlink()
    vb.prepare_voicebank(str(data), str(save))
    assert out.stat().st_mtime == 1  # the resampled file was reused
    assert len(read_csv(save / "test.csv")) == 2


def test_voicebank_48k_keeps_original_files(tmp_path):
    data = make_voicebank(tmp_path / "vb")
    vb.prepare_voicebank(str(data), str(tmp_path / "save"), sample_rate=48000, valid_speakers=["p287"])
    train = read_csv(tmp_path / "save" / "train.csv")
    assert train[0]["clean_wav"] == str(data / "clean_trainset_28spk_wav" / "p226_001.wav")
    assert not (tmp_path / "save" / "wav48k").exists()


def test_voicebank_layout_errors(tmp_path):
    data = make_voicebank(tmp_path / "vb")
    os.rename(data / "noisy_testset_wav", data / "noisy_test_wav")
    with pytest.raises(DataLayoutError) as err:
        vb.prepare_voicebank(str(data), str(tmp_path / "save"))
    msg = _one_line(err)
    assert msg.startswith(f"VoiceBank-DEMAND: missing folder {data}/noisy_testset_wav (expected ")
    assert "found 'noisy_test_wav' instead, misnamed?" in msg
    assert msg.endswith("set --data_folder to the folder that contains clean_trainset_28spk_wav/")

    os.rename(data / "noisy_test_wav", data / "noisy_testset_wav")
    os.remove(data / "clean_testset_wav" / "p232_002.wav")
    with pytest.raises(DataLayoutError) as err:
        vb.prepare_voicebank(str(data), str(tmp_path / "save"))
    assert "1 file(s) of noisy missing in clean (e.g. 'p232_002.wav')" in _one_line(err)


def test_voicebank_bad_valid_speakers(tmp_path):
    data = make_voicebank(tmp_path / "vb")
    with pytest.raises(ValueError, match=r"valid_speakers \['p999'\] are not training speakers"):
        vb.prepare_voicebank(str(data), str(tmp_path / "save"), valid_speakers=["p999"])
    with pytest.raises(ValueError, match="would leave no training speaker"):
        vb.prepare_voicebank(str(data), str(tmp_path / "save"), valid_speakers=["p226", "p227", "p287"])


# --------------------------------------------------------------------------- helpers
def test_write_csv_checks(tmp_path):
    with pytest.raises(ValueError, match="duplicate ID 'a'"):
        write_csv(tmp_path / "x.csv", [{"ID": "a", "duration": 1}, {"ID": "a", "duration": 2}], ["ID", "duration"])
    with pytest.raises(ValueError, match="must start with"):
        write_csv(tmp_path / "x.csv", [], ["duration", "ID"])
    write_csv(tmp_path / "x.csv", [{"ID": "a", "duration": 1 / 3, "p": "/x"}], ["ID", "duration", "p"])
    assert (tmp_path / "x.csv").read_text() == "ID,duration,p\na,0.333333,/x\n"
    assert not (tmp_path / "x.csv.tmp").exists()


def test_require_dirs_no_lookalike(tmp_path):
    (tmp_path / "mix").mkdir()
    (tmp_path / "zzzz").mkdir()
    with pytest.raises(DataLayoutError) as err:
        require_dirs(str(tmp_path), ["mix", "s1"], "demo", "fix")
    assert _one_line(err) == f"demo: missing folder {tmp_path}/s1 (expected {{mix,s1}} under {tmp_path}); fix"


@pytest.mark.parametrize("module, hint", [(wsj, "wav8k/"), (libri, "Libri2Mix/"), (vb, "clean_trainset_28spk_wav/")])
def test_command_line_prints_one_line_error(tmp_path, capsys, module, hint):
    assert module.main([str(tmp_path / "nope"), str(tmp_path / "save")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.rstrip().endswith(f"contains {hint}")


def test_command_line_writes_csvs(tmp_path):
    data = make_wsj0mix(tmp_path / "wsj")
    assert wsj.main([str(data), str(tmp_path / "save"), "--n_spks", "2"]) == 0
    assert len(read_csv(tmp_path / "save" / "train.csv")) == WSJ_COUNTS["tr"]
