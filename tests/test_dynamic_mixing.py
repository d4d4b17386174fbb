"""speechbrain_diffsep.dynamic_mixing on tiny synthetic pools (sines / noise written to tmp_path)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

from speechbrain_diffsep.dynamic_mixing import (
    DynamicMixDataset,
    dynamic_mixing_from_hparams,
    load_source_pool,
    pool_from_mixture_csv,
)

ROOT = Path(__file__).resolve().parents[1]
SR = 8000


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def make_pool(tmp_path, speakers=("a", "b", "c", "d"), per_speaker=2, seconds=0.6, sr=SR, ext="wav", relative=True):
    """Each utterance a sine at a frequency unique to (speaker, utterance) plus a little noise."""
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    rows = []
    for s, spk in enumerate(speakers):
        for u in range(per_speaker):
            n = int(seconds * sr * (1 + 0.3 * u))
            t = np.arange(n) / sr
            x = 0.3 * np.sin(2 * np.pi * (200 + 100 * s + 17 * u) * t) + 0.01 * rng.standard_normal(n)
            name = f"{spk}_{u}.{ext}"
            sf.write(audio / name, x.astype(np.float32), sr, subtype="FLOAT" if ext == "wav" else "PCM_24")
            rows.append({"id": f"{spk}_{u}", "path": f"audio/{name}" if relative else str(audio / name),
                         "speaker": spk, "duration": n / sr})
    return _write_csv(tmp_path / "pool.csv", rows)


def dataset(pool_csv, **kw):
    opts = dict(num_spks=2, sample_rate=SR, segment_seconds=0.5, num_examples=6, seed=1, rank=0, level_db=None)
    opts.update(kw)
    return DynamicMixDataset(load_source_pool(pool_csv), **opts)


def rms_db(x):
    x = x[x != 0]
    return 20 * math.log10(float(torch.sqrt(torch.mean(x.double() ** 2))))


# --------------------------------------------------------------------------- examples
@pytest.mark.parametrize("k", [2, 3])
def test_mixture_is_exactly_the_sum_of_k_distinct_speakers(tmp_path, k):
    ds = dataset(make_pool(tmp_path), num_spks=k, peak_normalize=0.9, offset_prob=0.5, max_offset_seconds=0.2)
    for i in range(len(ds)):
        ex = ds.example(i)
        src = torch.stack([ex[f"s{j}_sig"] for j in range(1, k + 1)])
        assert torch.equal(ex["mix_sig"], src.sum(0))
        assert ex["mix_sig"].shape == (int(0.5 * SR),) and ex["mix_sig"].dtype == torch.float32
        assert len(set(ex["speakers"])) == k
        assert max(float(src.abs().max()), float(ex["mix_sig"].abs().max())) == pytest.approx(0.9, rel=1e-5)


def test_same_key_same_draw_new_draw_per_epoch_and_rank(tmp_path):
    pool = make_pool(tmp_path)
    a, b, c = dataset(pool), dataset(pool), dataset(pool, rank=1)
    first = [a[i] for i in range(len(a))]
    again = [b[i] for i in range(len(b))]
    for x, y in zip(first, again):
        assert all(torch.equal(x[key], y[key]) for key in ("mix_sig", "s1_sig", "s2_sig"))
    other_rank = [c[i] for i in range(len(c))]
    a.set_epoch(1)
    next_epoch = [a[i] for i in range(len(a))]
    for other in (other_rank, next_epoch):
        assert sum(not torch.equal(x["mix_sig"], y["mix_sig"]) for x, y in zip(first, other)) == len(first)
    # back to epoch 0: the same draws again (as when resuming)
    a.set_epoch(0)
    assert torch.equal(a[3]["mix_sig"], first[3]["mix_sig"])


def test_gain_range_respected_and_measured(tmp_path):
    ds = dataset(make_pool(tmp_path, seconds=1.0), gain_db=[2.0, 6.0], num_examples=12)
    ratios = []
    for i in range(len(ds)):
        ex = ds.example(i)
        ratios.append(rms_db(ex["s1_sig"]) - rms_db(ex["s2_sig"]))
    assert all(2.0 - 1e-3 <= r <= 6.0 + 1e-3 for r in ratios)
    assert max(ratios) - min(ratios) > 1.0  # really drawn, not constant


def test_three_speakers_each_below_source_one(tmp_path):
    ds = dataset(make_pool(tmp_path, seconds=1.0), num_spks=3, gain_db=[1.0, 4.0], level_db=[-25.0, -25.0])
    for i in range(len(ds)):
        ex = ds.example(i)
        levels = [rms_db(ex[f"s{k}_sig"]) for k in (1, 2, 3)]
        assert all(1.0 - 1e-3 <= levels[0] - lv <= 4.0 + 1e-3 for lv in levels[1:])
        assert np.mean(levels) == pytest.approx(-25.0, abs=1e-3)


def test_short_utterances_are_padded_at_a_random_offset(tmp_path):
    ds = dataset(make_pool(tmp_path, seconds=0.2, per_speaker=1), segment_seconds=0.5, num_examples=8)
    starts = set()
    for i in range(len(ds)):
        s1 = ds.example(i)["s1_sig"]
        nz = torch.nonzero(s1).flatten()
        assert 1500 <= nz.numel() <= 1700 and int(nz[-1] - nz[0]) + 1 <= 1700  # 0.2 s of 0.5 s
        starts.add(int(nz[0]))
    assert len(starts) > 1


def test_offsets_silence_a_start_or_an_end(tmp_path):
    ds = dataset(make_pool(tmp_path, seconds=1.0), offset_prob=1.0, max_offset_seconds=0.2, num_examples=10)
    zeros = [int((ds.example(i)[f"s{k}_sig"] == 0).sum()) for i in range(len(ds)) for k in (1, 2)]
    assert max(zeros) > 100 and all(z <= 0.2 * SR + 1 for z in zeros)


def test_pool_at_twice_the_rate_and_flac_is_resampled(tmp_path):
    pool = make_pool(tmp_path, sr=2 * SR, ext="flac")
    ds = dataset(pool)
    ex = ds.example(0)
    assert ex["s1_sig"].shape == (int(0.5 * SR),)
    # the sine of speaker s at 200 + 100 s (+17 u) Hz survives the resampling
    spec = np.abs(np.fft.rfft(ex["s1_sig"].numpy()))
    peak = np.fft.rfftfreq(ex["s1_sig"].shape[0], 1 / SR)[np.argmax(spec)]
    assert any(abs(peak - (200 + 100 * s + 17 * u)) < 5 for s in range(4) for u in range(2))


def test_augmentation_is_applied_to_each_source_and_the_sum_still_holds(tmp_path):
    pool = make_pool(tmp_path, seconds=1.0)
    plain = dataset(pool)
    aug = dataset(pool, augment={"speed_prob": 1.0, "speed_range": [1.3, 1.3], "noise_prob": 1.0, "noise_snr_db": [10, 10]})
    assert aug.augment is not None and dataset(pool, augment={"enabled": False}).augment is None
    ex, ref = aug.example(0), plain.example(0)
    assert torch.equal(ex["mix_sig"], ex["s1_sig"] + ex["s2_sig"])
    assert ex["mix_sig"].shape == ref["mix_sig"].shape
    assert not torch.allclose(ex["s1_sig"], ref["s1_sig"])


def test_speechbrain_dataloader_gives_the_recipe_batch(tmp_path):
    ds = dataset(make_pool(tmp_path))
    loader = sb.dataio.dataloader.make_dataloader(ds, batch_size=3, shuffle=True)
    batch = next(iter(loader))
    mix, _ = batch.mix_sig
    assert mix.shape == (3, int(0.5 * SR))
    assert torch.equal(mix, batch.s1_sig.data + batch.s2_sig.data)
    assert all(i.startswith("dm") for i in batch.id)


def test_distinct_groups_and_manyvoices_layout(tmp_path):
    """ManyVoices: <out>/pool/train.csv, paths relative to <out>, a group column."""
    out = tmp_path / "mv"
    (out / "pool").mkdir(parents=True)
    make_pool(out, speakers=("a1", "a2", "b1", "b2", "c1"))
    rows = list(csv.DictReader(open(out / "pool.csv")))
    for row in rows:
        row["group"] = row["speaker"][0]
    pool_csv = _write_csv(out / "pool" / "train.csv", rows)
    pool = load_source_pool(pool_csv)
    assert pool.paths[0] == str(out / "audio" / "a1_0.wav")
    ds = DynamicMixDataset(pool, 3, SR, 0.25, 12, distinct="group", level_db=None)
    for i in range(len(ds)):
        assert len({spk[0] for spk in ds.example(i)["speakers"]}) == 3
    with pytest.raises(ValueError) as exc:
        DynamicMixDataset(pool, 4, SR, 0.25, 4, distinct="group")
    assert "has 3 group(s) (a, b, c) but dynamic mixing needs 4 distinct groups per mixture" in one_line(exc)
    with pytest.raises(ValueError, match="has no group column; set distinct: speaker"):
        dataset(make_pool(tmp_path), distinct="group")


def test_workers_give_the_same_batches_as_the_main_process(tmp_path):
    ds = dataset(make_pool(tmp_path), num_examples=4)
    ds.set_epoch(3)
    ref = torch.cat([b.mix_sig.data for b in sb.dataio.dataloader.make_dataloader(ds, batch_size=2)])
    par = torch.cat([b.mix_sig.data for b in sb.dataio.dataloader.make_dataloader(ds, batch_size=2, num_workers=2)])
    assert torch.equal(ref, par)


# --------------------------------------------------------------------------- pools from mixture CSVs
def _mixture_csv(tmp_path, ids, k=2, spk_cols=None):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    rows = []
    for i, mix_id in enumerate(ids):
        row = {"ID": mix_id, "duration": 0.6, "mix_wav": "unused"}
        for j in range(1, k + 1):
            p = src / f"{i}_s{j}.wav"
            sf.write(p, (0.1 * np.sin(np.arange(int(0.6 * SR)) * (0.1 + 0.05 * j + 0.01 * i))).astype(np.float32), SR)
            row[f"s{j}_wav"] = str(p)
            if spk_cols:
                row[f"s{j}_spk"] = spk_cols[i][j - 1]
        rows.append(row)
    return _write_csv(tmp_path / "train.csv", rows)


def test_wsj0_names_give_speakers_and_one_file_per_utterance(tmp_path):
    ids = ["01aa010b_0.97482_209a010p_-0.97482", "01aa010b_1.2_40na010x_-1.2", "22ga010c_0.5_209a010p_-0.5"]
    pool = pool_from_mixture_csv(_mixture_csv(tmp_path, ids), 2)
    assert pool.rule == "wsj0"
    assert sorted(pool.ids) == ["01aa010b", "209a010p", "22ga010c", "40na010x"]
    assert sorted(pool.speaker_list) == ["01a", "209", "22g", "40n"]


def test_librimix_and_minimix_names_and_speaker_columns(tmp_path):
    (tmp_path / "l").mkdir()
    libri = pool_from_mixture_csv(_mixture_csv(tmp_path / "l", ["103-1240-0003_1034-121119-0049", "19-198-0001_103-1241-0007"]), 2)
    assert libri.rule == "librimix" and libri.speaker_list == ["103", "1034", "19"]
    (tmp_path / "m").mkdir()
    mini = pool_from_mixture_csv(_mixture_csv(tmp_path / "m", ["tr00000_flite-awb_espeak-usm3", "tr00001_flite-slt_flite-awb"]), 2)
    assert mini.rule == "minimix" and mini.speaker_list == ["espeak-usm3", "flite-awb", "flite-slt"]
    assert len(mini) == 4  # no utterance IDs: one entry per file
    (tmp_path / "c").mkdir()
    col = pool_from_mixture_csv(_mixture_csv(tmp_path / "c", ["x", "y"], spk_cols=[["p", "q"], ["r", "p"]]), 2)
    assert col.rule == "column" and col.speaker_list == ["p", "q", "r"]
    with pytest.raises(ValueError, match=r"^mixture 'x' of .* does not follow speaker_rule 'wsj0'; set speaker_rule"):
        pool_from_mixture_csv(str(tmp_path / "c" / "train.csv"), 2, speaker_rule="wsj0")


def test_wsj0mix_prepared_csv_to_dynamic_mixing_via_the_yaml(tmp_path):
    ids = ["01aa010b_0.97482_209a010p_-0.97482", "22ga010c_1.2_40na010x_-1.2", "22ga010d_0.5_01aa010c_-0.5"]
    train_csv = _mixture_csv(tmp_path, ids)
    with open(ROOT / "recipes/WSJ0Mix/separation/hparams/diffsep_small_dm.yaml", encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out"),
                                  "train_data": train_csv, "segment_seconds": 0.25})
    ds = dynamic_mixing_from_hparams(hp, rank=0)
    assert isinstance(ds, DynamicMixDataset) and len(ds) == 3
    assert ds.pool.rule == "wsj0" and ds.seed == hp["seed"]
    ex = ds[0]
    assert torch.equal(ex["mix_sig"], ex["s1_sig"] + ex["s2_sig"])
    assert dynamic_mixing_from_hparams({"dynamic_mixing": {"enabled": False}}) is None
    assert dynamic_mixing_from_hparams({}) is None


# --------------------------------------------------------------------------- errors
def one_line(exc):
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_unknown_yaml_key_is_a_one_line_error(tmp_path):
    hp = {"dynamic_mixing": {"enabled": True, "gain_dbb": [0, 5]}, "num_spks": 2, "sample_rate": SR}
    with pytest.raises(ValueError) as exc:
        dynamic_mixing_from_hparams(hp)
    assert one_line(exc).startswith("unknown dynamic_mixing option 'gain_dbb'; known options: enabled, pool")


def test_fewer_speakers_than_k_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError) as exc:
        dataset(make_pool(tmp_path, speakers=("a", "b")), num_spks=3)
    assert "has 2 speaker(s) (a, b) but dynamic mixing needs 3 distinct speakers per mixture" in one_line(exc)


def test_missing_files_are_a_one_line_error(tmp_path):
    pool = make_pool(tmp_path)
    (tmp_path / "audio" / "b_1.wav").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        dataset(pool)
    assert "1 of 8 audio file(s) missing, e.g. " in one_line(exc) and "b_1.wav; fix the paths" in str(exc.value)
    with pytest.raises(FileNotFoundError, match=r"^pool CSV /no/pool.csv does not exist"):
        load_source_pool("/no/pool.csv")


def test_sample_rate_not_integer_related_is_a_one_line_error(tmp_path):
    pool = make_pool(tmp_path, sr=11025)
    with pytest.raises(ValueError) as exc:
        dataset(pool)
    assert "is sampled at 11025 Hz, not an integer multiple or divisor of sample_rate=8000" in one_line(exc)


def test_pool_csv_without_speaker_column_and_bad_options(tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", [{"id": "u", "path": "x.wav"}])
    with pytest.raises(ValueError, match=r"has no speaker column \(one of \['speaker', 'spk_id', 'spk'\]\)"):
        load_source_pool(bad)
    pool = make_pool(tmp_path)
    with pytest.raises(ValueError, match=r"^dynamic_mixing option gain_db must have low <= high, got \[5.0, 0.0\]$"):
        dataset(pool, gain_db=[5, 0])
    with pytest.raises(ValueError, match=r"^dynamic mixing needs segment_seconds > 0, got None"):
        dataset(pool, segment_seconds=None)
    with pytest.raises(ValueError, match=r"^unknown augmentation option 'nois_prob'"):
        dataset(pool, augment={"nois_prob": 1.0})
