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


# --------------------------------------------------------------------------- concurrent exports (issue 13.4)
def _export_when_released(barrier, run, out):
    """Child process: export ``run``'s best checkpoint to ``out`` as soon as every sibling is ready."""
    from speechbrain_diffsep import export as ex

    barrier.wait(timeout=120)
    ex.export_from_recipe(run, out, ckpt="best")


def _read_until(barrier, stop, target, result):
    """Child process: read the model folder's files over and over while the exports run (from the
    moment every process is ready until ``stop``); write ``reads failures first_error`` to ``result``."""
    from speechbrain_diffsep.inference import read_state_dict

    reads, failures, first = 0, 0, ""
    barrier.wait(timeout=120)
    while not stop.is_set() or reads == 0:
        try:
            read_state_dict(Path(target) / "score_model.ckpt")
            json.loads((Path(target) / "export_info.json").read_text())
            if "score_model:" not in (Path(target) / "hyperparams.yaml").read_text():
                raise ValueError("hyperparams.yaml without score_model")
        except Exception as err:  # noqa: BLE001 - every failure counts
            failures += 1
            first = first or f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
        reads += 1
    Path(result).write_text(f"{reads} {failures} {first}")


def _load_model_folder_on_rank(rank, world, port, run, savedir, log):
    """Child process: rank ``rank`` of a gloo group calls ``recipe.load_model_folder`` on a recipe run,
    noting every call of the export in ``log`` and the weights it got in ``log.<rank>``."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from speechbrain_diffsep import export as ex
        from speechbrain_diffsep.brain import parameter_fingerprint
        from speechbrain_diffsep.recipe import load_model_folder

        real = ex.export_from_recipe

        def counted(*args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{rank}\n")
            return real(*args, **kwargs)

        ex.export_from_recipe = counted
        model = load_model_folder(run, savedir, sample_rate=8000, num_spks=2)
        Path(f"{log}.{rank}").write_text(f"{model['folder']} {parameter_fingerprint(model['score_model'])}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _preloaded_context():
    """Processes forked from a server that imported torch and the exporter once (not the pytest
    process, whose OpenMP threads a fork must not inherit): the same isolation as "spawn", without
    importing torch again in every child."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "speechbrain_diffsep.export", "speechbrain_diffsep.inference"])
    return ctx


def _start_all(ctx, target, args_list, timeout=240, started=None):
    """Run ``target(*args)`` in one process per ``args``; ``started``: a barrier to join once all
    are running (so that the caller's own work overlaps theirs). Returns the exit codes."""
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    if started is not None:
        started.wait(timeout=timeout)
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"{len(alive)} process(es) still running after {timeout} s"
    return [p.exitcode for p in procs]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_exports_to_one_folder_leave_it_intact(recipe_run, tmp_path):
    """Three processes export to the same folder at once, over an older export (of another
    checkpoint), while a fourth reads it: the reader never meets a half-written file, and the end
    is one complete folder with the new weights, no staging folder left behind."""
    out, emas, _ = recipe_run
    target = tmp_path / "model"
    export.export_from_recipe(out, target, ckpt="last")
    ctx = _preloaded_context()
    barrier, stop, result = ctx.Barrier(5), ctx.Event(), tmp_path.parent / f"{tmp_path.name}_reader.txt"
    reader = ctx.Process(target=_read_until, args=(barrier, stop, str(target), str(result)))
    reader.start()
    try:
        codes = _start_all(ctx, _export_when_released, [(barrier, str(out), str(target))] * 3, started=barrier)
    finally:
        stop.set()
        reader.join(timeout=120)
        if reader.is_alive():
            reader.kill()
    assert codes == [0, 0, 0]
    reads, failures, first = (result.read_text().split(" ", 2) + [""])[:3]
    assert int(reads) > 0 and int(failures) == 0, f"a reader saw a half-written folder {failures} times in {reads}: {first}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.partial-* left
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "export_info.json", "hyperparams.yaml", "score_model.ckpt"]
    model = DiffSepSeparation.from_hparams(source=str(target), run_opts={"device": "cpu"})
    for p, q in zip(model.mods.score_model.parameters(), emas[5.0]):
        assert torch.equal(p, q)
    assert json.loads((target / "export_info.json").read_text())["checkpoint_meta"]["si_sdr"] == 5.0


def test_a_failed_export_leaves_the_folder_as_it_was(recipe_run, tmp_path, monkeypatch):
    out, emas, _ = recipe_run
    target = tmp_path / "model"
    export.export_from_recipe(out, target, ckpt="last")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(folder, state):
        raise export.ExportError("verification failed")

    monkeypatch.setattr(export, "verify_model_folder", broken)
    with pytest.raises(export.ExportError, match="verification failed"):
        export.export_from_recipe(out, target, ckpt="best")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_ddp_test_only_ranks_export_a_recipe_run_once_and_load_the_same_model(recipe_run, tmp_path):
    """load_model_folder under a 2-process gloo group (a torchrun test-only run): the main rank
    exports, the other waits for it; both load the same weights from one folder."""
    out, emas, _ = recipe_run
    savedir, log = tmp_path / "model", tmp_path / "exports.log"
    ctx = _preloaded_context()
    port = _free_port()
    codes = _start_all(ctx, _load_model_folder_on_rank, [(r, 2, port, str(out), str(savedir), str(log)) for r in (0, 1)])
    assert codes == [0, 0]
    assert log.read_text().split() == ["0"]  # exported by rank 0 only
    got = [Path(f"{log}.{r}").read_text() for r in (0, 1)]
    assert got[0] == got[1] and got[0].startswith(str(savedir))
    state = torch.load(savedir / "score_model.ckpt", weights_only=True)
    from speechbrain_diffsep.ncsnpp import ScoreModel  # noqa: F401  (the folder's network)

    names = [n for n, _ in load_hyperpyyaml((savedir / "hyperparams.yaml").read_text())["score_model"].named_parameters()]
    for name, q in zip(names, emas[5.0]):
        assert torch.equal(state[name], q)
