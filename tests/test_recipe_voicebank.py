"""The VoiceBank-DEMAND enhancement recipe end to end on a tiny generated data set (48 kHz, as distributed).

- every top-level key of both yamls is used (the WSJ0Mix recipe test's checker); ``diffsep.yaml``
  is the authors' noise-reduction set-up;
- the data pipeline gives targets ``[clean, noisy - clean]`` that sum to the noisy input, all
  cropped at the same place;
- ``diffsep_small.yaml`` (tiny network) trains one epoch and tests: the enhancement table holds the
  clean estimate's scores and the noisy input's, which match the metrics computed from the files;
- the run exports to a model folder that ``DiffSepEnhancement`` loads (PriorMixingSDE detected);
- a missing data folder gives a one-line error.
"""

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import test_recipe_wsj0mix as wsj
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "Voicebank" / "enhance"
YAMLS = sorted((RECIPE / "hparams").glob("*.yaml"))
CODE = [RECIPE / "train.py", ROOT / "speechbrain_diffsep" / "brain.py", ROOT / "speechbrain_diffsep" / "recipe.py"]
RAW_SR, SR = 48000, 16000
FILES = {
    "trainset_28spk_wav": [f"p{spk}_{i:03d}" for spk in (230, 231) for i in range(1, 5)] + ["p226_001", "p287_001"],
    "testset_wav": ["p232_001", "p257_001"],
}
TINY = wsj.TINY_DIFFSEP + ["--number_of_epochs=1", "--num_workers=0"]


# --------------------------------------------------------------------------- fixture data
def write_tiny_voicebank(root, seed=0):
    """``root/{clean,noisy}_{trainset_28spk,testset}_wav/<speaker>_<n>.wav`` at 48 kHz."""
    rng = np.random.default_rng(seed)
    for folder, names in FILES.items():
        for name in names:
            n = int(RAW_SR * rng.uniform(0.6, 0.8))
            clean = np.repeat(wsj._voice(rng, n // 6 + 1), 6)[:n]  # a voice at 8 kHz, held to 48 kHz
            noise = 0.05 * rng.standard_normal(n) + 0.02 * np.sin(2 * np.pi * 50 * np.arange(n) / RAW_SR)
            for kind, sig in (("clean", clean), ("noisy", clean + noise)):
                path = root / f"{kind}_{folder}" / f"{name}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, sig.astype(np.float32), RAW_SR, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return write_tiny_voicebank(tmp_path_factory.mktemp("tiny_voicebank"))


def _cmd(hparams, data, out, extra=()):
    return wsj._train_cmd(hparams, data, out, extra, recipe=RECIPE)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _train_module():
    return load_script(RECIPE.relative_to(ROOT) / "train.py", "voicebank_train")


def _load(yaml_name, **overrides):
    from hyperpyyaml import load_hyperpyyaml

    with open(RECIPE / "hparams" / yaml_name) as f:
        return load_hyperpyyaml(f, {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def trained(data_folder, tmp_path_factory):
    """One epoch of diffsep_small (tiny network) on the tiny VoiceBank, then its test stage."""
    out = tmp_path_factory.mktemp("voicebank_run") / "small"
    wsj._run(_cmd("diffsep_small.yaml", data_folder, out, TINY))
    return out


# --------------------------------------------------------------------------- yaml checks
@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_key_is_used(yaml_path, monkeypatch):
    monkeypatch.setattr(wsj, "CODE", CODE)
    keys = wsj._top_level_keys(yaml_path)
    assert {"modules", "brain_class", "valid_speakers"} <= set(keys)
    unused = [k for k in keys if not k.startswith("__") and k not in wsj._used_names(yaml_path)]
    assert unused == [], f"{yaml_path.name}: unused top-level keys {unused}"


def test_the_paper_yaml_is_the_authors_noise_reduction_setup(tmp_path):
    from speechbrain_diffsep.recipe import DiffSepEnhancementBrain
    from speechbrain_diffsep.sde import PriorMixingSDE

    hp = _load("diffsep.yaml", data_folder=tmp_path, output_folder=tmp_path)
    brain = hp["brain_class"](modules=hp["modules"], opt_class=hp["optimizer"], hparams=hp,
                              run_opts={"device": "cpu"}, checkpointer=hp["checkpointer"])
    assert isinstance(brain, DiffSepEnhancementBrain) and "ema" in hp["checkpointer"].recoverables
    sde = hp["sde"]
    assert isinstance(sde, PriorMixingSDE) and sde.num_sources == hp["num_spks"] == 2
    assert (sde.gamma, sde.sigma_min, sde.sigma_max, sde.t_eps) == (2.0, 0.05, 0.5, 0.03)
    assert (hp["sample_rate"], hp["segment_seconds"], hp["lr"], hp["ema_decay"]) == (16000, 3.0, 1e-4, 0.999)
    assert (brain.max_grad_norm, hp["batch_size"], brain.grad_accumulation_factor) == (5.0, 4, 4)
    assert hp["loss_options"]["shuffle"] is False and hp["loss_options"]["p_T"] == pytest.approx(1 / 30)
    assert sum(p.numel() for p in hp["score_model"].parameters()) == 65_623_366  # NCSN++ nf=128
    assert hp["score_model"].config["spec_factor"] == 0.15 and hp["score_model"].config["spec_exponent"] == 0.5
    assert hp["separation_options"] == {"sampler": "pc", "num_steps": 30, "snr": 0.5, "corrector_steps": 1}


# --------------------------------------------------------------------------- data
def test_targets_are_clean_and_noise_and_share_the_crop(data_folder, tmp_path):
    from speechbrain_diffsep.recipe import dataio_prep

    hp = _load("diffsep_small.yaml", data_folder=data_folder, output_folder=tmp_path, segment_seconds=0.25)
    _train_module().prepare(hp)
    data = dataio_prep(hp, mixture="noisy_wav", sources=["clean_wav"], residual_target=True)
    assert (len(data["train"]), len(data["valid"]), len(data["test"])) == (8, 2, 2)
    rows = {r["ID"]: r for r in _csv(tmp_path / "save" / "train.csv")}
    for i in range(3):
        item = data["train"][i]
        mix, s1, s2 = item["mix_sig"], item["s1_sig"], item["s2_sig"]
        assert mix.shape == s1.shape == s2.shape == (4000,)
        torch.testing.assert_close(s1 + s2, mix, rtol=0, atol=1e-6)
        clean, _ = sf.read(rows[item["id"]]["clean_wav"], dtype="float32")
        noisy, _ = sf.read(rows[item["id"]]["noisy_wav"], dtype="float32")
        err = [np.abs(clean[k : k + 4000] - s1.numpy()).max() for k in range(len(clean) - 4000 + 1)]
        start = int(np.argmin(err))  # where the clean crop comes from; the noisy one is the same window
        assert err[start] == 0.0
        np.testing.assert_array_equal(noisy[start : start + 4000], mix.numpy())
    whole = data["test"][0]
    assert whole["mix_sig"].shape[-1] == sf.info(_csv(tmp_path / "save" / "test.csv")[0]["noisy_wav"]).frames


# --------------------------------------------------------------------------- training
def test_small_recipe_trains_one_epoch_and_writes_the_enhancement_table(trained):
    from speechbrain_diffsep.metrics import estoi_score, pesq_score, si_sdr

    rows = _csv(trained / "test" / "test_results.csv")
    assert list(rows[0]) == ["ID", "si_sdr", "si_sdri", "pesq", "estoi", "noisy_si_sdr", "noisy_pesq", "noisy_estoi"]
    assert [r["ID"] for r in rows] == ["p232_001", "p257_001", "avg"]
    test_csv = {r["ID"]: r for r in _csv(trained / "save" / "test.csv")}
    for r in rows[:-1]:
        vals = {k: float(v) for k, v in r.items() if k != "ID"}
        assert all(np.isfinite(v) for v in vals.values()), r
        assert vals["si_sdri"] == pytest.approx(vals["si_sdr"] - vals["noisy_si_sdr"], abs=1e-4)
        clean = torch.from_numpy(sf.read(test_csv[r["ID"]]["clean_wav"], dtype="float32")[0])
        noisy = torch.from_numpy(sf.read(test_csv[r["ID"]]["noisy_wav"], dtype="float32")[0])
        assert vals["noisy_si_sdr"] == pytest.approx(float(si_sdr(noisy, clean, zero_mean=False)), abs=1e-3)
        assert vals["noisy_pesq"] == pytest.approx(float(pesq_score(noisy, clean, SR)), abs=1e-4)  # wide-band
        assert vals["noisy_estoi"] == pytest.approx(float(estoi_score(noisy, clean, SR)), abs=1e-4)
    summary = {r["metric"]: r for r in _csv(trained / "test" / "test_summary.csv")}
    assert set(summary) == set(rows[0]) - {"ID"} and all(r["count"] == "2" for r in summary.values())
    ckpts = [p for p in (trained / "save").glob("CKPT+*") if (p / "complete.ckpt").exists()]
    meta = (ckpts[0] / "CKPT.yaml").read_text()
    assert "si_sdr" in meta  # validation SI-SDR of the clean estimate picks the best checkpoint


def test_the_run_exports_to_an_enhancement_model_folder(trained, tmp_path):
    import json

    from speechbrain_diffsep.export import export_from_recipe
    from speechbrain_diffsep.inference import DiffSepEnhancement

    folder = export_from_recipe(trained, tmp_path / "model", ckpt="best")
    assert json.loads((folder / "export_info.json").read_text())["task"] == "enhancement"
    model = DiffSepEnhancement.from_hparams(source=str(folder), savedir=str(tmp_path / "fetched"),
                                            run_opts={"device": "cpu"})
    assert type(model.hparams.sde).__name__ == "PriorMixingSDE" and model.hparams.sample_rate == SR
    noisy = 0.1 * torch.randn(1, 4000)
    out = model.enhance_batch(noisy, num_steps=2, seed=0)
    assert out.shape == (1, 4000) and torch.isfinite(out).all()


def test_missing_data_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no_such_voicebank"
    proc = subprocess.run(_cmd("diffsep_small.yaml", missing, tmp_path / "out"), env=wsj._env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data_folder") and str(missing) in last and "clean_trainset_28spk_wav" in last
