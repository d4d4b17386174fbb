"""The LibriMix separation recipe end to end on a tiny generated Libri2Mix (LibriMix scripts' layout).

- every top-level key of every LibriMix yaml is used (the WSJ0Mix recipe test's checker);
- ``diffsep_small.yaml`` (tiny network) trains one epoch and tests, writing the results CSV;
- the mixture type and the training splits come from the yaml;
- the cross-domain evaluation (``eval_wsj0mix_model.yaml``) loads a model folder made by
  ``speechbrain_diffsep.export`` or a recipe's output folder (same weights -> same scores), trains
  nothing and writes the results CSV, also as 2 torchrun ranks (one export, by the main rank);
- a missing data folder or model folder gives a one-line error; a model of another sample rate
  is refused.
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
RECIPE = ROOT / "recipes" / "LibriMix" / "separation"
YAMLS = sorted((RECIPE / "hparams").glob("*.yaml"))
CODE = [RECIPE / "train.py", ROOT / "speechbrain_diffsep" / "brain.py", ROOT / "speechbrain_diffsep" / "recipe.py"]
SR = 8000
COUNTS = {"train-360": 8, "train-100": 2, "dev": 2, "test": 2}
# the paper-small's test sampler (pc, 2 steps), so the cross-domain eval below can reproduce the scores
TINY = [a for a in wsj.TINY_TCN if not a.startswith("--separation_options")] + [
    "--separation_options={sampler: pc, num_steps: 2}", "--number_of_epochs=1", "--num_workers=0"]
# the training run's test sampler (the override is merged into the yaml's dict: dt must be reset, and
# diffsep_small.yaml's restart_t is kept by the training run's merge)
TINY_EVAL = ["--separation_options={sampler: pc, num_steps: 2, dt: grid, restart_t: 0.5}", "--test_metrics=[si_sdr,si_sdri,pesq,estoi]",
             "--device=cpu", "--noprogressbar", "--num_workers=0"]


# --------------------------------------------------------------------------- fixture data
def write_tiny_librimix(root, seed=0):
    """``root/Libri2Mix/wav8k/min/<split>/{mix_clean,mix_both,s1,s2,noise}/*.wav``."""
    rng = np.random.default_rng(seed)
    for split, count in COUNTS.items():
        for i in range(count):
            n = int(SR * rng.uniform(0.6, 0.8))
            s1, s2 = wsj._voice(rng, n), wsj._voice(rng, n)
            noise = 0.02 * rng.standard_normal(n)
            name = f"{split}-{i:02d}.wav"
            signals = {"s1": s1, "s2": s2, "noise": noise, "mix_clean": s1 + s2, "mix_both": s1 + s2 + noise}
            for sub, sig in signals.items():
                folder = root / "Libri2Mix" / "wav8k" / "min" / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(folder / name, sig.astype(np.float32), SR, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return write_tiny_librimix(tmp_path_factory.mktemp("tiny_librimix"))


def _cmd(hparams, data, out, extra=()):
    return wsj._train_cmd(hparams, data, out, extra, recipe=RECIPE)


def _results(out):
    with open(Path(out) / "test" / "test_results.csv") as f:
        return list(csv.DictReader(f))


def _train_module():
    return load_script(RECIPE.relative_to(ROOT) / "train.py", "librimix_train")


@pytest.fixture(scope="module")
def trained(data_folder, tmp_path_factory):
    """One epoch of diffsep_small (tiny network) on the tiny Libri2Mix, then its test stage."""
    out = tmp_path_factory.mktemp("librimix_run") / "small"
    wsj._run(_cmd("diffsep_small.yaml", data_folder, out, TINY))
    return out


@pytest.fixture(scope="module")
def model_folder(trained, tmp_path_factory):
    """The trained run exported as a model folder (EMA weights of the best checkpoint)."""
    from speechbrain_diffsep.export import export_from_recipe

    return export_from_recipe(trained, tmp_path_factory.mktemp("exported") / "model", ckpt="best")


# --------------------------------------------------------------------------- yaml checks
@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_key_is_used(yaml_path, monkeypatch):
    monkeypatch.setattr(wsj, "CODE", CODE)
    keys = wsj._top_level_keys(yaml_path)
    assert {"modules", "brain_class", "mixture", "train_splits"} <= set(keys)
    unused = [k for k in keys if not k.startswith("__") and k not in wsj._used_names(yaml_path)]
    assert unused == [], f"{yaml_path.name}: unused top-level keys {unused}"


def test_the_paper_yaml_is_the_wsj0mix_one_on_libri2mix(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    def load(path):
        with open(path) as f:
            return load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)})

    ours = load(RECIPE / "hparams" / "diffsep.yaml")
    theirs = load(wsj.RECIPE / "hparams" / "diffsep.yaml")
    assert (ours["mixture"], ours["train_splits"], ours["sample_rate"], ours["data_version"]) == ("clean", ["train-360"], 8000, "min")
    for key in ("lr", "ema_decay", "batch_size", "grad_accumulation_factor", "max_grad_norm", "segment_seconds",
                "loss_options", "separation_options", "nf", "ch_mult", "num_res_blocks", "attn_resolutions",
                "number_of_epochs", "test_metrics"):
        assert ours[key] == theirs[key], key
    assert sum(p.numel() for p in ours["score_model"].parameters()) == 65_623_366


# --------------------------------------------------------------------------- training
def test_small_recipe_trains_one_epoch_and_tests(trained, data_folder):
    rows = _results(trained)
    assert sorted(r["ID"] for r in rows) == ["avg", "test-00", "test-01"]
    for col in ("si_sdr", "si_sdr_s1", "si_sdr_s2", "si_sdri", "pesq", "estoi"):
        assert all(np.isfinite(float(r[col])) for r in rows), col
    with open(trained / "save" / "train.csv") as f:
        train = list(csv.DictReader(f))
    assert len(train) == COUNTS["train-360"] and all("/train-360/mix_clean/" in r["mix_wav"] for r in train)
    log = (trained / "train_log.txt").read_text()
    assert "epoch: 1" in log and "test si_sdr" in log
    assert [p for p in (trained / "save").glob("CKPT+*") if (p / "complete.ckpt").exists()]


def test_mixture_and_train_splits_come_from_the_yaml(data_folder, tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_diffsep.recipe import dataio_prep

    overrides = {"data_folder": str(data_folder), "output_folder": str(tmp_path), "mixture": "both",
                 "train_splits": ["train-100", "train-360"], "segment_seconds": None}
    with open(RECIPE / "hparams" / "diffsep_small.yaml") as f:
        hp = load_hyperpyyaml(f, overrides)
    _train_module().prepare(hp)
    data = dataio_prep(hp)
    assert len(data["train"]) == COUNTS["train-100"] + COUNTS["train-360"]
    item = data["train"][0]
    folder = Path(data_folder) / "Libri2Mix" / "wav8k" / "min" / "train-100"
    noise, _ = sf.read(folder / "noise" / f"{item['id']}.wav", dtype="float32")
    # mix_both = s1 + s2 + noise: the mixture read is that file, the targets are the two speakers
    np.testing.assert_allclose(item["mix_sig"].numpy(), (item["s1_sig"] + item["s2_sig"]).numpy() + noise, atol=1e-6)


# --------------------------------------------------------------------------- cross-domain evaluation
def test_eval_yaml_tests_a_model_folder_without_training(trained, model_folder, data_folder, tmp_path):
    out = tmp_path / "eval"
    wsj._run(_cmd("eval_wsj0mix_model.yaml", data_folder, out, TINY_EVAL + [f"--pretrained_folder={model_folder}"]))
    rows = _results(out)
    assert sorted(r["ID"] for r in rows) == ["avg", "test-00", "test-01"]
    # the exported EMA weights, the same sampler and per-utterance seeds: the training run's own scores
    cols = ("ID", "si_sdr_s1", "si_sdr_s2", "pesq", "estoi")
    assert [[r[c] for c in cols] for r in rows] == [[r[c] for c in cols] for r in _results(trained)]
    log = (out / "train_log.txt").read_text()
    assert "test si_sdr" in log and "epoch: 1" not in log  # tested, never trained
    assert not list(out.rglob("CKPT+*"))


def test_eval_from_a_recipe_output_folder_scores_like_its_model_folder(trained, model_folder, data_folder, tmp_path):
    from speechbrain_diffsep.recipe import load_model_folder

    loaded = load_model_folder(trained, tmp_path / "export", sample_rate=SR, num_spks=2)
    ema = torch.load(next(p for p in sorted((trained / "save").glob("CKPT+*")) if (p / "ema.ckpt").exists()) / "ema.ckpt")
    for name, param in loaded["score_model"].named_parameters():
        torch.testing.assert_close(param, ema[f"module.{name}"], rtol=0, atol=0)
    outs, procs = {}, []
    try:  # the two evaluations side by side (one thread each, separate folders)
        for label, source in (("folder", model_folder), ("recipe", trained)):
            outs[label] = tmp_path / label
            procs.append(wsj._start(_cmd("eval_wsj0mix_model.yaml", data_folder, outs[label],
                                         TINY_EVAL + [f"--pretrained_folder={source}"])))
        for proc in procs:
            wsj._finish(proc)
    finally:
        for proc in procs:
            wsj._stop(proc)
    a, b = _results(outs["folder"]), _results(outs["recipe"])
    assert [(r["ID"], r["si_sdr"], r["pesq"]) for r in a] == [(r["ID"], r["si_sdr"], r["pesq"]) for r in b]
    assert (outs["recipe"] / "model" / "score_model.ckpt").is_file()


def test_two_process_test_only_run_exports_the_recipe_folder_once_and_scores_like_one(trained, data_folder, tmp_path):
    """torchrun, 2 ranks, test only, from a recipe output folder (issue 13.4): the main rank exports the
    model folder (atomically), the other waits for it; the sharded test set scores as the training
    run's own test stage."""
    out = tmp_path / "eval_ddp"
    proc = wsj._run(wsj._train_cmd("eval_wsj0mix_model.yaml", data_folder, out,
                                   TINY_EVAL + [f"--pretrained_folder={trained}"], nproc=2, recipe=RECIPE))
    assert "terminate called" not in proc.stdout + proc.stderr
    got, ref = _results(out), _results(trained)
    assert [r["ID"] for r in got] == [r["ID"] for r in ref]
    for col in ("si_sdr_s1", "si_sdr_s2", "pesq", "estoi"):  # ESTOI may differ in the last bits across processes
        np.testing.assert_allclose([float(r[col]) for r in got], [float(r[col]) for r in ref], rtol=1e-9, err_msg=col)
    assert sorted(p.name for p in (out / "model").iterdir()) == ["README.md", "export_info.json", "hyperparams.yaml",
                                                               "score_model.ckpt"]
    assert not list(out.glob(".model.partial-*"))  # no staging folder left behind


# --------------------------------------------------------------------------- errors
def test_missing_data_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no_such_librimix"
    proc = subprocess.run(_cmd("diffsep_small.yaml", missing, tmp_path / "out"), env=wsj._env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data_folder") and str(missing) in last and "Libri2Mix" in last


@pytest.mark.parametrize("problem", ["missing", "not_a_model"])
def test_bad_pretrained_folder_is_a_one_line_error(problem, data_folder, tmp_path):
    from speechbrain_diffsep.recipe import cli_main

    folder = tmp_path / "model"
    if problem == "not_a_model":
        folder.mkdir()
        (folder / "notes.txt").write_text("nothing here")
    argv = [str(RECIPE / "hparams" / "eval_wsj0mix_model.yaml"), f"--data_folder={data_folder}",
            f"--output_folder={tmp_path / 'out'}", f"--pretrained_folder={folder}"]
    with pytest.raises(SystemExit) as exc:
        cli_main(_train_module().main, argv)
    message = str(exc.value.code)
    assert message.startswith(f"error: pretrained_folder '{folder}'") and "\n" not in message
    assert "speechbrain_diffsep.export" in message


def test_a_model_of_another_sample_rate_is_refused(model_folder, data_folder, tmp_path):
    from speechbrain_diffsep.recipe import RecipeError

    argv = [str(RECIPE / "hparams" / "eval_wsj0mix_model.yaml"), f"--data_folder={data_folder}",
            f"--output_folder={tmp_path}", f"--pretrained_folder={model_folder}", "--sample_rate=16000"]
    with pytest.raises(RecipeError, match="sample_rate=8000, but the yaml has sample_rate=16000"):
        _train_module().main(argv)
