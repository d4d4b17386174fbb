"""speechbrain_diffsep.recipe in-process: data pipeline, errors, model folders, enhancement scoring.

The recipes themselves run end to end in tests/test_recipe_{wsj0mix,librimix,voicebank}.py.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speechbrain as sb
import speechbrain_diffsep.brain as brain_module

from speechbrain_diffsep.metrics import evaluate_separation
from speechbrain_diffsep.recipe import (
    EnhancementMetricStats,
    RecipeError,
    audio_pipeline,
    check_data_folder,
    dataio_prep,
    load_model_folder,
)

ROOT = Path(__file__).resolve().parents[1]
SR = 8000


def _write(path, sig):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(sig, dtype=np.float32), SR, subtype="FLOAT")
    return str(path)


@pytest.fixture
def ramps(tmp_path):
    """Three files of 1000 samples: mix = r, s1 = r / 4, s2 = r / 2 (r a ramp), and a CSV row."""
    r = np.arange(1000) / 1000.0
    row = {"ID": "u", "duration": 1000 / SR, "mix_wav": _write(tmp_path / "mix.wav", r),
           "s1_wav": _write(tmp_path / "s1.wav", r / 4), "s2_wav": _write(tmp_path / "s2.wav", r / 2)}
    return r, row


def _items(row, pipeline, n=1):
    ds = sb.dataio.dataset.DynamicItemDataset({row["ID"]: {k: v for k, v in row.items() if k != "ID"}})
    ds.add_dynamic_item(pipeline)
    ds.set_output_keys(list(pipeline.provides))
    return [ds[0] for _ in range(n)]


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("folder", [None, "/no/such/data"])
def test_missing_data_folder_error_is_one_line_with_the_hint(folder):
    with pytest.raises(FileNotFoundError) as exc:
        check_data_folder(folder, "pass --data_folder=<X>")
    assert str(exc.value) == f"data_folder {str(folder)!r} does not exist; pass --data_folder=<X>"


def test_every_signal_gets_the_same_random_crop(ramps):
    r, row = ramps
    torch.manual_seed(0)
    starts = []
    for item in _items(row, audio_pipeline("mix_wav", ["s1_wav", "s2_wav"], SR, segment=300), n=30):
        mix, s1, s2 = item["mix_sig"].numpy(), item["s1_sig"].numpy(), item["s2_sig"].numpy()
        assert mix.shape == s1.shape == s2.shape == (300,)
        start = int(round(mix[0] * 1000))
        np.testing.assert_allclose(mix, r[start : start + 300], atol=1e-7)
        np.testing.assert_allclose(s1, mix / 4, atol=1e-7)
        np.testing.assert_allclose(s2, mix / 2, atol=1e-7)
        starts.append(start)
    assert min(starts) >= 0 and max(starts) <= 700 and len(set(starts)) > 10


def test_short_utterances_are_zero_padded_and_whole_ones_read_entirely(ramps):
    r, row = ramps
    (padded,) = _items(row, audio_pipeline("mix_wav", ["s1_wav", "s2_wav"], SR, segment=1500))
    assert padded["mix_sig"].shape == (1500,)
    np.testing.assert_allclose(padded["mix_sig"][:1000].numpy(), r, atol=1e-7)
    assert not padded["s2_sig"][1000:].any()
    (whole,) = _items(row, audio_pipeline("mix_wav", ["s1_wav"], SR))
    np.testing.assert_allclose(whole["mix_sig"].numpy(), r, atol=1e-7)


def test_the_residual_target_is_the_mixture_minus_the_others(ramps):
    r, row = ramps
    pipeline = audio_pipeline("mix_wav", ["s1_wav"], SR, segment=200, residual_target=True)
    assert list(pipeline.provides) == ["crop_start", "mix_sig", "s1_sig", "s2_sig"]
    (item,) = _items(row, pipeline)
    np.testing.assert_allclose(item["s2_sig"].numpy(), 0.75 * item["mix_sig"].numpy(), atol=1e-7)


def _crops(row, rank, epoch, workers, n=8, worker_init=True):
    """Crop offsets of ``n`` copies of ``row`` through a training-like loader of ``rank``/``epoch``."""
    from speechbrain.dataio.batch import PaddedBatch

    from speechbrain_diffsep.brain import DataWorkerInit, seed_data_generator

    data = {f"u{i}": {k: v for k, v in row.items() if k != "ID"} for i in range(n)}
    ds = sb.dataio.dataset.DynamicItemDataset(data)
    ds.add_dynamic_item(audio_pipeline("mix_wav", ["s1_wav"], SR, segment=300))
    ds.set_output_keys(["id", "crop_start"])
    torch.manual_seed(0)  # SpeechBrain seeds every rank alike: the workers' base seeds are equal too
    seed_data_generator(7, rank, epoch)  # what the Brain does at the start of the epoch (main process)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=PaddedBatch,
                                         worker_init_fn=DataWorkerInit(7, rank, epoch) if worker_init else None)
    return [int(b.crop_start[0]) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_crops_differ_by_rank_and_epoch_and_repeat_with_the_seed(ramps, workers):
    from speechbrain_diffsep.brain import crop_generator
    from speechbrain_diffsep.recipe import random_crop

    _, row = ramps
    try:
        crops = _crops(row, rank=0, epoch=1, workers=workers)
        assert crops == _crops(row, rank=0, epoch=1, workers=workers)
        assert crops != _crops(row, rank=1, epoch=1, workers=workers)
        assert crops != _crops(row, rank=0, epoch=2, workers=workers)
        # each example has its own generator, (seed, rank, epoch, ID): the same crops whichever
        # process reads it, in whatever order (a mid-epoch resume skips batches unread)
        assert crops == [random_crop(row["duration"], SR, 300, generator=crop_generator(7, 0, 1, f"u{i}"))[0]
                         for i in range(len(crops))]
        assert crops == _crops(row, rank=0, epoch=1, workers=2 - workers)
    finally:
        brain_module._DATA_RNG["generator"] = None  # back to the global RNG for the other tests


def test_workers_that_the_brain_did_not_seed_do_not_repeat_each_others_crops(ramps):
    """A loader without DataWorkerInit: the main process's crop generator, copied into every forked
    worker, is not used there (the workers would all draw the same offsets)."""
    _, row = ramps
    try:
        crops = _crops(row, rank=0, epoch=1, workers=2, n=16, worker_init=False)
        assert crops[0::2] != crops[1::2]
    finally:
        brain_module._DATA_RNG["generator"] = None


def test_dataio_prep_checks_num_spks_against_the_columns(ramps, tmp_path):
    _, row = ramps
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    hp = {"num_spks": 2, "sample_rate": SR, "segment_seconds": None, "train_data": str(path),
          "valid_data": str(path), "test_data": str(path)}
    data = dataio_prep(hp)
    assert sorted(data) == ["test", "train", "valid"] and len(data["test"]) == 1
    assert sorted(dataio_prep(hp, splits=("test",))) == ["test"]
    with pytest.raises(ValueError, match="num_spks=3 but the recipe reads 1 target column"):
        dataio_prep(dict(hp, num_spks=3), sources=["s1_wav"], residual_target=True)
    with pytest.raises(ValueError, match="splits must be among"):
        dataio_prep(hp, splits=("dev",))


# --------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A hand-made model folder: the separation template with nf=16 and random weights."""
    from hyperpyyaml import load_hyperpyyaml

    folder = tmp_path_factory.mktemp("model")
    text = (ROOT / "hparams" / "separation_wsj0mix_8k.yaml").read_text().replace("nf: 128", "nf: 16")
    (folder / "hyperparams.yaml").write_text(text)
    torch.manual_seed(1)
    net = load_hyperpyyaml(text)["score_model"]
    for p in net.parameters():
        p.data.normal_()
    torch.save(net.state_dict(), folder / "score_model.ckpt")
    return folder, net.state_dict()


def test_a_model_folder_loads_its_weights_and_sde(model_folder, tmp_path):
    folder, state = model_folder
    model = load_model_folder(folder, tmp_path, sample_rate=8000, num_spks=2)
    assert (model["sample_rate"], model["num_spks"], model["folder"]) == (8000, 2, str(folder))
    assert type(model["sde"]).__name__ == "MixingSDE"
    for k, v in model["score_model"].state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("asked, message", [({"sample_rate": 16000}, "sample_rate=8000, but the yaml has sample_rate=16000"),
                                            ({"num_spks": 3}, "num_spks=2, but the yaml has num_spks=3")])
def test_a_model_for_other_data_is_refused(model_folder, tmp_path, asked, message):
    with pytest.raises(RecipeError, match=message):
        load_model_folder(model_folder[0], tmp_path, **asked)


def test_bad_model_folders_are_one_line_errors(model_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_folder .* does not exist"):
        load_model_folder(tmp_path / "nothing", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hyperparams.yaml").write_text((model_folder[0] / "hyperparams.yaml").read_text().replace("nf: 16", "nf: 32"))
    (broken / "score_model.ckpt").write_bytes((model_folder[0] / "score_model.ckpt").read_bytes())
    with pytest.raises(RecipeError) as exc:
        load_model_folder(broken, tmp_path)
    assert "does not match the score_model" in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- enhancement scoring
def _enhancement_batch(n=8000, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    clean = torch.sin(2 * np.pi * 220 * t) * torch.sin(2 * np.pi * 3 * t) ** 2
    noise = 0.3 * torch.randn(n, generator=g)
    ref = torch.stack([clean, noise])[None]
    return ref, ref.sum(1, keepdim=True)


def test_enhancement_scores_the_clean_estimate_and_the_noisy_input():
    ref, mix = _enhancement_batch()
    est = ref.clone()
    est[:, 1] = 0.0  # a useless noise estimate must not matter
    est[:, 0] += 0.05 * torch.randn(8000, generator=torch.Generator().manual_seed(1))
    stats = EnhancementMetricStats(fs=16000, metrics=("si_sdr", "si_sdri", "pesq", "estoi"))
    assert stats.metrics == ("si_sdr", "si_sdri", "pesq", "estoi", "noisy_si_sdr", "noisy_pesq", "noisy_estoi")
    stats.append(["u"], est, ref, mix)
    scores = stats.scores[0]
    clean_only = evaluate_separation(est[:, :1], ref[:, :1], mix, 16000, ("si_sdr", "pesq", "estoi"), permute=False)
    noisy = evaluate_separation(mix, ref[:, :1], mix, 16000, ("si_sdr", "pesq", "estoi"), permute=False)
    for m in ("si_sdr", "pesq", "estoi"):
        assert scores[m] == pytest.approx(clean_only[m], abs=1e-6)
        assert scores[f"noisy_{m}"] == pytest.approx(noisy[m], abs=1e-6)
    assert scores["si_sdri"][0] == pytest.approx(scores["si_sdr"][0] - scores["noisy_si_sdr"][0], abs=1e-4)
    assert scores["si_sdr"][0] > 10 > scores["noisy_si_sdr"][0]
    assert scores["perm"] == [0, 1]


def test_enhancement_csv_has_one_column_per_metric_and_an_average_row(tmp_path):
    stats = EnhancementMetricStats(fs=16000, metrics=("si_sdr", "si_sdri"))
    for i, gain in enumerate((0.1, 0.2)):
        ref, mix = _enhancement_batch(seed=i)
        est = ref + gain * torch.randn(ref.shape, generator=torch.Generator().manual_seed(i))
        stats.append([f"u{i}"], est, ref, mix, lengths=torch.tensor([0.5]))
    stats.write_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ID", "si_sdr", "si_sdri", "noisy_si_sdr"]
    assert [r["ID"] for r in rows] == ["u0", "u1", "avg"]
    assert float(rows[2]["si_sdr"]) == pytest.approx((float(rows[0]["si_sdr"]) + float(rows[1]["si_sdr"])) / 2)
    # lengths 0.5: only the first 4000 samples are scored
    ref, mix = _enhancement_batch(seed=0)
    first = evaluate_separation(mix[..., :4000], ref[:, :1, :4000], mix[..., :4000], 16000, ("si_sdr",), permute=False)
    assert float(rows[0]["noisy_si_sdr"]) == pytest.approx(first["si_sdr"][0])


def test_enhancement_stats_reject_bad_input():
    ref, mix = _enhancement_batch()
    with pytest.raises(ValueError, match="clean_index 2"):
        EnhancementMetricStats(16000, ("si_sdr",), clean_index=2).append(["u"], ref, ref, mix)
    with pytest.raises(ValueError, match="got 2 ids for a batch of 1"):
        EnhancementMetricStats(16000, ("si_sdr",)).append(["u", "v"], ref, ref, mix)
    with pytest.raises(ValueError, match="shaped \\(batch, K, samples\\) alike"):
        EnhancementMetricStats(16000, ("si_sdr",)).append(["u"], ref[0], ref[0], mix)


def test_enhancement_validation_scores_the_clean_estimate_only(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    with open(ROOT / "recipes" / "Voicebank" / "enhance" / "hparams" / "diffsep_small.yaml") as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path), "n_valid_separations": 1})
    brain = hp["brain_class"](modules=hp["modules"], opt_class=hp["optimizer"], hparams=hp,
                              run_opts={"device": "cpu"}, checkpointer=None)
    ref, mix = _enhancement_batch()
    clean_est = ref[:, 0] + 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(3))
    # a good clean estimate next to a useless (all-zero) noise estimate
    brain.separate = lambda m, ids, stage: torch.stack([clean_est, torch.zeros_like(clean_est)], 1)
    brain.on_stage_start(sb.Stage.VALID, epoch=1)
    lengths = torch.tensor([8000, 8000])
    brain._valid_separations(["a", "b"], mix.expand(2, 1, -1), ref.expand(2, -1, -1), lengths)
    expected = evaluate_separation(clean_est[None], ref[:, :1], mix, 16000, ("si_sdr",), permute=False)["si_sdr"][0]
    assert brain._valid_sisdr == [pytest.approx(expected, abs=0.05)]  # one utterance (n_valid_separations)
