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


def dataset(ids, n=2400):
    keys = ["id", "mix_sig", "s1_sig", "s2_sig"]
    return DynamicItemDataset({f"u{i}": example(i, n) for i in ids}, output_keys=keys)


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
    if kind == "diffsep":
        torch.manual_seed(0)
        model = tiny_score_model()
        modules = {"score_model": model}
        hparams.update(
            sde=MixingSDE(num_sources=2),
            loss_options={"p_T": 0.1},
            ema_decay=0.9,
            n_valid_separations=1,
            separation_options={"sampler": "pc", "num_steps": 2},
            valid_separation_options={"sampler": "pc", "num_steps": 1},
        )
    else:
        torch.manual_seed(0)
        modules = {"encoder": Encoder(16, 32), "masknet": MaskNet(32, 16, 32, 3, 2, 1, 2), "decoder": Decoder(16, 32)}
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
