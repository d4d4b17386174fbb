"""Export of model folders: from a recipe's checkpoints (EMA) and from the authors' checkpoint.

``make_recipe_run`` builds a small fake recipe output folder exactly as SpeechBrain lays it out
(``hyperparams.yaml`` resolved like ``create_experiment_directory``, ``save/CKPT+*`` written by a
``Checkpointer`` with the score model, its ``AveragedModel`` EMA and the Brain's completion marker);
the other test files import it.
"""
import json
from pathlib import Path
import time

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import DATA
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain_diffsep import export
from speechbrain_diffsep.inference import DiffSepSeparation
from speechbrain_diffsep.pipeline import separate_mixture

RECIPE_YAML = """
seed: 1
data_folder: !PLACEHOLDER
num_spks: {num_spks}
sample_rate: {sample_rate}
output_folder: !ref <data_folder>/out
save_folder: !ref <output_folder>/save
nf: 16
lr: 0.001
sde: !new:speechbrain_diffsep.sde.{sde}
    num_sources: !ref <num_spks>
    gamma: 2.0
    sigma_min: 0.05
    sigma_max: 0.5
    t_eps: 0.03
score_model: !new:speechbrain_diffsep.ncsnpp.ScoreModel
    num_sources: !ref <num_spks>
    nf: !ref <nf>
modules:
    score_model: !ref <score_model>
optimizer: !name:torch.optim.Adam
    lr: !ref <lr>
epoch_counter: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 10
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <save_folder>
    recoverables:
        score_model: !ref <score_model>
        counter: !ref <epoch_counter>
"""


def _perturb(model, gen, scale=1e-2):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_recipe_run(root, num_spks=2, sample_rate=8000, sde="MixingSDE", si_sdrs=(3.0, 5.0, 4.0), incomplete_best=True):
    """A recipe output folder with one checkpoint per entry of ``si_sdrs`` (plus, optionally, an
    unfinished save with the best score). Returns ``(output_folder, {si_sdr: ema score model})``."""
    root.mkdir(parents=True, exist_ok=True)
    src = root / "recipe.yaml"
    src.write_text(RECIPE_YAML.format(num_spks=num_spks, sample_rate=sample_rate, sde=sde))
    with open(src) as f:  # what speechbrain.create_experiment_directory writes
        resolved = resolve_references(f, {"data_folder": str(root)}).getvalue()
    out = root / "out"
    out.mkdir()
    (out / "hyperparams.yaml").write_text("# Generated from recipe.yaml\n# yamllint disable\n" + resolved)
    hp = load_hyperpyyaml(resolved)
    gen = torch.Generator().manual_seed(0)
    model = hp["score_model"]
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ckpt = Checkpointer(str(out / "save"), {"score_model": model, "ema": ema, "counter": hp["epoch_counter"]})
    emas = {}
    scores = list(si_sdrs) + ([max(si_sdrs) + 10] if incomplete_best else [])
    for i, score in enumerate(scores):
        _perturb(model, gen)
        ema.update_parameters(model)
        c = ckpt.save_checkpoint(meta={"si_sdr": score, "loss": -score})
        if i < len(si_sdrs):
            (c.path / "complete.ckpt").write_text("done")
            emas[score] = [p.detach().clone() for p in ema.module.parameters()]
        time.sleep(0.01)
    return out, emas, hp


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    return make_recipe_run(tmp_path_factory.mktemp("recipe"))


@pytest.mark.parametrize("which,score,updates", [("best", 5.0, 2), ("last", 4.0, 3)])
def test_recipe_export_takes_ema_weights_of_the_chosen_checkpoint(recipe_run, tmp_path, which, score, updates):
    out, emas, _ = recipe_run
    assert export.main(["--out", str(tmp_path / "m"), "--from-recipe", str(out), "--ckpt", which]) == 0
    model = DiffSepSeparation.from_hparams(source=str(tmp_path / "m"), run_opts={"device": "cpu"})
    for p, q in zip(model.mods.score_model.parameters(), emas[score]):
        assert torch.equal(p, q)
    info = json.loads((tmp_path / "m" / "export_info.json").read_text())
    assert info["used_ema"] and info["n_averaged"] == updates and info["checkpoint_meta"]["si_sdr"] == score
    assert (info["nf"], info["num_spks"], info["sample_rate"]) == (16, 2, 8000)


def test_recipe_export_minimizes_a_loss_metric(recipe_run, tmp_path):
    out, emas, _ = recipe_run
    export.export_from_recipe(out, tmp_path / "m", ckpt="best", metric="loss")
    model = DiffSepSeparation.from_hparams(source=str(tmp_path / "m"), run_opts={"device": "cpu"})
    assert torch.equal(next(model.mods.score_model.parameters()), emas[5.0][0])  # loss = -si_sdr


def test_export_load_separate_equals_the_source_model(recipe_run, tmp_path):
    out, emas, hp = recipe_run
    export.export_from_recipe(out, tmp_path / "m", ckpt="best")
    folder = DiffSepSeparation.from_hparams(source=str(tmp_path / "m"), savedir=str(tmp_path / "save"))
    source = hp["score_model"]
    with torch.no_grad():
        for p, q in zip(source.parameters(), emas[5.0]):
            p.copy_(q)
    source.eval()
    mix = torch.randn(1, 3000, generator=torch.Generator().manual_seed(5))
    est = folder.separate_batch(mix, num_steps=2, seed=11)
    with torch.no_grad():
        ref, _ = separate_mixture(source, hp["sde"], mix[:, None], num_steps=2, dt="reference", snr=0.5,
                                  corrector_steps=1, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(est, ref.transpose(1, 2), atol=1e-6)
    assert est.abs().max() > 0


def test_recipe_export_copies_network_sde_and_rates(tmp_path):
    out, _, _ = make_recipe_run(tmp_path / "r", num_spks=3, sample_rate=16000, si_sdrs=(1.0,), incomplete_best=False)
    export.export_from_recipe(out, tmp_path / "m", ckpt="last")
    text = (tmp_path / "m" / "hyperparams.yaml").read_text()
    hp = load_hyperpyyaml(text)
    assert (hp["num_spks"], hp["sample_rate"], hp["nf"]) == (3, 16000, 16)
    assert hp["sde"].num_sources == 3 and hp["score_model"].num_sources == 3
    assert hp["score_model"].config["nf"] == 16
    assert "num_sources: !ref <num_spks>" in text and "nf: !ref <nf>" in text


def test_recipe_with_prior_mixing_sde_gets_the_enhancement_template(tmp_path):
    out, _, _ = make_recipe_run(tmp_path / "r", sample_rate=16000, sde="PriorMixingSDE", si_sdrs=(1.0,), incomplete_best=False)
    export.export_from_recipe(out, tmp_path / "m")
    hp = load_hyperpyyaml((tmp_path / "m" / "hyperparams.yaml").read_text())
    assert type(hp["sde"]).__name__ == "PriorMixingSDE" and hp["clean_index"] == 0 and hp["sample_rate"] == 16000


def test_reference_export_writes_what_the_checkpoint_holds(tmp_path):
    from speechbrain_diffsep import convert  # an import error fails the test (no skip)
    assert export.main(["--out", str(tmp_path / "m"), "--from-reference", str(DATA / "diffsep_reference_nf16.ckpt")]) == 0
    hp = load_hyperpyyaml((tmp_path / "m" / "hyperparams.yaml").read_text())
    assert (hp["nf"], hp["num_spks"], hp["sample_rate"], hp["num_steps"]) == (16, 2, 8000, 30)
    assert (hp["sde"].gamma, hp["sde"].sigma_min, hp["sde"].sigma_max, hp["sde"].t_eps) == (2.0, 0.05, 0.5, 0.03)
    ref = convert.load_reference_checkpoint(DATA / "diffsep_reference_nf16.ckpt")
    got = torch.load(tmp_path / "m" / "score_model.ckpt", weights_only=True)
    assert got.keys() == ref.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize(
    "args,match",
    [
        (["--from-recipe", "{tmp}/nowhere"], "no such folder"),
        (["--from-reference", "{tmp}/nowhere.ckpt"], "no such file"),
        (["--from-reference", "{tmp}/bad.ckpt"], "cannot convert"),
        (["--from-recipe", "{tmp}"], "no hyperparams.yaml"),
    ],
)
def test_export_errors_are_one_line(tmp_path, capsys, args, match):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path) for a in args]
    assert export.main(["--out", str(tmp_path / "m")] + args) == 1
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_recipe_without_complete_checkpoint_is_reported(tmp_path):
    out, _, _ = make_recipe_run(tmp_path / "r", si_sdrs=(1.0,), incomplete_best=False)
    for marker in (out / "save").glob("CKPT+*/complete.ckpt"):
        marker.unlink()
    (out / "save" / "CKPT+x").mkdir()  # a stray folder without CKPT.yaml is ignored
    export.export_from_recipe(out, tmp_path / "m")  # no markers at all: older runs are accepted
    for f in (out / "save").glob("CKPT+*/score_model.ckpt"):
        f.unlink()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export.export_from_recipe(out, tmp_path / "m2")


def test_best_needs_a_metric_present_in_the_metas(recipe_run, tmp_path):
    out, _, _ = recipe_run
    with pytest.raises(ValueError, match="no checkpoint meta has metric pesq"):
        export.export_from_recipe(out, tmp_path / "m", metric="pesq")


def test_shipped_folders_name_no_path_of_the_machine_they_were_made_on():
    """Model folders, benchmark results and examples carry no absolute path of a build machine."""
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(^|[^A-Za-z0-9_.])/(work|tmp|root|home|Users)/")
    bad = []
    for folder in ("pretrained", "benchmarks/results", "examples"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".md", ".json", ".yaml", ".txt", ".csv", ".sh") and pattern.search(path.read_text(errors="replace")):
                bad.append(str(path.relative_to(root)))
    assert bad == []
