"""The WSJ0Mix separation recipe end to end on a tiny generated dataset (wsj0-2mix layout).

- every top-level key of every recipe yaml is used (by a !ref or by train.py / brain.py);
- an unknown key on the command line gives a one-line error naming it; a missing data folder
  gives a one-line error and no traceback;
- two processes (torchrun, gloo on CPU) train on disjoint examples with their own diffusion noise
  and crops (each rank's generators), end with identical weights, and write one checkpoint (with
  both ranks' generator states) and one results CSV;
- a run killed with SIGKILL after a checkpoint resumes at the saved epoch/step and finishes;
- the Conv-TasNet baseline trains and is tested through the same recipe.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "WSJ0Mix" / "separation"
YAMLS = sorted((RECIPE / "hparams").glob("*.yaml"))
CODE = [RECIPE / "train.py", ROOT / "speechbrain_diffsep" / "brain.py", ROOT / "speechbrain_diffsep" / "recipe.py",
        ROOT / "speechbrain_diffsep" / "dynamic_mixing.py"]
SR = 8000
N_TRAIN, N_VALID, N_TEST = 8, 2, 2

# networks small enough for CI; the recipe yamls stay the ones users run
COMMON = [
    "--segment_seconds=0.5",
    "--batch_size=2",
    "--n_valid_separations=1",
    "--test_metrics=[si_sdr,si_sdri,pesq,estoi]",
    "--device=cpu",
    "--noprogressbar",
    "--ckpt_interval_minutes=0",
    "--log_rank_activity=True",
]
# diffsep_small_paper.yaml: NCSN++ in the paper's parameterization
TINY_DIFFSEP = [
    "--nf=16",
    "--ch_mult=[1,1,2,2]",
    "--num_res_blocks=1",
    "--attn_resolutions=[]",
    "--valid_separation_options={sampler: pc, num_steps: 1}",
    "--separation_options={sampler: pc, num_steps: 2}",
] + COMMON
# diffsep_small.yaml: the preconditioned noise-conditioned Conv-TasNet
TINY_TCN = [
    "--N=16",
    "--B=8",
    "--H=16",
    "--X=2",
    "--R=1",
    "--emb_dim=8",
    "--valid_separation_options={sampler: ode, num_steps: 2}",
    "--separation_options={sampler: ode, num_steps: 2}",
] + COMMON


# --------------------------------------------------------------------------- fixture data
def _voice(rng, n):
    """A crude voiced "speaker": harmonics of a wobbling f0 under a syllable-rate envelope."""
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 250) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    sig = sum(np.sin(h * phase) / h for h in range(1, 10))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)), 0, None) ** 0.5
    return 0.1 * sig * env + 1e-3 * rng.standard_normal(n)


def write_tiny_wsj0mix(root, seed=0, num_spks=2):
    """Write ``root/wav8k/min/{tr,cv,tt}/{mix,s1,...,s<num_spks>}/*.wav`` with short synthetic mixtures
    (durations 0.6 to 0.8 s; ``num_spks=3``: the WSJ0-3mix layout)."""
    rng = np.random.default_rng(seed)
    for split, count in (("tr", N_TRAIN), ("cv", N_VALID), ("tt", N_TEST)):
        for i in range(count):
            n = int(SR * rng.uniform(0.6, 0.8))
            srcs = [_voice(rng, n) for _ in range(num_spks)]
            name = f"{split}{i:02d}.wav"
            for sub, sig in [(f"s{k + 1}", x) for k, x in enumerate(srcs)] + [("mix", sum(srcs))]:
                folder = root / "wav8k" / "min" / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(folder / name, sig.astype(np.float32), SR, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return write_tiny_wsj0mix(tmp_path_factory.mktemp("tiny_wsj0mix"))


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _train_cmd(hparams, data, out, extra=(), nproc=1, recipe=RECIPE):
    """The command line of ``recipe``'s train.py (the other recipe tests pass their own folder)."""
    args = [str(recipe / "hparams" / hparams), f"--data_folder={data}", f"--output_folder={out}", *extra]
    if nproc == 1:
        return [sys.executable, str(recipe / "train.py"), *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={nproc}", str(recipe / "train.py"), *args, "--distributed_backend=gloo",
    ]


def _kill_tree(proc):
    """SIGKILL ``proc`` and every process below it (torchrun's workers run in sessions of their own)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()


def _start(cmd, env=None):
    """Start ``cmd`` (one torch thread, like every recipe run here) with its pipes; see :func:`_finish`."""
    return subprocess.Popen(
        cmd, env={**_env(), **(env or {})}, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc, timeout=240, returncode=0):
    """Wait for a started command, pipes drained while it runs; on timeout kill the whole tree and fail."""
    cmd = proc.args
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s:\n{out[-3000:]}\n{err[-5000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert result.returncode == returncode, (
        f"{' '.join(cmd)} exited {result.returncode}, not {returncode}:\n{out[-3000:]}\n{err[-5000:]}"
    )
    return result


def _stop(proc):
    """Kill a started command's whole tree if it still runs; returns its drained ``(stdout, stderr)``."""
    if proc.poll() is None:
        _kill_tree(proc)
    return proc.communicate()


def _run(cmd, timeout=240, env=None, returncode=0):
    """Run ``cmd`` to the end (:func:`_start` + :func:`_finish`).

    ``env``: variables added to :func:`_env`'s; ``returncode``: the exit status it must end with."""
    return _finish(_start(cmd, env), timeout, returncode)


def _read_rank_log(path):
    """``(batches, fingerprints)``: [(epoch, step, ids)], {epoch: fingerprint}."""
    batches, prints = [], {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts[0] == "batch":
            batches.append((int(parts[1]), int(parts[2]), parts[3:]))
        elif parts[0] == "epoch_end":
            prints[int(parts[1])] = parts[2]
    return batches, prints


def _read_draws(path):
    """``{"t": {(epoch, step): [t...]}, "crops": {(epoch, step): [start...]}}`` of a rank log."""
    draws = {"t": {}, "crops": {}}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts[0] in draws:
            kind = int if parts[0] == "crops" else float
            draws[parts[0]][(int(parts[1]), int(parts[2]))] = [kind(v) for v in parts[3:]]
    return draws


def _expected_draws(hparams, batches, rank, data_folder, segment, output_folder):
    """What rank ``rank`` must draw for its ``batches`` [(epoch, step, ids)]: each crop from
    ``crop_generator(seed, rank, epoch, id)``, and ``t`` from the rank's
    ``RankGenerator`` through ``losses.draw_training_inputs`` (t depends on no signal value)."""
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_diffsep.brain import RankGenerator, crop_generator
    from speechbrain_diffsep.losses import draw_training_inputs
    from speechbrain_diffsep.recipe import random_crop
    from speechbrain_diffsep.sde import MixingSDE

    with open(RECIPE / "hparams" / hparams) as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(data_folder), "output_folder": str(output_folder)})
    durations = {}
    for i in range(N_TRAIN):
        info = sf.info(str(Path(data_folder) / "wav8k" / "min" / "tr" / "mix" / f"tr{i:02d}.wav"))
        durations[f"tr{i:02d}"] = info.frames / SR
    crops, times = {}, {}
    noise = RankGenerator(hp["seed"], rank=rank).generator
    for epoch, step, ids in batches:
        crops[(epoch, step)] = [random_crop(durations[i], SR, segment, generator=crop_generator(hp["seed"], rank, epoch, i))[0]
                                for i in ids]
        s = torch.zeros(len(ids), hp["num_spks"], segment)
        _, t, _, _, _ = draw_training_inputs(MixingSDE(num_sources=hp["num_spks"]), s, s[:, :1], generator=noise,
                                             **hp["loss_options"])
        times[(epoch, step)] = [float(v) for v in t]
    return {"t": times, "crops": crops}


def _results(out):
    with open(Path(out) / "test" / "test_results.csv") as f:
        return list(csv.DictReader(f))


def _complete_ckpts(save):
    return sorted(p for p in Path(save).glob("CKPT+*") if (p / "complete.ckpt").exists())


# --------------------------------------------------------------------------- yaml checks
def _top_level_keys(path):
    """Top-level keys of a HyperPyYAML file (tags ignored)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return list(yaml.load(Path(path).read_text(), Loader=Loader))


def _used_names(yaml_path):
    """Names referenced by ``!ref <name...>`` in the yaml, by the code, or read by sb.Brain."""
    import speechbrain as sb

    used = set(re.findall(r"<([A-Za-z_]\w*)", Path(yaml_path).read_text()))
    for code in CODE:
        text = code.read_text()
        used |= set(re.findall(r"hparams\.(\w+)", text))
        used |= set(re.findall(r"hparams\[\s*[\"'](\w+)[\"']\s*\]", text))
        used |= set(re.findall(r"getattr\(self\.hparams,\s*[\"'](\w+)[\"']", text))
    used |= set(sb.RunOptions().as_dict())  # run options sb.Brain takes from the yaml
    return used


@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_key_is_used(yaml_path):
    keys = _top_level_keys(yaml_path)
    assert "modules" in keys and "brain_class" in keys
    unused = [k for k in keys if not k.startswith("__") and k not in _used_names(yaml_path)]
    assert unused == [], f"{yaml_path.name}: unused top-level keys {unused}"


@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_builds_its_brain(yaml_path, tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    with open(yaml_path) as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)})
    brain = hp["brain_class"](modules=hp["modules"], opt_class=hp["optimizer"], hparams=hp,
                              run_opts={"device": "cpu"}, checkpointer=hp["checkpointer"])
    expected = "ConvTasNetBrain" if "convtasnet" in yaml_path.name else "DiffSepBrain"
    assert type(brain).__name__ == expected
    assert brain.max_grad_norm == hp["max_grad_norm"] == 5.0
    assert brain.grad_accumulation_factor == hp["grad_accumulation_factor"]
    if expected == "DiffSepBrain":
        assert brain.hparams.sde.num_sources == hp["num_spks"]
        assert "ema" in hp["checkpointer"].recoverables
    if yaml_path.name == "diffsep.yaml":  # the paper's set-up
        n_params = sum(p.numel() for p in hp["score_model"].parameters())
        assert n_params == 65_623_366
        assert (hp["lr"], hp["ema_decay"], hp["batch_size"], hp["grad_accumulation_factor"]) == (2e-4, 0.999, 6, 2)
        assert (hp["segment_seconds"], hp["sample_rate"], hp["loss_options"]["p_T"], hp["sde"].t_eps) == (5.0, 8000, 0.1, 0.03)
        assert hp["separation_options"] == {"sampler": "pc", "num_steps": 30, "snr": 0.5, "corrector_steps": 1}


def test_key_checker_catches_an_unused_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text((RECIPE / "hparams" / "diffsep_small_paper.yaml").read_text() + "\nnot_read_anywhere: 3\n")
    keys = _top_level_keys(path)
    assert "not_read_anywhere" in keys and "not_read_anywhere" not in _used_names(path)


GPU_YAMLS = {"WSJ0Mix/separation/hparams/diffsep.yaml", "WSJ0Mix/separation/hparams/diffsep_tcn.yaml",
             "WSJ0Mix/separation/hparams/convtasnet.yaml", "LibriMix/separation/hparams/diffsep.yaml",
             "LibriMix/separation/hparams/eval_wsj0mix_model.yaml", "Voicebank/enhance/hparams/diffsep.yaml"}
ALL_YAMLS = sorted(p for p in (ROOT / "recipes").glob("*/*/hparams/*.yaml") if "MiniMix" not in p.parts)


def _plain_yaml(path):
    """The yaml's values with tags ignored (``!ref <x>`` -> ``"<x>"``), without building anything."""

    class Loader(yaml.SafeLoader):
        pass

    def untagged(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        return None

    Loader.add_multi_constructor("!", untagged)
    return yaml.load(Path(path).read_text(), Loader=Loader)


@pytest.mark.parametrize("yaml_path", ALL_YAMLS, ids=[str(p.relative_to(ROOT / "recipes")) for p in ALL_YAMLS])
def test_gpu_yamls_load_in_parallel_into_pinned_memory_and_every_yaml_has_allow_tf32(yaml_path):
    hp = _plain_yaml(yaml_path)
    assert hp["allow_tf32"] is True  # SpeechBrain's default, now a visible choice
    # GPU yamls read in worker processes into pinned memory, the CPU-sized ones in the main process
    assert hp["pin_memory"] is (hp["num_workers"] > 0)
    if str(yaml_path.relative_to(ROOT / "recipes")) in GPU_YAMLS:
        assert hp["num_workers"] >= 4
    if "_small" in yaml_path.name:
        assert hp["num_workers"] == 0
    loaders = [k for k in hp if k.endswith("_dataloader_opts")]
    assert loaders
    for key in loaders:
        assert (hp[key]["num_workers"], hp[key]["pin_memory"]) == ("<num_workers>", "<pin_memory>"), key


def test_allow_tf32_on_the_command_line_reaches_the_brain(data_folder, tmp_path):
    from speechbrain_diffsep.recipe import build_brain, load_recipe_hparams

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for value in (False, True):
            argv = [str(RECIPE / "hparams" / "convtasnet_small.yaml"), f"--data_folder={data_folder}",
                    f"--output_folder={tmp_path}", f"--allow_tf32={value}", "--device=cpu", "--pin_memory=True"]
            _, hp, run_opts, _ = load_recipe_hparams(argv)
            assert hp["train_dataloader_opts"]["pin_memory"] is True
            build_brain(hp, run_opts)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (value, value)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _train_module():
    return load_script(RECIPE.relative_to(ROOT) / "train.py", "wsj0mix_train")


@pytest.mark.parametrize("hparams", ["diffsep_small.yaml", "diffsep_small_paper.yaml", "convtasnet_small.yaml"])
def test_unknown_command_line_key_is_a_clear_error(hparams, data_folder, tmp_path):
    train = _train_module()
    argv = [str(RECIPE / "hparams" / hparams), f"--data_folder={data_folder}", "--numbr_of_epochs=3"]
    from speechbrain_diffsep.recipe import RecipeError

    with pytest.raises(RecipeError, match="unknown hyperparameter --numbr_of_epochs"):
        train.main(argv)
    if hparams != "diffsep_small.yaml":
        return  # the command line prints the same RecipeError for every yaml: checked once
    # on the command line: one line, no traceback
    proc = subprocess.run([sys.executable, str(RECIPE / "train.py")] + argv, env=_env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown hyperparameter --numbr_of_epochs")


def test_an_option_given_twice_is_a_clear_error(data_folder):
    from speechbrain_diffsep.recipe import RecipeError, load_recipe_hparams

    argv = [str(RECIPE / "hparams" / "diffsep_small.yaml"), f"--data_folder={data_folder}", "--lr=0.1", "--lr=0.2"]
    with pytest.raises(RecipeError, match=r"^--lr is given twice on the command line; keep one$"):
        load_recipe_hparams(argv)
    # a SpeechBrain run option (argparse) may be repeated: the last one wins
    _, _, run_opts, _ = load_recipe_hparams(argv[:2] + ["--ckpt_interval_minutes=5", "--ckpt_interval_minutes=0"])
    assert run_opts["ckpt_interval_minutes"] == 0


def test_missing_data_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no_such_wsj0mix"
    cmd = _train_cmd("diffsep_small.yaml", missing, tmp_path / "out")
    proc = subprocess.run(cmd, env=_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data_folder") and str(missing) in last


# --------------------------------------------------------------------------- DDP
def test_two_process_ddp_trains_disjoint_examples_to_identical_weights(data_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = _run(_train_cmd("diffsep_small_paper.yaml", data_folder, out, TINY_DIFFSEP + ["--number_of_epochs=1"], nproc=2))
    # every rank exited 0 (torchrun returned 0) and none aborted in a destructor at exit
    assert "terminate called" not in proc.stdout + proc.stderr
    b0, p0 = _read_rank_log(out / "rank_logs" / "rank0.txt")
    b1, p1 = _read_rank_log(out / "rank_logs" / "rank1.txt")
    ids0 = [i for _, _, ids in b0 for i in ids]
    ids1 = [i for _, _, ids in b1 for i in ids]
    assert len(b0) == len(b1) == N_TRAIN // 2 // 2  # 2 ranks, batch 2
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == [f"tr{i:02d}" for i in range(N_TRAIN)]
    # different data on each rank, yet the same weights: the gradients were all-reduced
    assert p0 == p1 and set(p0) == {1}
    assert len(list((out / "save").glob("CKPT+*"))) == 1
    assert len(list(out.rglob("test_results.csv"))) == 1
    rows = _results(out)
    assert sorted(r["ID"] for r in rows) == ["avg", "tt00", "tt01"]
    # each rank drew its own diffusion noise and crops (issue 13.1): the logged t and crop offsets
    # are those of the rank's own generators, and the two ranks' t differ at every step
    d0, d1 = _read_draws(out / "rank_logs" / "rank0.txt"), _read_draws(out / "rank_logs" / "rank1.txt")
    for rank, batches, draws in ((0, b0, d0), (1, b1, d1)):
        expected = _expected_draws("diffsep_small_paper.yaml", batches, rank, data_folder, segment=SR // 2,
                                   output_folder=tmp_path / f"expected{rank}")
        assert draws["crops"] == expected["crops"], rank
        assert set(draws["t"]) == set(expected["t"]) == {(e, s) for e, s, _ in batches}
        for key, ts in draws["t"].items():
            np.testing.assert_allclose(ts, expected["t"][key], rtol=0, atol=1e-7)
    assert all(d0["t"][key] != d1["t"][key] for key in d0["t"])
    # the generators' states of both ranks are in the checkpoint (resume continues each stream)
    (ckpt,) = (out / "save").glob("CKPT+*")
    states = torch.load(ckpt / "noise_rng.ckpt", weights_only=True)["states"]
    assert sorted(states) == [0, 1] and not torch.equal(states[0], states[1])


# --------------------------------------------------------------------------- kill and resume
def test_sigkill_then_resume_continues_from_the_checkpoint(data_folder, tmp_path):
    out = tmp_path / "resume"
    cmd = _train_cmd(
        "diffsep_small.yaml", data_folder, out,
        TINY_TCN + ["--number_of_epochs=3", "--ckpt_interval_minutes=0", "--ckpt_interval_steps=1"],
    )
    log = out / "rank_logs" / "rank0.txt"
    proc = subprocess.Popen(cmd, env=_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not _complete_ckpts(out / "save"):
            assert proc.poll() is None, f"training ended before a checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    # what the restart must load: the latest complete checkpoint
    ckpt = max(_complete_ckpts(out / "save"), key=lambda p: yaml.safe_load((p / "CKPT.yaml").read_text())["unixtime"])
    meta = yaml.safe_load((ckpt / "CKPT.yaml").read_text())
    epoch = int((ckpt / "counter.ckpt").read_text())
    step = yaml.safe_load((ckpt / "brain.ckpt").read_text())["step"]
    steps_per_epoch = N_TRAIN // 2  # batch 2, drop_last
    last_of_epoch = meta["end-of-epoch"] or step == steps_per_epoch
    expected = (epoch + 1, 1) if last_of_epoch else (epoch, step + 1)
    before, _ = _read_rank_log(log)

    _run(cmd)
    after, prints = _read_rank_log(log)
    resumed = after[len(before):]
    assert (resumed[0][0], resumed[0][1]) == expected
    killed = {(e, s): ids for e, s, ids in before}
    if expected in killed:  # the killed run had started that batch: the resumed one is the same
        assert resumed[0][2] == killed[expected]
    assert resumed[-1][0] == 3 and set(prints) >= {3}
    assert sorted(r["ID"] for r in _results(out)) == ["avg", "tt00", "tt01"]


# --------------------------------------------------------------------------- deterministic stop and resume
STOP_ENV = "DIFFSEP_STOP_AFTER_STEP"  # brain.StopAfterStep: test-only, exit status 75 after a checkpoint


def _without(args, *keys):
    return [a for a in args if not any(a.startswith(f"--{k}=") for k in keys)]


def _final_checkpoint(save):
    """The last end-of-epoch checkpoint (highest epoch) of a run's ``save`` folder."""
    ends = [p for p in _complete_ckpts(save) if yaml.safe_load((p / "CKPT.yaml").read_text())["end-of-epoch"]]
    return max(ends, key=lambda p: int((p / "counter.ckpt").read_text()))


def _bits(x):
    return x.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_same(a, b, where):
    """Equal nested containers; tensors bit for bit (dtype, shape and every byte)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(_bits(a), _bits(b)), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_checkpoint(ckpt, ref):
    """Every recoverable of two checkpoints equal (weights, EMA, optimizer, scheduler, noise generator,
    epoch counter, the Brain's step counters, loader position) and their meta but the time; returns
    the file names."""
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    for name in names:
        if name == "CKPT.yaml":
            a, b = (yaml.safe_load((c / name).read_text()) for c in (ckpt, ref))
            a.pop("unixtime"), b.pop("unixtime")
        else:
            try:  # torch files (weights_only=False: the scheduler's state is a plain pickle of our own run)
                a, b = (torch.load(c / name, map_location="cpu", weights_only=False) for c in (ckpt, ref))
            except Exception:  # text: counter, brain (step, avg_train_loss, optimizer_step), loader position
                a, b = ((c / name).read_text() for c in (ckpt, ref))
        _assert_same(a, b, name)
    return names


def _log_lines(path, kinds=("batch", "crops", "t", "loss", "epoch_end")):
    return [line for line in Path(path).read_text().splitlines() if line.split()[0] in kinds]


def test_a_run_stopped_mid_epoch_and_at_an_epoch_end_resumes_bit_for_bit(data_folder, tmp_path, request):
    """DIFFSEP_STOP_AFTER_STEP stops the recipe deterministically (exit 75) right after a checkpoint;
    rerunning the same command resumes. Stopped after step 3 of 4 (intra-epoch checkpoint: the loader
    position, the training-noise generator, EMA and Adam states mid-epoch), then after step 4 (no
    intra-epoch checkpoint follows it: the end-of-epoch checkpoint after validation), then run to the
    end, it logs the same batches, diffusion times and per-step losses (exact float repr), the same
    epoch losses, ends with the same weights, EMA, optimizer and generator states (bit for bit,
    fp32 on CPU, fixed seeds, num_workers 0) and the same test scores as an uninterrupted run.

    The utterances (0.6 to 0.8 s) get random 0.5 s crops: each example's crop comes from its own
    generator (seed, rank, epoch, ID), so the resumed run draws the same crops although SpeechBrain
    skips the batches already done without reading them.
    """
    args = _without(TINY_TCN, "test_metrics", "segment_seconds") + [
        "--test_metrics=[si_sdr]", "--segment_seconds=0.5", "--number_of_epochs=2", "--ckpt_interval_steps=3",
    ]
    ref, out = tmp_path / "uninterrupted", tmp_path / "stopped"
    # the uninterrupted run goes on beside the stopped one (one thread each, independent folders)
    uninterrupted = _start(_train_cmd("diffsep_small.yaml", data_folder, ref, args))
    request.addfinalizer(lambda: _stop(uninterrupted))
    cmd = _train_cmd("diffsep_small.yaml", data_folder, out, args)
    log = out / "rank_logs" / "rank0.txt"

    first = _run(cmd, env={STOP_ENV: "3"}, returncode=75)
    assert first.stderr.strip().splitlines()[-1].startswith("stopped: stopped after optimizer step 3")
    (ckpt,) = _complete_ckpts(out / "save")  # the intra-epoch checkpoint after step 3, nothing later
    assert yaml.safe_load((ckpt / "brain.ckpt").read_text())["step"] == 3
    assert (ckpt / "dataloader-TRAIN.ckpt").read_text() == "3"
    assert [ln.split()[:3] for ln in _log_lines(log, ("loss",))] == [["loss", "1", str(s)] for s in (1, 2, 3)]

    second = _run(cmd, env={STOP_ENV: "4"}, returncode=75)  # resumes at step 3: armed, stops after epoch 1
    assert second.stderr.strip().splitlines()[-1].startswith("stopped: stopped after optimizer step 4")
    end = _final_checkpoint(out / "save")
    assert (end / "counter.ckpt").read_text() == "1"
    assert [ln.split()[:3] for ln in _log_lines(log, ("loss",))][3:] == [["loss", "1", "4"]]

    _run(cmd, env={STOP_ENV: "4"})  # the same command again: resumes at step 4 >= 4, the hook is inert
    _finish(uninterrupted)
    losses = _log_lines(log, ("loss",))
    assert len(losses) == 8 and losses == _log_lines(ref / "rank_logs" / "rank0.txt", ("loss",))
    assert _log_lines(log) == _log_lines(ref / "rank_logs" / "rank0.txt")

    epochs = [ln for ln in (out / "train_log.txt").read_text().splitlines() if ln.startswith("epoch")]
    assert len(epochs) == 2 and epochs == [
        ln for ln in (ref / "train_log.txt").read_text().splitlines() if ln.startswith("epoch")
    ]
    a, b = _final_checkpoint(out / "save"), _final_checkpoint(ref / "save")
    names = _assert_same_checkpoint(a, b)
    assert {"score_model.ckpt", "ema.ckpt", "optimizer.ckpt", "noise_rng.ckpt", "counter.ckpt", "brain.ckpt"} <= set(names)
    assert _results(out) == _results(ref)


# --------------------------------------------------------------------------- three speakers
def test_three_speakers_train_and_test_through_the_recipe(tmp_path):
    """A tiny WSJ0-3mix layout (s1, s2, s3) with --num_spks=3: the CSVs have s3_wav, training batches
    and the test stage carry three sources, the estimates of the 3 sources are written and scored."""
    data = write_tiny_wsj0mix(tmp_path / "wsj0-3mix", num_spks=3)
    out = tmp_path / "k3"
    args = _without(TINY_TCN, "test_metrics") + ["--test_metrics=[si_sdr,si_sdri]", "--num_spks=3",
                                                 "--number_of_epochs=1", "--save_audio=True"]
    _run(_train_cmd("diffsep_small.yaml", data, out, args))
    with open(out / "save" / "train.csv") as f:
        assert {"s1_wav", "s2_wav", "s3_wav"} <= set(next(csv.DictReader(f)))
    rows = _results(out)
    assert sorted(r["ID"] for r in rows) == ["avg", "tt00", "tt01"]
    assert all(np.isfinite(float(r[f"si_sdr_s{k}"])) for r in rows if r["ID"] != "avg" for k in (1, 2, 3))
    audio = out / "test" / "audio"
    assert sorted(p.name for p in audio.glob("tt00_*")) == ["tt00_mix.wav", "tt00_s1hat.wav", "tt00_s2hat.wav",
                                                            "tt00_s3hat.wav"]
    est = sum(sf.read(audio / f"tt00_s{k}hat.wav", dtype="float64")[0] for k in (1, 2, 3))
    assert est.shape == sf.read(audio / "tt00_mix.wav")[0].shape
    batches, prints = _read_rank_log(out / "rank_logs" / "rank0.txt")
    assert len(batches) == N_TRAIN // 2 and set(prints) == {1}
    meta = yaml.safe_load((_final_checkpoint(out / "save") / "CKPT.yaml").read_text())
    assert np.isfinite(meta["si_sdr"]) and np.isfinite(meta["loss"])  # validation separated 3 sources


# --------------------------------------------------------------------------- flow matching
def test_flow_small_trains_tests_and_its_estimates_sum_to_the_mixture(data_folder, tmp_path):
    """flow_small.yaml (objective: flow) through train.py: training, validation and the test stage with
    the flow sampler; the separated signals written by the test stage sum to the mixture."""
    out = tmp_path / "flow"
    tiny = [a.replace("ode", "heun") for a in TINY_TCN] + ["--number_of_epochs=1", "--save_audio=True"]
    _run(_train_cmd("flow_small.yaml", data_folder, out, tiny))
    assert sorted(r["ID"] for r in _results(out)) == ["avg", "tt00", "tt01"]
    audio = out / "test" / "audio"
    est = [sf.read(audio / f"tt00_s{k}hat.wav", dtype="float64")[0] for k in (1, 2)]
    mix = sf.read(audio / "tt00_mix.wav", dtype="float64")[0]
    assert np.abs(est[0] + est[1] - mix).max() < 2e-3 * np.abs(mix).max()
    assert np.abs(est[0] - est[1]).max() > 1e-2 * np.abs(mix).max()  # two different signals


# --------------------------------------------------------------------------- Conv-TasNet
def test_convtasnet_small_trains_and_is_tested_like_diffsep(data_folder, tmp_path):
    out = tmp_path / "ctn"
    tiny = ["--N=16", "--B=8", "--H=16", "--X=2", "--R=1", "--segment_seconds=0.5", "--batch_size=2",
            "--number_of_epochs=2", "--test_metrics=[si_sdr,si_sdri,pesq,estoi]", "--device=cpu",
            "--noprogressbar", "--ckpt_interval_minutes=0"]
    _run(_train_cmd("convtasnet_small.yaml", data_folder, out, tiny))
    rows = _results(out)
    assert sorted(r["ID"] for r in rows) == ["avg", "tt00", "tt01"]
    for col in ("si_sdr", "si_sdri", "pesq", "estoi"):
        assert all(np.isfinite(float(r[col])) for r in rows), col
    ckpts = list((out / "save").glob("CKPT+*"))
    assert ckpts and all((c / "masknet.ckpt").exists() and (c / "lr_scheduler.ckpt").exists() for c in ckpts)
    log = (out / "train_log.txt").read_text()
    assert "epoch: 2" in log and "test si_sdr" in log


# --------------------------------------------------------------------------- fine-tuning (init_from) and restart_p
BUNDLED_SMALL = ROOT / "pretrained" / "diffsep-small-minimix"


def _small_brain(data, out, *extra):
    from speechbrain_diffsep.recipe import build_brain, load_recipe_hparams

    argv = [str(RECIPE / "hparams" / "diffsep_small.yaml"), f"--data_folder={data}", f"--output_folder={out}",
            "--device=cpu", *extra]
    _, hp, run_opts, _ = load_recipe_hparams(argv)
    return build_brain(hp, run_opts)


def test_init_from_loads_the_weights_and_ema_unless_a_checkpoint_can_be_resumed(data_folder, tmp_path):
    """``init_from_model_folder``: the score model and the EMA (n_averaged = 1) get the folder's weights; once the
    run has a complete checkpoint it resumes from that and the folder is not read (not even checked)."""
    from speechbrain_diffsep.recipe import init_from_model_folder

    bundled = torch.load(BUNDLED_SMALL / "score_model.ckpt")
    brain = _small_brain(data_folder, tmp_path / "ft")
    assert not all(torch.equal(brain.modules.score_model.state_dict()[k], v) for k, v in bundled.items())
    assert init_from_model_folder(brain, str(BUNDLED_SMALL), str(tmp_path / "ft" / "init_from")) is True
    for state in (brain.modules.score_model.state_dict(), brain.ema.module.state_dict()):
        assert state.keys() == bundled.keys() and all(torch.equal(state[k], v) for k, v in bundled.items())
    assert int(brain.ema.n_averaged) == 1
    brain.checkpointer.save_checkpoint()
    again = _small_brain(data_folder, tmp_path / "ft")
    before = {k: v.clone() for k, v in again.modules.score_model.state_dict().items()}
    assert init_from_model_folder(again, str(tmp_path / "no_such_folder"), str(tmp_path / "x")) is False
    assert all(torch.equal(again.modules.score_model.state_dict()[k], v) for k, v in before.items())


def test_init_from_errors_name_the_key_and_the_fix(data_folder, tmp_path):
    from speechbrain_diffsep.recipe import RecipeError, init_from_model_folder

    brain = _small_brain(data_folder, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"^init_from '.*no_such' does not exist; pass --init_from=<a model folder"):
        init_from_model_folder(brain, str(tmp_path / "no_such"), str(tmp_path / "a" / "init_from"))
    tiny = _small_brain(data_folder, tmp_path / "b", "--N=16", "--B=8", "--H=16", "--X=2", "--R=1", "--emb_dim=8")
    with pytest.raises(RecipeError, match=r"^init_from '.*diffsep-small-minimix': its network does not match the "
                                          r"yaml's \(.*shape mismatches.*\); use a model trained with the same yaml sizes$"):
        init_from_model_folder(tiny, str(BUNDLED_SMALL), str(tmp_path / "b" / "init_from"))


def test_fine_tuning_from_the_bundled_folder_with_restart_states_through_the_recipe(data_folder, tmp_path):
    """``--init_from=<model folder> --restart_p=0.5`` on the command line: training starts from the folder's weights
    (with lr = 0 they stay bit for bit, EMA included), the restart-aware loss runs, the test stage separates."""
    out = tmp_path / "ft"
    args = _without(COMMON, "log_rank_activity", "test_metrics") + [
        "--test_metrics=[si_sdr]", "--number_of_epochs=1", "--lr=0.0", "--restart_p=0.5",
        f"--init_from={BUNDLED_SMALL}"]
    proc = _run(_train_cmd("diffsep_small.yaml", data_folder, out, args))
    assert "init_from: training starts from the weights of" in proc.stderr
    ckpt = _final_checkpoint(out / "save")
    bundled = torch.load(BUNDLED_SMALL / "score_model.ckpt")
    trained = torch.load(ckpt / "score_model.ckpt")
    ema = {k[len("module."):]: v for k, v in torch.load(ckpt / "ema.ckpt").items() if k.startswith("module.")}
    for state in (trained, ema):
        assert all(torch.equal(state[k], v) for k, v in bundled.items())
    assert np.isfinite(yaml.safe_load((ckpt / "CKPT.yaml").read_text())["loss"])
    assert np.isfinite(float(_results(out)[-1]["si_sdr"]))
