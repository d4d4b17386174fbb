"""DiffSepBrain / ConvTasNetBrain in-process: training steps, EMA, clipping, AMP, checkpoints, test stage."""

import csv
import importlib.util
import shutil

import pytest
import torch
import yaml

import speechbrain as sb
import speechbrain_diffsep.brain as brain_module
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.lobes.models.conv_tasnet import Decoder, Encoder, MaskNet
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.epoch_loop import EpochCounter
from speechbrain.utils.train_logger import FileTrainLogger
from speechbrain_diffsep.brain import (
    COMPLETE_MARKER,
    ConvTasNetBrain,
    DataWorkerInit,
    DiffSepBrain,
    RankGenerator,
    ShardSampler,
    data_generator,
    parameter_fingerprint,
    remove_incomplete_checkpoints,
    seed_data_generator,
)
from speechbrain_diffsep.ncsnpp import ScoreModel
from speechbrain_diffsep.sde import MixingSDE

SR = 8000
HAS_DNSMOS = importlib.util.find_spec("speechmos") is not None


def tiny_score_model(num_sources=2):
    return ScoreModel(num_sources=num_sources, nf=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())


def example(i, n=2400, num_sources=2):
    """Deterministic voiced-like sources (harmonics under a syllable envelope) and their mixture."""
    t = torch.arange(n) / SR
    srcs = []
    for k in range(num_sources):
        f0 = 110.0 + 37.0 * k + 11.0 * i
        env = torch.sin(2 * torch.pi * (2.5 + k + 0.3 * i) * t).clamp(min=0) ** 0.5
        srcs.append(0.1 * env * sum(torch.sin(2 * torch.pi * h * f0 * t) / h for h in range(1, 6)))
    out = {f"s{k + 1}_sig": s for k, s in enumerate(srcs)}
    out["mix_sig"] = sum(srcs)
    return out


def batch_of(ids, n=2400, num_sources=2):
    return PaddedBatch([{"id": f"u{i}", **example(i, n, num_sources)} for i in ids])


def dataset(ids, n=2400, num_sources=2):
    keys = ["id", "mix_sig"] + [f"s{k + 1}_sig" for k in range(num_sources)]
    return DynamicItemDataset({f"u{i}": example(i, n, num_sources) for i in ids}, output_keys=keys)


def make_brain(tmp_path, kind="diffsep", run_opts=None, opt_class=None, epochs=1, **hp):
    """A brain built like train.py does from the yaml, with a tiny network."""
    counter = EpochCounter(epochs)
    hparams = dict(
        num_spks=2,
        sample_rate=SR,
        seed=0,
        output_folder=str(tmp_path),
        results_folder=str(tmp_path / "test"),
        keep_checkpoints=1,
        save_audio=False,
        test_metrics=["si_sdr", "si_sdri", "pesq", "estoi", "dnsmos"],
        train_logger=FileTrainLogger(str(tmp_path / "train_log.txt")),
        epoch_counter=counter,
        log_rank_activity=False,
    )
    k = int(hp.get("num_spks", 2))
    if kind == "diffsep":
        torch.manual_seed(0)
        model = tiny_score_model(k)
        modules = {"score_model": model}
        hparams.update(
            sde=MixingSDE(num_sources=k),
            loss_options={"p_T": 0.1},
            ema_decay=0.9,
            n_valid_separations=1,
            separation_options={"sampler": "pc", "num_steps": 2},
            valid_separation_options={"sampler": "pc", "num_steps": 1},
        )
    else:
        torch.manual_seed(0)
        modules = {"encoder": Encoder(16, 32), "masknet": MaskNet(32, 16, 32, 3, 2, 1, k), "decoder": Decoder(16, 32)}
    hparams.update(hp)
    ckpt = Checkpointer(str(tmp_path / "save"), recoverables={**modules, "counter": counter})
    opts = {"device": "cpu", "noprogressbar": True, **(run_opts or {})}
    cls = DiffSepBrain if kind == "diffsep" else ConvTasNetBrain
    return cls(
        modules=modules,
        opt_class=opt_class or (lambda p: torch.optim.Adam(p, lr=2e-3)),
        hparams=hparams,
        run_opts=opts,
        checkpointer=ckpt,
    )


def train_steps(brain, batch, n, reseed=True):
    """``n`` calls of ``fit_batch`` as ``sb.Brain._fit_train`` makes them; returns the losses."""
    brain.modules.train()
    losses = []
    for _ in range(n):
        if reseed:  # same t, z, permutation every step: a deterministic objective
            torch.manual_seed(123)
            if hasattr(brain, "noise_rng"):  # DiffSep draws them from its per-rank generator
                brain.noise_rng.generator.manual_seed(123)
        brain.step += 1
        losses.append(float(brain.fit_batch(batch)))
    return losses


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind,steps,factor", [("diffsep", 25, 0.5), ("convtasnet", 25, 0.8)])
def test_loss_goes_down_on_a_fixed_batch(tmp_path, kind, steps, factor):
    brain = make_brain(tmp_path, kind)
    brain.on_fit_start()
    losses = train_steps(brain, batch_of([0, 1]), steps)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # SI-SNR losses are negative dB: compare the improvement, not the ratio
    if kind == "diffsep":
        assert losses[-1] < factor * losses[0], losses
    else:
        assert losses[-1] < losses[0] - 1.0, losses


def test_ema_is_updated_once_per_optimizer_step_with_accumulation(tmp_path):
    brain = make_brain(tmp_path, run_opts={"grad_accumulation_factor": 2}, ema_decay=0.9)
    brain.on_fit_start()
    batch = batch_of([0, 1])
    w0 = params(brain.modules.score_model)
    train_steps(brain, batch, 1, reseed=False)
    assert all(torch.equal(a, b) for a, b in zip(w0, params(brain.modules.score_model))), "stepped too early"
    assert int(brain.ema.n_averaged) == 0
    train_steps(brain, batch, 1, reseed=False)
    w1 = params(brain.modules.score_model)
    assert int(brain.ema.n_averaged) == 1
    assert all(torch.equal(a, b) for a, b in zip(w1, params(brain.ema.module)))  # first update copies
    train_steps(brain, batch, 2, reseed=False)
    w2 = params(brain.modules.score_model)
    assert int(brain.ema.n_averaged) == 2
    for e, a, b in zip(params(brain.ema.module), w1, w2):
        assert torch.allclose(e, 0.9 * a + 0.1 * b, atol=1e-6)


def test_gradient_norm_is_clipped_to_max_grad_norm(tmp_path):
    brain = make_brain(
        tmp_path, run_opts={"max_grad_norm": 1e-3}, opt_class=lambda p: torch.optim.SGD(p, lr=1.0)
    )
    brain.on_fit_start()
    w0 = params(brain.modules.score_model)
    train_steps(brain, batch_of([0, 1]), 1)
    update = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params(brain.modules.score_model), w0)))
    assert float(update) == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_runs_only_the_network_in_bf16(tmp_path):
    """bf16 loss is finite, float32, and within 5% of the float32 loss (same weights, t, noise).

    The weights are perturbed away from the zero-initialized output layers so that the network
    output matters (measured difference: about 1%).
    """
    losses, seen = {}, {}
    for precision in ("fp32", "bf16"):
        brain = make_brain(tmp_path / precision, run_opts={"precision": precision})
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in brain.modules.score_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        conv = next(m for m in brain.modules.score_model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o, p=precision: seen.setdefault(p, o.dtype) and None)
        batch = batch_of([0, 1])
        torch.manual_seed(8)
        with brain.training_ctx:
            loss = brain.compute_objectives(brain.compute_forward(batch, sb.Stage.TRAIN), batch, sb.Stage.TRAIN)
        assert loss.dtype == torch.float32
        losses[precision] = float(loss.detach())
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert torch.isfinite(torch.tensor(losses["bf16"]))
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)


# --------------------------------------------------------------------------- evaluation uses the EMA
def test_separation_uses_the_ema_weights(tmp_path):
    brain = make_brain(tmp_path)
    mix = batch_of([0]).mix_sig.data[:, None]
    est = brain.separate(mix, ["u0"], sb.Stage.TEST)
    with torch.no_grad():
        for p in brain.modules.score_model.parameters():
            p.mul_(0.5)
    assert torch.equal(brain.separate(mix, ["u0"], sb.Stage.TEST), est)  # raw weights unused
    with torch.no_grad():
        for p in brain.ema.module.parameters():
            p.mul_(0.5)
    assert not torch.allclose(brain.separate(mix, ["u0"], sb.Stage.TEST), est)


# --------------------------------------------------------------------------- fit / checkpoint / test
def test_fit_checkpoints_ema_and_test_stage_writes_every_metric(tmp_path):
    brain = make_brain(tmp_path, epochs=2, save_audio=True)
    brain.fit(brain.hparams.epoch_counter, dataset([0, 1]), dataset([2]),
              train_loader_kwargs={"batch_size": 2}, valid_loader_kwargs={"batch_size": 1})
    ckpts = sorted((tmp_path / "save").glob("CKPT+*"))
    assert 1 <= len(ckpts) <= 2  # the latest and the best by valid SI-SDR
    for ckpt in ckpts:
        meta = yaml.safe_load((ckpt / "CKPT.yaml").read_text())
        assert {"si_sdr", "loss"} <= set(meta)
        for name in ("score_model", "ema", "noise_rng", "optimizer", "counter", "brain", COMPLETE_MARKER):
            assert (ckpt / f"{name}.ckpt").exists(), name
        ema = torch.load(ckpt / "ema.ckpt")
        raw = torch.load(ckpt / "score_model.ckpt")
        assert set(ema) == {f"module.{k}" for k in raw} | {"n_averaged"}
        assert int(ema["n_averaged"]) == int((ckpt / "counter.ckpt").read_text())  # 1 step per epoch

    # a fresh process testing only: the best checkpoint by validation SI-SDR, EMA weights included
    best = max(ckpts, key=lambda c: yaml.safe_load((c / "CKPT.yaml").read_text())["si_sdr"])
    fresh = make_brain(tmp_path, epochs=2)
    fresh.on_evaluate_start(max_key="si_sdr")
    saved = torch.load(best / "ema.ckpt")
    assert all(torch.equal(v, saved[k]) for k, v in fresh.ema.state_dict().items())

    brain.evaluate(dataset([3, 4], n=SR), max_key="si_sdr", test_loader_kwargs={"batch_size": 1})
    with open(tmp_path / "test" / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    expected = ["si_sdr", "si_sdri", "pesq", "estoi"] + (["ovrl", "sig", "bak"] if HAS_DNSMOS else [])
    assert [r["ID"] for r in rows] == ["u3", "u4", "avg"]
    for m in expected:
        vals = [float(r[m]) for r in rows]
        assert all(v == v for v in vals), m
        assert vals[-1] == pytest.approx(sum(vals[:-1]) / 2), m
        assert float(rows[0][m]) == pytest.approx((float(rows[0][f"{m}_s1"]) + float(rows[0][f"{m}_s2"])) / 2)
    with open(tmp_path / "test" / "test_summary.csv") as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert list(summary) == expected
    assert float(summary["si_sdr"]["mean"]) == pytest.approx(float(rows[-1]["si_sdr"]))
    assert all(int(r["count"]) == 2 for r in summary.values())
    assert sorted(p.name for p in (tmp_path / "test" / "audio").iterdir()) == [
        "u3_mix.wav", "u3_s1hat.wav", "u3_s2hat.wav", "u4_mix.wav", "u4_s1hat.wav", "u4_s2hat.wav"
    ]


def test_an_incomplete_checkpoint_is_removed_and_training_resumes_from_the_last_complete_one(tmp_path):
    brain = make_brain(tmp_path, epochs=1)
    brain.fit(brain.hparams.epoch_counter, dataset([0, 1]), dataset([2]),
              train_loader_kwargs={"batch_size": 2}, valid_loader_kwargs={"batch_size": 1})
    (good,) = (tmp_path / "save").glob("CKPT+*")
    fingerprint = parameter_fingerprint(brain.modules.score_model)
    # a later save killed half-way: meta written, weights truncated, no completion marker
    bad = good.with_name(good.name + "-killed")
    shutil.copytree(good, bad)
    (bad / f"{COMPLETE_MARKER}.ckpt").unlink()
    (bad / "score_model.ckpt").write_bytes(b"\x80truncated")
    meta = yaml.safe_load((bad / "CKPT.yaml").read_text())
    meta["unixtime"] += 100
    (bad / "CKPT.yaml").write_text(yaml.dump(meta))

    brain2 = make_brain(tmp_path, epochs=2)
    assert parameter_fingerprint(brain2.modules.score_model) != fingerprint  # fresh weights
    brain2.on_fit_start()
    assert not bad.exists()
    assert brain2.hparams.epoch_counter.current == 1
    assert parameter_fingerprint(brain2.modules.score_model) == fingerprint
    assert remove_incomplete_checkpoints(tmp_path / "save") == []


# --------------------------------------------------------------------------- helpers / errors
@pytest.mark.parametrize("n,world", [(0, 2), (5, 2), (7, 3), (2, 4)])
def test_shard_sampler_partitions_without_padding(n, world):
    shards = [list(ShardSampler(range(n), rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert all(len(ShardSampler(range(n), r, world)) == len(s) for r, s in enumerate(shards))


def test_shard_sampler_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(range(4), rank=2, world_size=2)


def test_sde_with_the_wrong_number_of_sources_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_sources=3 differs from num_spks=2"):
        make_brain(tmp_path, sde=MixingSDE(num_sources=3))


def test_a_batch_without_enough_sources_is_rejected(tmp_path):
    brain = make_brain(tmp_path, num_spks=3, sde=MixingSDE(num_sources=3))
    with pytest.raises(ValueError, match="no s3_sig but num_spks=3"):
        brain.compute_forward(batch_of([0]), sb.Stage.TRAIN)


# --------------------------------------------------------------------------- random draws (issue 13.1)
def _train_loss(brain, batch):
    with torch.no_grad():
        return brain.compute_forward(batch, sb.Stage.TRAIN)


def test_training_noise_comes_from_the_brains_own_generator(tmp_path):
    """t, z, the p_T mask and the shuffle are drawn from ``noise_rng``, not the global RNG."""
    brain = make_brain(tmp_path)
    brain.modules.eval()  # no dropout: the loss depends on the draws only
    batch = batch_of([0, 1, 2, 3])
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        brain.noise_rng.generator.manual_seed(5)
        losses.append(_train_loss(brain, batch))
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(_train_loss(brain, batch), losses[0])  # the stream moves on


def test_rank_generators_differ_by_rank_and_rank_0_is_the_single_process_one():
    single = RankGenerator(1234)  # not distributed: rank 0
    draws = {r: torch.rand(8, generator=RankGenerator(1234, rank=r).generator) for r in range(3)}
    assert torch.equal(torch.rand(8, generator=single.generator), draws[0])
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(torch.rand(8, generator=RankGenerator(1234, rank=1).generator), draws[1])  # deterministic
    assert not torch.equal(torch.rand(8, generator=RankGenerator(99, rank=0).generator), draws[0])


def test_the_training_noise_resumes_from_the_checkpoint_where_it_stopped(tmp_path):
    brain = make_brain(tmp_path)
    brain.on_fit_start()
    train_steps(brain, batch_of([0, 1]), 2, reseed=False)
    brain.checkpointer.save_checkpoint(meta={"loss": 1.0})
    expected = torch.rand(6, generator=brain.noise_rng.generator)  # what the run draws next

    resumed = make_brain(tmp_path)
    fresh_start = torch.rand(6, generator=RankGenerator(0).generator)
    resumed.on_fit_start()
    assert torch.equal(torch.rand(6, generator=resumed.noise_rng.generator), expected)
    assert not torch.equal(expected, fresh_start)


def test_a_checkpoint_of_another_world_size_reseeds_the_noise(tmp_path, caplog):
    gen = RankGenerator(3)
    states = {0: gen.generator.get_state(), 1: RankGenerator(3, rank=1).generator.get_state()}
    torch.save({"purpose": "training noise", "states": states}, tmp_path / "noise.ckpt")
    gen.load(tmp_path / "noise.ckpt")
    assert "2 process(es), this run has 1: reseeding" in caplog.text
    again = RankGenerator(3)
    again.load(tmp_path / "noise.ckpt")
    after = torch.rand(4, generator=gen.generator)
    assert torch.equal(after, torch.rand(4, generator=again.generator))  # still deterministic
    assert not torch.equal(after, torch.rand(4, generator=RankGenerator(3).generator))


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, caplog):
    """A CUDA generator's state (16 bytes: seed and offset) cannot be set on a CPU generator: a run
    trained on a GPU and resumed on a CPU reseeds (deterministically) instead of failing."""
    cuda_like_state = torch.zeros(16, dtype=torch.uint8)
    torch.save({"purpose": "training noise", "states": {0: cuda_like_state}}, tmp_path / "noise.ckpt")
    gen, again = RankGenerator(3), RankGenerator(3)
    gen.load(tmp_path / "noise.ckpt")
    again.load(tmp_path / "noise.ckpt")
    assert "saved for another device than cpu: reseeding" in caplog.text
    after = torch.rand(4, generator=gen.generator)
    assert torch.equal(after, torch.rand(4, generator=again.generator))
    assert not torch.equal(after, torch.rand(4, generator=RankGenerator(3).generator))


def test_training_loaders_seed_their_crops_by_rank_epoch_and_worker(tmp_path):
    brain = make_brain(tmp_path, kind="convtasnet")
    user_calls = []
    train = brain.make_dataloader(dataset([0, 1, 2, 3]), sb.Stage.TRAIN, batch_size=2, pin_memory=True,
                                  worker_init_fn=user_calls.append)
    assert isinstance(train.worker_init_fn, DataWorkerInit) and train.pin_memory
    train.worker_init_fn(1)
    assert user_calls == [1]  # a user's worker_init_fn still runs
    valid = brain.make_dataloader(dataset([0]), sb.Stage.VALID, batch_size=1)
    assert not isinstance(valid.worker_init_fn, DataWorkerInit)
    try:
        brain.on_stage_start(sb.Stage.TRAIN, epoch=3)
        assert train.worker_init_fn.epoch == 3
        got = torch.rand(4, generator=data_generator())  # the main process's crop generator
        assert torch.equal(got, torch.rand(4, generator=seed_data_generator(0, 0, 3)))
        assert not torch.equal(got, torch.rand(4, generator=seed_data_generator(0, 1, 3)))  # another rank
        assert not torch.equal(got, torch.rand(4, generator=seed_data_generator(0, 0, 4)))  # another epoch
        assert not torch.equal(got, torch.rand(4, generator=seed_data_generator(0, 0, 3, worker=0)))
    finally:
        brain_module._DATA_RNG["generator"] = None  # back to the global RNG for the other tests


# --------------------------------------------------------------------------- GPU settings (issue 13.5)
def test_allow_tf32_sets_the_cuda_and_cudnn_flags(tmp_path):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for value in (False, True, False):
            make_brain(tmp_path / str(value), kind="convtasnet", allow_tf32=value)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (value, value)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        make_brain(tmp_path / "absent", kind="convtasnet")  # no key: SpeechBrain's setting is kept
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, False)
        with pytest.raises(ValueError, match="allow_tf32 must be True or False, got 'yes'"):
            make_brain(tmp_path / "bad", kind="convtasnet", allow_tf32="yes")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_batches_move_to_the_device_without_blocking(tmp_path, monkeypatch):
    brain = make_brain(tmp_path, kind="convtasnet")
    calls = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    ids, mix, sources, lengths = brain.batch_signals(batch_of([0, 1]))
    monkeypatch.undo()
    assert len(calls) == 4 and all(calls)  # mixture, its lengths, two sources
    assert mix.shape == (2, 1, 2400) and sources.shape == (2, 2, 2400) and lengths.tolist() == [2400, 2400]


# --------------------------------------------------------------------------- K = 3 (WSJ0-3mix)
@pytest.mark.parametrize("kind", ["diffsep", "convtasnet"])
def test_three_sources_train_separate_and_test(tmp_path, kind):
    """num_spks=3: training steps give finite losses, the estimates have 3 sources, the test stage
    scores and writes s1..s3 (the recipe with a WSJ0-3mix layout: test_recipe_wsj0mix.py)."""
    brain = make_brain(tmp_path, kind, num_spks=3, test_metrics=["si_sdr", "si_sdri"], save_audio=True)
    brain.on_fit_start()
    losses = train_steps(brain, batch_of([0, 1], num_sources=3), 2)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    mix = batch_of([0], num_sources=3).mix_sig.data[:, None]
    assert brain.separate(mix, ["u0"], sb.Stage.TEST).shape == (1, 3, 2400)
    brain.evaluate(dataset([3], n=1600, num_sources=3), test_loader_kwargs={"batch_size": 1})
    with open(tmp_path / "test" / "test_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == ["u3", "avg"]
    assert {f"si_sdr_s{k}" for k in (1, 2, 3)} <= set(rows[0]) and "si_sdr_s4" not in rows[0]
    assert all(float(rows[0][f"si_sdri_s{k}"]) == float(rows[0][f"si_sdri_s{k}"]) for k in (1, 2, 3))  # not NaN
    assert sorted(p.name for p in (tmp_path / "test" / "audio").iterdir()) == [
        "u3_mix.wav", "u3_s1hat.wav", "u3_s2hat.wav", "u3_s3hat.wav"
    ]


# --------------------------------------------------------------------------- reduced precision
def _perturb(module, seed=1, scale=0.05):
    """Move the weights away from the zero-initialized output layers so that the network matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _si_sdr_db(est, ref):
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref * ref).sum(-1, keepdim=True) * ref
    return 10 * torch.log10((proj**2).sum(-1) / ((est - proj) ** 2).sum(-1))


def test_bf16_evaluation_runs_the_samplers_network_in_bf16_with_scores_close_to_fp32(tmp_path):
    """--eval_precision=bf16: in the test stage (SpeechBrain's evaluation autocast, then the Brain's
    network call) the network runs in bf16 and the sampler in float32; the estimates of every SDE
    sampler are finite float32 and close to the fp32 ones, and the test scores are finite and within
    0.5 dB of the fp32 scores."""
    scores, estimates, seen = {}, {}, {}
    mix = batch_of([5]).mix_sig.data[:, None]
    for precision in ("fp32", "bf16"):
        brain = make_brain(tmp_path / precision, run_opts={"eval_precision": precision},
                           test_metrics=["si_sdr", "si_sdri"])
        _perturb(brain.ema.module)
        conv = next(m for m in brain.ema.module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o, p=precision: seen.setdefault(p, set()).add(o.dtype))
        brain.evaluate(dataset([3, 4], n=4000), test_loader_kwargs={"batch_size": 1})  # pc, 2 steps
        scores[precision] = brain.test_summary
        for sampler in ("pc", "em", "ode", "edm", "ddim"):
            brain.hparams.separation_options = {"sampler": sampler, "num_steps": 2}
            with brain.evaluation_ctx, torch.no_grad():
                estimates[precision, sampler] = brain.separate(mix, ["u5"], sb.Stage.TEST)
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    for sampler in ("pc", "em", "ode", "edm", "ddim"):
        low, ref = estimates["bf16", sampler], estimates["fp32", sampler]
        assert low.dtype == torch.float32 and torch.isfinite(low).all(), sampler
        assert not torch.equal(low, ref), sampler  # bf16 did run
        assert float(_si_sdr_db(low, ref).min()) > 20.0, (sampler, _si_sdr_db(low, ref))
    for metric in ("si_sdr", "si_sdri"):
        assert torch.isfinite(torch.tensor(scores["bf16"][metric])), metric
        assert scores["bf16"][metric] == pytest.approx(scores["fp32"][metric], abs=0.5), metric


def test_fp16_training_step_scales_the_loss_and_skips_overflowing_steps(tmp_path):
    """An fp16 training step with gradient scaling, on the CPU.

    SpeechBrain 1.1.2 refuses ``--precision=fp16`` on a CPU (and enables its GradScaler only for
    ``device_type == "cuda"``), so the Brain is built in fp32 and then given what SpeechBrain's
    ``__init__`` sets up for fp16 on a GPU (``precision``, an enabled ``torch.GradScaler``, the fp16
    training autocast, the ``scaler`` recoverable), with the CPU's own fp16 autocast and
    ``torch.GradScaler("cpu")``. Then: the network runs in fp16 (the SDE and loss in float32); the
    loss is scaled for backward and the gradients are unscaled before clipping (the update has the
    clipped norm, not the clipped norm / scale); the EMA follows; a step whose gradients overflow
    is skipped (weights unchanged) and halves the scale; the scale is in the checkpoint.
    """
    from speechbrain.utils.autocast import TorchAutocast

    brain = make_brain(tmp_path, run_opts={"max_grad_norm": 1e-3}, opt_class=lambda p: torch.optim.SGD(p, lr=1.0))
    brain.precision = "fp16"
    brain.scaler = torch.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    brain.training_ctx = TorchAutocast(device_type="cpu", dtype=torch.float16)
    brain.checkpointer.add_recoverable("scaler", brain.scaler, optional_load=True)
    _perturb(brain.modules.score_model)
    assert brain.network_dtype(sb.Stage.TRAIN) == torch.float16
    conv = next(m for m in brain.modules.score_model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scaled = []
    real_scale = brain.scaler.scale
    brain.scaler.scale = lambda loss: scaled.append((loss.dtype, float(loss.detach()))) or real_scale(loss)
    unscaled_grads = []
    real_unscale = brain.scaler.unscale_

    def unscale(opt):
        real_unscale(opt)
        unscaled_grads.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for g in opt.param_groups
                                              for p in g["params"] if p.grad is not None)))

    brain.scaler.unscale_ = unscale
    brain.on_fit_start()
    w0 = params(brain.modules.score_model)
    (loss,) = train_steps(brain, batch_of([0, 1]), 1)
    assert seen and set(seen) == {torch.float16}
    assert scaled == [(torch.float32, pytest.approx(loss))] and torch.isfinite(torch.tensor(loss))
    assert len(unscaled_grads) == 1 and float(unscaled_grads[0]) > 1e-3  # the clipping had work to do
    update = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params(brain.modules.score_model), w0)))
    assert float(update) == pytest.approx(1e-3, rel=1e-3)  # unscaled, then clipped, then stepped
    assert int(brain.ema.n_averaged) == 1
    assert all(torch.equal(a, b) for a, b in zip(params(brain.ema.module), params(brain.modules.score_model)))
    assert brain.scaler.get_scale() == 2.0**10

    w1 = params(brain.modules.score_model)
    real_losses = brain.training_losses
    brain.training_losses = lambda mix, sources: real_losses(mix, sources) * float("inf")
    brain.nonfinite_count = 0  # set by sb.Brain._fit_train at each epoch's start
    train_steps(brain, batch_of([0, 1]), 1)
    assert all(torch.equal(a, b) for a, b in zip(w1, params(brain.modules.score_model)))  # skipped
    assert brain.scaler.get_scale() == 2.0**9
    brain.checkpointer.save_checkpoint()
    (ckpt,) = (tmp_path / "save").glob("CKPT+*")
    assert torch.load(ckpt / "scaler.ckpt", weights_only=True)["scale"] == 2.0**9


# --------------------------------------------------------------------------- deterministic stop and resume
def _fit(brain, train, valid, shuffle=True):
    brain.fit(brain.hparams.epoch_counter, train, valid,
              train_loader_kwargs={"batch_size": 2, "shuffle": shuffle}, valid_loader_kwargs={"batch_size": 1})


def _convtasnet_with_scheduler(folder, epochs, interval):
    from speechbrain.nnet.schedulers import ReduceLROnPlateau

    sched = ReduceLROnPlateau(factor=0.5, patience=0)
    brain = make_brain(folder, "convtasnet", run_opts={"ckpt_interval_steps": interval}, epochs=epochs,
                       lr_scheduler=sched, log_rank_activity=True)
    brain.checkpointer.add_recoverable("lr_scheduler", sched)
    return brain


def _rank_log(folder, kinds=("batch", "loss", "epoch_end")):
    lines = (folder / "rank_logs" / "rank0.txt").read_text().splitlines()
    return [line for line in lines if line.split()[0] in kinds]


@pytest.mark.parametrize(
    "stop,interval",
    [(1, 1), (2, 1), (2, 0)],
    ids=["mid-epoch", "after-the-last-step-of-an-epoch", "end-of-epoch-checkpoint"],
)
def test_a_stopped_convtasnet_resumes_its_scheduler_optimizer_and_data_order_bit_for_bit(tmp_path, monkeypatch,
                                                                                     stop, interval):
    """``DIFFSEP_STOP_AFTER_STEP`` raises ``StopAfterStep`` after the first checkpoint once ``stop``
    optimizer steps are done (2 steps per epoch, shuffled): after an intra-epoch checkpoint mid-epoch or
    after the epoch's last step (the loader is exhausted, validation is still to run), or after the
    end-of-epoch checkpoint. A new Brain resumes (the variable still set: a run that starts at or past
    the step ignores it) and ends like an uninterrupted run: same batches and per-step losses, the
    same weights, Adam state and ReduceLROnPlateau state bit for bit."""
    from speechbrain_diffsep.brain import STOP_AFTER_STEP_ENV, StopAfterStep

    train, valid = dataset([0, 1, 2, 3], n=1600), dataset([4, 5], n=1600)
    ref = _convtasnet_with_scheduler(tmp_path / "ref", 3, interval)
    _fit(ref, train, valid)

    monkeypatch.setenv(STOP_AFTER_STEP_ENV, str(stop))
    first = _convtasnet_with_scheduler(tmp_path / "run", 3, interval)
    with pytest.raises(StopAfterStep, match=f"after optimizer step {stop} "):
        _fit(first, train, valid)
    assert first.optimizer_step == stop
    stopped_at = [ln.split()[1:3] for ln in _rank_log(tmp_path / "run", ("loss",))]
    assert stopped_at == [["1", str(s)] for s in range(1, stop + 1)]
    resumed = _convtasnet_with_scheduler(tmp_path / "run", 3, interval)
    _fit(resumed, train, valid)
    assert resumed.optimizer_step == ref.optimizer_step == 6

    assert _rank_log(tmp_path / "run") == _rank_log(tmp_path / "ref")
    assert len(_rank_log(tmp_path / "run", ("loss",))) == 6
    for name in ("encoder", "masknet", "decoder"):
        for (k, a), (_, b) in zip(resumed.modules[name].state_dict().items(), ref.modules[name].state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k}"
    sa, sb_ = resumed.optimizer.state_dict(), ref.optimizer.state_dict()
    assert sa["param_groups"] == sb_["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb_["state"][i][key]), (i, key)
    a, b = resumed.hparams.lr_scheduler, ref.hparams.lr_scheduler
    assert (a.losses, a.anchor, a.patience_counter) == (b.losses, b.anchor, b.patience_counter)
    assert len(a.losses) == 3
    assert (tmp_path / "run" / "train_log.txt").read_text().count("epoch: 3") == 1


def test_a_mid_epoch_resume_continues_the_crop_stream(tmp_path, monkeypatch):
    """Random training crops (recipe.audio_pipeline, the per-epoch crop generator of the main process)
    of a run stopped after step 1 of 2 (intra-epoch checkpoint) and resumed are those of an
    uninterrupted run."""
    import numpy as np
    import soundfile as sf

    from speechbrain_diffsep.brain import STOP_AFTER_STEP_ENV, StopAfterStep
    from speechbrain_diffsep.recipe import audio_pipeline

    data = {}
    for i in range(4):
        ex = example(i, n=1200)
        row = {"duration": 1200 / SR}
        for key in ("mix", "s1", "s2"):
            path = tmp_path / "wav" / f"u{i}_{key}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, ex[f"{key}_sig"].numpy().astype(np.float32), SR, subtype="FLOAT")
            row[f"{key}_wav"] = str(path)
        data[f"u{i}"] = row
    train = DynamicItemDataset(data)
    train.add_dynamic_item(audio_pipeline("mix_wav", ["s1_wav", "s2_wav"], SR, segment=800))
    train.set_output_keys(["id", "mix_sig", "s1_sig", "s2_sig", "crop_start"])
    try:
        ref = _convtasnet_with_scheduler(tmp_path / "ref", 1, 1)
        _fit(ref, train, None)
        monkeypatch.setenv(STOP_AFTER_STEP_ENV, "1")
        with pytest.raises(StopAfterStep):
            _fit(_convtasnet_with_scheduler(tmp_path / "run", 1, 1), train, None)
        _fit(_convtasnet_with_scheduler(tmp_path / "run", 1, 1), train, None)
    finally:
        brain_module._DATA_RNG["generator"] = None  # back to the global RNG for the other tests
    kinds = ("batch", "crops")
    assert _rank_log(tmp_path / "run", ("batch",)) == _rank_log(tmp_path / "ref", ("batch",))  # data order: fine
    assert _rank_log(tmp_path / "run", kinds) == _rank_log(tmp_path / "ref", kinds)


def test_stop_after_step_is_inert_unless_set_and_checks_its_value(tmp_path, monkeypatch):
    from speechbrain_diffsep.brain import STOP_AFTER_STEP_ENV

    brain = make_brain(tmp_path / "unset", "convtasnet", run_opts={"ckpt_interval_steps": 1})
    monkeypatch.delenv(STOP_AFTER_STEP_ENV, raising=False)
    _fit(brain, dataset([0, 1], n=800), None)
    assert brain.optimizer_step == 1
    for bad, message in (("x", "must be an integer"), ("0", "must be >= 1")):
        monkeypatch.setenv(STOP_AFTER_STEP_ENV, bad)
        with pytest.raises(ValueError, match=f"{STOP_AFTER_STEP_ENV} {message}"):
            make_brain(tmp_path / bad, "convtasnet").on_fit_start()
