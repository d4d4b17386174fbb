"""SpeechBrain ``Brain`` classes that train and evaluate separation models.

- :class:`SeparationBrain`: what every separation recipe shares: reading a batch of mixtures and
  sources, validation SI-SDR, the test stage (per-utterance CSV + summary with the metrics of the
  paper), estimated wavs, multi-process (DDP) sharding of validation/test, crash-safe checkpoints.
- :class:`DiffSepBrain`: DiffSep's score-matching training with an EMA of the weights; validation
  and test separate mixtures with the EMA weights and a sampler from :mod:`.sampling`.
- :class:`ConvTasNetBrain`: the Conv-TasNet baseline, built from SpeechBrain's own lobes and its
  PIT SI-SNR loss, sharing the data, validation and test code.

Multi-GPU training runs under ``torchrun`` with SpeechBrain's DDP support. Networks are only
called through ``self.modules.<name>`` (calling ``self.hparams.<module>`` would bypass DDP's
gradient all-reduce, speechbrain#930). SpeechBrain does not shard validation/test loaders, so
:meth:`SeparationBrain.make_dataloader` gives every rank the indices ``rank::world_size`` and the
results are gathered on all ranks; rank 0 writes the files.

Random draws under DDP: SpeechBrain seeds every rank alike (on purpose: identical initial
weights). The training noise of :class:`DiffSepBrain` (``t``, ``z``, the p_T mask, the source
shuffle) therefore comes from a generator of its own per rank (:class:`RankGenerator`, seeded from
the yaml ``seed`` and the rank, saved in every checkpoint with all ranks' states, so that a resumed
run draws what the uninterrupted one would have), and the random training crops of the data
pipeline from a per-process generator seeded from ``(seed, rank, epoch, DataLoader worker)``
(:func:`data_generator`, set up by :meth:`SeparationBrain.on_stage_start` and the training loader's
``worker_init_fn``). With N GPUs a step thus sees N x batch_size distinct draws; a single-process
run with a fixed seed stays deterministic.

Mixed precision (``--precision=bf16|fp16``): only the networks run under autocast; the SDE, the
losses and the samplers run in float32 (autocast is disabled around them and the network output
is cast back to float32), because quantities such as ``L_t^{-1}`` reach ~50 near ``t_eps``.
"fp32" on an Ampere-or-newer GPU is TF32 for matmuls and convolutions, because SpeechBrain turns
TF32 on when it is imported; the yaml key ``allow_tf32: True|False`` sets
``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` when the Brain
is built (absent: SpeechBrain's setting, TF32 on). Batches move to the device with
``non_blocking=True`` (asynchronous from pinned memory: ``pin_memory: True`` in the loader options).
"""

import csv
import hashlib
import importlib
import logging
import os
import shutil
import zlib
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import speechbrain as sb
from speechbrain.nnet.losses import get_si_snr_with_pitwrapper
from speechbrain.utils.distributed import get_rank, if_main_process

from .objectives import check_objective, training_loss
from .metrics import SeparationMetricStats
from .ncsnpp import NCSNpp
from .normalize import normalize_batch
from .pipeline import separate_mixture

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete"
"""Name of the last recoverable of every checkpoint: its file exists only if the save finished."""

_AMP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

STOP_AFTER_STEP_ENV = "DIFFSEP_STOP_AFTER_STEP"
"""Test-only: the environment variable of :class:`StopAfterStep` (see there)."""

STOP_EXIT_CODE = 75
"""Exit status of a recipe stopped by :data:`STOP_AFTER_STEP_ENV` (``EX_TEMPFAIL``: run it again)."""


class StopAfterStep(Exception):
    """Test-only deterministic interruption of training (a crash at a chosen step, minus the timing).

    With ``DIFFSEP_STOP_AFTER_STEP=N`` in the environment, a run whose training starts (or resumes)
    before optimizer step ``N`` raises this exception right after the first *complete* checkpoint
    saved once ``N`` optimizer steps are done: the intra-epoch checkpoint that follows step ``N``
    (choose ``ckpt_interval_steps`` so that one does), else the end-of-epoch checkpoint after
    validation. :func:`speechbrain_diffsep.recipe.cli_main` turns it into the exit status
    :data:`STOP_EXIT_CODE` (75). Running the same command again (with or without the variable: a
    run that resumes at step ``N`` or later ignores it) resumes from that checkpoint, as after a
    crash. Unset (the default) it does nothing; it exists for the resume tests and is no
    user-facing option. Under DDP every rank stops after the same checkpoint (the save is collective);
    torchrun then exits 1, naming exit code 75.
    """

    def __init__(self, step, limit):
        super().__init__(f"stopped after optimizer step {step} ({STOP_AFTER_STEP_ENV}={limit}, test-only)")
        self.step = step


def _stop_after_step_limit():
    """``N`` of ``DIFFSEP_STOP_AFTER_STEP=N``, or ``None`` when unset/empty."""
    value = os.environ.get(STOP_AFTER_STEP_ENV, "").strip()
    if not value:
        return None
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{STOP_AFTER_STEP_ENV} must be an integer number of optimizer steps, got {value!r}") from None
    if limit < 1:
        raise ValueError(f"{STOP_AFTER_STEP_ENV} must be >= 1, got {limit}")
    return limit


# --------------------------------------------------------------------------- distributed helpers
def world_info():
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_lists(items):
    """Concatenate a picklable list from every rank (rank order); the list itself if not distributed.

    Example
    -------
    >>> gather_lists([1, 2])
    [1, 2]
    """
    rank, world = world_info()
    if world == 1:
        return list(items)
    out = [None] * world
    torch.distributed.all_gather_object(out, list(items))
    return [x for part in out for x in part]


class ShardSampler(torch.utils.data.Sampler):
    """Deterministic, non-padding shard of a dataset: indices ``rank, rank + world, ...``.

    Unlike ``DistributedSampler`` it never repeats an example to even out the shards, so gathered
    test results hold every utterance exactly once.

    Example
    -------
    >>> list(ShardSampler(range(5), rank=1, world_size=2))
    [1, 3]
    """

    def __init__(self, data_source, rank=None, world_size=None):
        r, w = world_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), got {self.rank}")
        self.indices = list(range(self.rank, len(data_source), self.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def utterance_seed(utt_id, seed=0):
    """A stable 31-bit seed for one utterance (same on every rank and run).

    Example
    -------
    >>> utterance_seed("a", 1) == utterance_seed("a", 1) != utterance_seed("b", 1)
    True
    """
    return (zlib.crc32(str(utt_id).encode()) + int(seed)) % (2**31 - 1)


def derive_seed(*parts):
    """A 63-bit seed from ``parts`` (yaml seed, purpose, rank, epoch, worker...), stable across runs,
    processes and platforms (unlike ``hash``).

    Example
    -------
    >>> derive_seed(1234, "crops", 0) == derive_seed(1234, "crops", 0) != derive_seed(1234, "crops", 1)
    True
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def process_rank():
    """This process's DDP rank: the process group's if initialized, else ``$RANK`` (torchrun), else 0."""
    rank, _ = world_info()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return rank
    return get_rank() or 0


class RankGenerator:
    """A ``torch.Generator`` of its own on every DDP rank, checkpointed with every rank's state.

    Seeded from ``derive_seed(seed, purpose, rank)``: rank 0 of an N-process run draws what a
    single-process run with the same seed draws, the other ranks draw independent streams. In a
    checkpoint (:meth:`save`, called on every rank: it gathers the states) the file holds the
    states of all ranks; :meth:`load` gives each rank its own, so a resumed run continues each
    stream where it stopped. Resuming with another number of processes reseeds (with a warning).

    Example
    -------
    >>> a, b = RankGenerator(7, rank=0), RankGenerator(7, rank=1)
    >>> bool(torch.rand(1, generator=a.generator) != torch.rand(1, generator=b.generator))
    True
    """

    def __init__(self, seed, device="cpu", purpose="training noise", rank=None):
        self.seed = int(seed)
        self.purpose = purpose
        self.rank = process_rank() if rank is None else int(rank)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(self.seed, purpose, self.rank))

    def save(self, path):
        """Write every rank's state to ``path`` (collective: every rank must call it)."""
        states = gather_lists([(self.rank, self.generator.get_state())])
        if if_main_process():
            torch.save({"purpose": self.purpose, "states": {int(r): st for r, st in states}}, path)

    def load(self, path, end_of_epoch=None):
        """Restore this rank's state from ``path``; reseed if the file has no state for this rank."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        states = data["states"]
        _, world = world_info()
        if len(states) == world and self.rank in states:
            try:
                self.generator.set_state(states[self.rank])
                return
            except RuntimeError:  # saved on another device type (CUDA <-> CPU states differ in size)
                why = f"was saved for another device than {self.generator.device}"
        else:
            why = f"holds the generators of {len(states)} process(es), this run has {world}"
        logger.warning(
            f"{path}: the {self.purpose} generator {why}: "
            "reseeding it (the run stays correct, its draws differ from an uninterrupted run's)"
        )
        fold = zlib.crc32(b"".join(st.numpy().tobytes() for _, st in sorted(states.items())))
        self.generator.manual_seed(derive_seed(self.seed, self.purpose, self.rank, "resumed", fold))


def _save_rank_generator(obj, path):
    obj.save(path)


def _load_rank_generator(obj, path, end_of_epoch=None):
    obj.load(path, end_of_epoch)


_DATA_RNG = {"generator": None, "pid": None, "key": None}


def data_generator():
    """The generator of the random training crops in this process (``None``: the global RNG).

    Set per epoch in the main process (:meth:`SeparationBrain.on_stage_start`) and per DataLoader
    worker (:class:`DataWorkerInit`), by :func:`seed_data_generator`. A generator inherited from
    the parent process (a forked worker that :class:`DataWorkerInit` did not seed) is not used:
    every such worker would repeat the same crops; the global RNG, which PyTorch seeds per
    worker, is used instead.
    """
    if _DATA_RNG["pid"] != os.getpid():
        return None
    return _DATA_RNG["generator"]


def seed_data_generator(seed, rank, epoch, worker=None):
    """(Re)seed this process's crop generator from ``(seed, rank, epoch, worker)``; returns it.

    Also sets the key ``(seed, rank, epoch)`` of :func:`example_crop_generator`."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(int(seed), "crops", int(rank), epoch, "main" if worker is None else int(worker)))
    _DATA_RNG.update(generator=gen, pid=os.getpid(), key=(int(seed), int(rank), epoch))
    return gen


def crop_generator(seed, rank, epoch, utt_id):
    """The generator of one example's training crop: seeded from ``(seed, rank, epoch, utt_id)``.

    A crop then depends on neither the order of the examples nor the DataLoader worker that reads
    it, so a run resumed mid-epoch (SpeechBrain skips the batches already done without reading
    them) draws the crops an uninterrupted run draws; every epoch and every DDP rank draws anew.

    Example
    -------
    >>> a = torch.randint(0, 1000, (1,), generator=crop_generator(1, 0, 3, "utt1"))
    >>> b = torch.randint(0, 1000, (1,), generator=crop_generator(1, 0, 3, "utt1"))
    >>> bool(a == b)
    True
    """
    return torch.Generator().manual_seed(derive_seed(int(seed), "crop", int(rank), epoch, str(utt_id)))


def example_crop_generator(utt_id):
    """:func:`crop_generator` of ``utt_id`` for this process's current ``(seed, rank, epoch)`` (set by
    :func:`seed_data_generator`), or ``None`` when this process was not set up (then
    :func:`data_generator`'s rule applies: the global RNG)."""
    if _DATA_RNG["pid"] != os.getpid() or _DATA_RNG["key"] is None:
        return None
    return crop_generator(*_DATA_RNG["key"], utt_id)


class DataWorkerInit:
    """``worker_init_fn`` of the training loader: each worker's crops come from its own generator.

    PyTorch seeds a worker from a base seed drawn from the main process's global RNG, which is the
    same on every DDP rank; this seeds the crop generator from ``(seed, rank, epoch, worker id)``
    instead. ``epoch`` is updated by the Brain before each epoch's workers start (a persistent
    worker keeps its generator running across epochs). ``inner`` is a user ``worker_init_fn``,
    called afterwards.
    """

    def __init__(self, seed, rank, epoch=0, inner=None):
        self.seed, self.rank, self.epoch, self.inner = int(seed), int(rank), epoch, inner

    def __call__(self, worker_id):
        seed_data_generator(self.seed, self.rank, self.epoch, worker_id)
        if self.inner is not None:
            self.inner(worker_id)


def apply_tf32(allow):
    """Set ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    (``None``: leave them as they are; SpeechBrain turns both on when imported)."""
    if allow is None:
        return
    if not isinstance(allow, bool):
        raise ValueError(f"allow_tf32 must be True or False, got {allow!r}")
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def parameter_fingerprint(module):
    """``(sum, sum of squares)`` of all parameters in float64, as a string (equal weights <=> equal
    strings in practice); used to check that DDP ranks hold identical weights."""
    with torch.no_grad():
        ps = [p.detach().double() for p in module.parameters()]
        s = sum(float(p.sum()) for p in ps)
        q = sum(float((p * p).sum()) for p in ps)
    return f"{s!r}:{q!r}"


def remove_incomplete_checkpoints(checkpoints_dir):
    """Delete checkpoint folders whose save did not finish (no ``complete.ckpt``); returns them.

    SpeechBrain writes a checkpoint's meta file first and its parameter files afterwards, so a
    process killed while saving leaves a folder that looks valid but cannot be loaded.
    """
    removed = []
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return removed
    for path in sorted(root.glob("CKPT+*")):
        if path.is_dir() and not (path / f"{COMPLETE_MARKER}.ckpt").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_complete(ckpt):
    return (Path(ckpt.path) / f"{COMPLETE_MARKER}.ckpt").exists()


def _save_marker(obj, path):
    if if_main_process():
        Path(path).write_text("ok\n")


def _load_marker(obj, path, end_of_epoch=None):
    return None


def available_metrics(metrics):
    """``metrics`` without DNSMOS (and a warning) when its optional packages are missing."""
    metrics = list(metrics)
    dns = {"dnsmos", "ovrl", "sig", "bak"}
    if dns & set(metrics):
        try:
            importlib.import_module("speechmos.dnsmos")
        except ImportError as err:
            logger.warning(f"DNSMOS is skipped: {err}")
            metrics = [m for m in metrics if m not in dns]
    return metrics


def _float32_output(module, inputs, output):
    """Forward hook: cast a reduced-precision output back to float32."""
    if torch.is_tensor(output) and output.is_floating_point() and output.dtype != torch.float32:
        return output.float()
    return None


class _NetworkCall:
    """Calls a network under autocast (if enabled) and returns float32, outside of autocast.

    ``module`` unwraps DDP / AveragedModel so that code checking the network's type (e.g. the
    denoiser objective of :mod:`.precond`) sees the real module; calls go through the wrapper
    itself (DDP-safe).
    """

    def __init__(self, net, device_type, dtype, record=None):
        self.net = net
        self.device_type = device_type
        self.dtype = dtype
        self.record = record  # a list: the diffusion times ``t`` (2nd argument) of every call

    @property
    def module(self):
        return getattr(self.net, "module", self.net)

    def __call__(self, *args, **kwargs):
        if self.record is not None and len(args) > 1:
            self.record.append(args[1].detach())
        enabled = self.dtype != torch.float32
        with torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=enabled):
            out = self.net(*args, **kwargs)
        return out.float()


# --------------------------------------------------------------------------- base class
class SeparationBrain(sb.Brain):
    """Shared training/validation/test machinery of the separation recipes.

    Subclasses implement :meth:`training_losses` (per-example loss of a training batch),
    :meth:`validation_losses` and :meth:`separate` (estimates shaped (batch, K, samples) in the
    mixture's domain). Batches come from ``train.py``'s data pipeline: ``batch.id``,
    ``batch.mix_sig`` and ``batch.s1_sig`` ... ``batch.s<K>_sig``.

    hparams used: ``num_spks``, ``sample_rate``, ``seed``, ``output_folder``,
    ``n_valid_separations`` (how many validation utterances get separated for SI-SDR; all of
    them for a discriminative model), ``test_metrics``, ``results_folder``, ``save_audio``,
    ``train_logger``, ``keep_checkpoints``, ``allow_tf32`` (optional, see the module doc) and
    ``log_rank_activity`` (write, per rank, the IDs of every training batch, its crop offsets,
    diffusion times and loss, and a weights fingerprint per epoch under ``<output_folder>/rank_logs``).
    Test-only: ``DIFFSEP_STOP_AFTER_STEP`` (:class:`StopAfterStep`) stops training after a checkpoint.
    """

    # ------------------------------------------------------------------ setup
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_spks = int(self.hparams.num_spks)
        if self.num_spks < 2:
            raise ValueError(f"num_spks must be >= 2, got {self.num_spks}")
        self._epoch = None
        self._data_worker_init = None
        apply_tf32(getattr(self.hparams, "allow_tf32", None))
        self._register_marker()

    def _register_marker(self):
        """(Re)register the completion marker so that it is the *last* recoverable saved."""
        if self.checkpointer is None:
            return
        self.checkpointer.recoverables.pop(COMPLETE_MARKER, None)
        self.checkpointer.add_recoverable(
            COMPLETE_MARKER,
            self,
            custom_load_hook=_load_marker,
            custom_save_hook=_save_marker,
            optional_load=True,
        )

    def on_fit_start(self):
        """As ``sb.Brain.on_fit_start`` but resumes only from checkpoints whose save completed."""
        self._compile()
        self._wrap_distributed()
        self.init_optimizers()
        self._register_marker()
        if self.checkpointer is not None:
            if if_main_process():
                for path in remove_incomplete_checkpoints(self.checkpointer.checkpoints_dir):
                    logger.warning(f"Removed the incomplete checkpoint {path} (killed while saving)")
            sb.utils.distributed.ddp_barrier()
            ckpt = self.checkpointer.recover_if_possible(ckpt_predicate=_is_complete)
            if ckpt is not None:
                logger.info(f"Resuming from {ckpt.path}")
        # test-only stop hook (StopAfterStep): armed if this run starts before the asked step
        limit = _stop_after_step_limit()
        self._stop_after_step = limit if limit is not None and self.optimizer_step < limit else None

    def _save_intra_epoch_ckpt(self):
        """As ``sb.Brain``'s, then the test-only :class:`StopAfterStep` hook."""
        super()._save_intra_epoch_ckpt()
        self._maybe_stop_after_step()

    def _maybe_stop_after_step(self):
        """Raise :class:`StopAfterStep` if armed and ``N`` optimizer steps are done (test-only)."""
        limit = getattr(self, "_stop_after_step", None)
        if limit is not None and self.optimizer_step >= limit:
            raise StopAfterStep(self.optimizer_step, limit)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Load the best complete checkpoint by ``max_key``/``min_key`` (else the latest)."""
        if self.checkpointer is None:
            return
        ckpt = self.checkpointer.find_checkpoint(
            max_key=max_key, min_key=min_key, ckpt_predicate=_is_complete
        )
        if ckpt is None and (max_key or min_key):
            ckpt = self.checkpointer.find_checkpoint(ckpt_predicate=_is_complete)
            if ckpt is not None:
                logger.warning(f"No checkpoint has the key {max_key or min_key}; testing the latest one")
        if ckpt is None:
            logger.warning("No checkpoint found: testing the weights as initialized")
            return
        self.checkpointer.load_checkpoint(ckpt)
        logger.info(f"Testing the checkpoint {ckpt.path}")

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """As ``sb.Brain.make_dataloader``; validation/test loaders are sharded across DDP ranks."""
        rank, world = world_info()
        if stage != sb.Stage.TRAIN and world > 1:
            if loader_kwargs.get("shuffle") or loader_kwargs.get("sampler") is not None:
                raise ValueError("validation/test loaders must not set shuffle or sampler under DDP")
            loader_kwargs = dict(loader_kwargs, sampler=ShardSampler(dataset, rank, world))
        if stage == sb.Stage.TRAIN and not isinstance(loader_kwargs.get("worker_init_fn"), DataWorkerInit):
            self._data_worker_init = DataWorkerInit(
                self._seed(), process_rank(), self._epoch or 0, inner=loader_kwargs.get("worker_init_fn")
            )
            loader_kwargs = dict(loader_kwargs, worker_init_fn=self._data_worker_init)
        return super().make_dataloader(dataset, stage, ckpt_prefix=ckpt_prefix, **loader_kwargs)

    def _seed(self):
        return int(getattr(self.hparams, "seed", 0))

    # ------------------------------------------------------------------ precision
    def network_dtype(self, stage):
        """The autocast dtype of the networks in ``stage`` (from --precision / --eval_precision)."""
        name = self.precision if stage == sb.Stage.TRAIN else self.eval_precision
        return _AMP_DTYPES[name]

    def network_call(self, net, stage):
        """Wrap ``net`` so that it alone runs in reduced precision and returns float32."""
        return _NetworkCall(net, self.device_type, self.network_dtype(stage))

    # ------------------------------------------------------------------ batches
    def batch_signals(self, batch):
        """``(ids, mix (B,1,n), sources (B,K,n), lengths (B,) in samples)`` on the device."""
        mix, rel = batch.mix_sig
        mix = mix.to(self.device, non_blocking=True).float()
        srcs = []
        for k in range(1, self.num_spks + 1):
            sig = getattr(batch, f"s{k}_sig", None)
            if sig is None:
                raise ValueError(
                    f"the batch has no s{k}_sig but num_spks={self.num_spks}; "
                    "check num_spks against the data"
                )
            srcs.append(sig.data.to(self.device, non_blocking=True).float())
        sources = torch.stack(srcs, dim=1)
        lengths = torch.round(rel.to(self.device, non_blocking=True) * mix.shape[-1]).long()
        return list(batch.id), mix[:, None, :], sources, lengths

    # ------------------------------------------------------------------ to implement
    def training_losses(self, mix, sources):
        """Per-example training loss (batch,)."""
        raise NotImplementedError

    def validation_losses(self, mix, sources, ids):
        """Per-example validation loss (batch,)."""
        raise NotImplementedError

    def separate(self, mix, ids, stage):
        """Estimates (batch, K, samples) of the sources of ``mix`` (batch, 1, samples)."""
        raise NotImplementedError

    def separate_utterances(self, mix, ids, lengths, stage):
        """Separate each mixture at its true length; returns a list of (K, n_i) tensors."""
        if bool((lengths == mix.shape[-1]).all()):
            est = self.separate(mix, ids, stage)
            return [e for e in est]
        return [
            self.separate(mix[i : i + 1, :, : int(n)], ids[i : i + 1], stage)[0]
            for i, n in enumerate(lengths)
        ]

    # ------------------------------------------------------------------ forward / objectives
    def compute_forward(self, batch, stage):
        """Training: per-example losses. Validation/test: losses plus separation (see class doc)."""
        ids, mix, sources, lengths = self.batch_signals(batch)
        with torch.autocast(device_type=self.device_type, enabled=False):
            if stage == sb.Stage.TRAIN:
                return self.training_losses(mix, sources)
            if stage == sb.Stage.VALID:
                loss = self.validation_losses(mix, sources, ids)
                self._valid_separations(ids, mix, sources, lengths)
                return loss
            return self._test_batch(ids, mix, sources, lengths)

    def compute_objectives(self, predictions, batch, stage):
        """Mean of the per-example losses; validation losses are also summed for all ranks."""
        loss = predictions.mean()
        if stage == sb.Stage.VALID:
            self._valid_loss_sum += float(predictions.detach().sum())
            self._valid_loss_count += int(predictions.numel())
        return loss

    def _valid_separations(self, ids, mix, sources, lengths):
        """Separate the first ``n_valid_separations`` validation utterances (over all ranks)."""
        for i in range(len(ids)):
            if self._valid_done >= self._valid_quota:
                return
            n = int(lengths[i])
            est = self.separate(mix[i : i + 1, :, :n], ids[i : i + 1], sb.Stage.VALID)
            ref = sources[i : i + 1, :, :n]
            si_sdr = -get_si_snr_with_pitwrapper(ref.transpose(1, 2), est.transpose(1, 2))
            self._valid_sisdr.append(float(si_sdr))
            self._valid_done += 1

    def _test_batch(self, ids, mix, sources, lengths):
        """Separate and score every utterance of a test batch; returns -SI-SDR per utterance."""
        ests = self.separate_utterances(mix, ids, lengths, sb.Stage.TEST)
        losses = []
        for i, est in enumerate(ests):
            n = int(lengths[i])
            ref, m = sources[i, :, :n].cpu(), mix[i, :, :n].cpu()
            est = est.detach().float().cpu()
            self.metric_stats.append([ids[i]], est[None], ref[None], m[None])
            scores = self.metric_stats.scores[-1]
            if self.hparams.save_audio:
                self._save_estimates(ids[i], est[scores["perm"]], m)
            losses.append(-sum(scores["si_sdr"]) / len(scores["si_sdr"]) if "si_sdr" in scores else 0.0)
        return torch.tensor(losses)

    def _save_estimates(self, utt_id, est, mix):
        """Write ``<id>_s<k>hat.wav`` (aligned to the references) and ``<id>_mix.wav``."""
        folder = Path(self.hparams.results_folder) / "audio"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(est.shape[0]):
            sb.dataio.dataio.write_audio(
                str(folder / f"{utt_id}_s{k + 1}hat.wav"), est[k], self.hparams.sample_rate
            )
        sb.dataio.dataio.write_audio(str(folder / f"{utt_id}_mix.wav"), mix[0], self.hparams.sample_rate)

    # ------------------------------------------------------------------ stages
    def on_stage_start(self, stage, epoch=None):
        """Reset the per-stage accumulators; seed this epoch's training crops (see the module doc)."""
        self._epoch = epoch
        if stage == sb.Stage.TRAIN:
            seed_data_generator(self._seed(), process_rank(), epoch or 0)
            if getattr(self, "train_mixer", None) is not None:  # dynamic mixing: this epoch's draws
                self.train_mixer.set_epoch(epoch or 0)
            if self._data_worker_init is not None:
                self._data_worker_init.epoch = epoch or 0
        elif stage == sb.Stage.VALID:
            rank, world = world_info()
            n_valid = int(getattr(self.hparams, "n_valid_separations", 0))
            self._valid_quota = len(range(rank, max(n_valid, 0), world))
            self._valid_done = 0
            self._valid_sisdr = []
            self._valid_loss_sum = 0.0
            self._valid_loss_count = 0
        elif stage == sb.Stage.TEST:
            self.metric_stats = SeparationMetricStats(
                fs=int(self.hparams.sample_rate), metrics=available_metrics(self.hparams.test_metrics)
            )

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log train/valid stats, checkpoint after validation, write the test results."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            if self._rank_log_enabled():
                self._log_rank(f"epoch_end {epoch} {parameter_fingerprint(self.modules)}")
            return
        if stage == sb.Stage.VALID:
            stats = self._gather_valid_stats()
            lr = self._step_scheduler(epoch, stats["loss"])
            meta = {k: v for k, v in stats.items() if v is not None}
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=getattr(self, "train_stats", None),
                valid_stats=meta,
            )
            if self.checkpointer is None:
                return
            key = "si_sdr" if "si_sdr" in meta else None
            self.checkpointer.save_and_keep_only(
                meta=meta,
                num_to_keep=int(self.hparams.keep_checkpoints),
                max_keys=[key] if key else [],
                min_keys=[] if key else ["loss"],
                importance_keys=[],
            )
            self._maybe_stop_after_step()
            return
        self._write_test_results()

    def _gather_valid_stats(self):
        loss_parts = gather_lists([(self._valid_loss_sum, self._valid_loss_count)])
        total = sum(c for _, c in loss_parts)
        loss = sum(s for s, _ in loss_parts) / max(total, 1)
        sisdr = gather_lists(self._valid_sisdr)
        return {"loss": loss, "si_sdr": (sum(sisdr) / len(sisdr)) if sisdr else None}

    def _step_scheduler(self, epoch, valid_loss):
        """Step the optional ``lr_scheduler`` (SpeechBrain's ReduceLROnPlateau); returns the lr."""
        if not hasattr(self, "optimizer"):
            return None
        sched = getattr(self.hparams, "lr_scheduler", None)
        if sched is not None:
            sched([self.optimizer], epoch, valid_loss)
        return self.optimizer.param_groups[0]["lr"]

    def _write_test_results(self):
        """Gather the per-utterance scores of all ranks; rank 0 writes the CSV and the summary.

        ``<results_folder>/test_results.csv``: one row per utterance (and source), last row
        ``avg``; ``<results_folder>/test_summary.csv``: metric, mean, std, count.
        """
        pairs = gather_lists(zip(self.metric_stats.ids, self.metric_stats.scores))
        pairs.sort(key=lambda p: str(p[0]))
        self.metric_stats.ids = [p[0] for p in pairs]
        self.metric_stats.scores = [p[1] for p in pairs]
        summary = self.metric_stats.summarize()
        self.test_summary = summary
        if if_main_process():
            folder = Path(self.hparams.results_folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.metric_stats.write_csv(folder / "test_results.csv")
            with open(folder / "test_summary.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["metric", "mean", "std", "count"])
                for name in self.metric_stats.metrics:
                    writer.writerow([name, summary[name], summary[f"{name}_std"], summary["n_utts"]])
        # log_stats is main-process-only with a broadcast: every rank must call it
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
            test_stats={name: summary[name] for name in self.metric_stats.metrics},
        )

    # ------------------------------------------------------------------ rank log
    def on_fit_batch_start(self, batch, should_step):
        """With ``log_rank_activity``: note the epoch, step, example IDs and crop offsets of this batch."""
        if self._rank_log_enabled():
            self._log_rank(f"batch {self._epoch} {self.step} {' '.join(map(str, batch.id))}")
            crops = getattr(batch, "crop_start", None)
            if crops is not None:
                crops = crops.data if hasattr(crops, "data") else crops
                self._log_rank(f"crops {self._epoch} {self.step} {' '.join(str(int(c)) for c in crops)}")

    def fit_batch(self, batch):
        """As ``sb.Brain.fit_batch``; with ``log_rank_activity`` the step's loss is logged (exact repr)."""
        loss = super().fit_batch(batch)
        if self._rank_log_enabled():
            self._log_rank(f"loss {self._epoch} {self.step} {float(loss)!r}")
        return loss

    def _log_draws(self, times):
        """With ``log_rank_activity``: the diffusion times the network got in this training step."""
        if times:
            values = torch.cat([t.reshape(-1).float().cpu() for t in times])
            self._log_rank(f"t {self._epoch} {self.step} {' '.join(f'{float(v):.8f}' for v in values)}")

    def _rank_log_enabled(self):
        return bool(getattr(self.hparams, "log_rank_activity", False))

    def _log_rank(self, line):
        if not self._rank_log_enabled():
            return
        rank, _ = world_info()
        folder = Path(self.hparams.output_folder) / "rank_logs"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{rank}.txt", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- DiffSep
class DiffSepBrain(SeparationBrain):
    """DiffSep training (score matching + p_T loss) with an EMA of the weights.

    hparams used (on top of :class:`SeparationBrain`'s): ``sde`` (a :class:`.sde.MixingSDE`),
    ``loss_options`` (passed to :func:`.objectives.training_loss`), ``ema_decay``,
    ``separation_options`` (test: ``sampler``, ``num_steps`` and the sampler's options, passed
    to :func:`.pipeline.separate_mixture`) and ``valid_separation_options``.
    The module ``score_model`` is called as ``score = model(x_t (B,K,n), t (B,), y (B,1,n))``.

    The EMA is a ``torch.optim.swa_utils.AveragedModel`` updated after every optimizer step and
    registered in the checkpointer as ``ema`` (its state dict holds ``module.<...>`` and
    ``n_averaged``); validation and test use it. ``ema_decay`` is per optimizer step, whatever the
    number of GPUs (one step of N GPUs averages N x batch_size examples).

    The training noise (``t``, ``z``, p_T mask, source shuffle) comes from ``noise_rng``, a
    :class:`RankGenerator` (per DDP rank, seeded from ``seed`` and the rank) registered in the
    checkpointer as ``noise_rng``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "score_model" not in self.modules:
            raise ValueError("DiffSepBrain needs modules: {score_model: ...} in the yaml")
        sde = self.hparams.sde
        if sde.num_sources != self.num_spks:
            raise ValueError(
                f"sde.num_sources={sde.num_sources} differs from num_spks={self.num_spks}; "
                "build the SDE with num_sources: !ref <num_spks>"
            )
        options = getattr(self.hparams, "loss_options", None) or {}
        check_objective(options.get("objective", "score"), self.modules.score_model, sde)
        # The ScoreModel combines the NCSN++ output into complex spectra and inverts the STFT;
        # under autocast that part must get float32 (torch.complex rejects bfloat16).
        for module in self.modules.score_model.modules():
            if isinstance(module, NCSNpp):
                module.register_forward_hook(_float32_output)
        decay = float(self.hparams.ema_decay)
        self.ema = AveragedModel(
            self.modules.score_model, multi_avg_fn=get_ema_multi_avg_fn(decay)
        ).to(self.device)
        self.ema.requires_grad_(False)
        self.ema.eval()
        self.noise_rng = RankGenerator(self._seed(), device=self.device)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("ema", self.ema)
            self.checkpointer.add_recoverable(
                "noise_rng",
                self.noise_rng,
                custom_load_hook=_load_rank_generator,
                custom_save_hook=_save_rank_generator,
                optional_load=True,  # checkpoints made before it existed
            )
            self._register_marker()

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Update the EMA after every optimizer step."""
        if should_step:
            net = self.modules.score_model
            self.ema.update_parameters(getattr(net, "module", net))

    def training_losses(self, mix, sources):
        """``training_loss`` on the signals normalized by the mixture's statistics, with this rank's
        noise generator."""
        mix_n, src_n, _, _ = normalize_batch(mix, sources)
        net = self.network_call(self.modules.score_model, sb.Stage.TRAIN)
        if self._rank_log_enabled():
            net.record = []
        loss, _ = training_loss(
            net, self.hparams.sde, src_n, mix_n, generator=self.noise_rng.generator, **self.hparams.loss_options
        )
        if net.record is not None:
            self._log_draws(net.record)
        return loss

    def validation_losses(self, mix, sources, ids):
        """The training loss of the EMA model, with noise seeded by the utterance ID."""
        mix_n, src_n, _, _ = normalize_batch(mix, sources)
        gen = torch.Generator(device=self.device).manual_seed(utterance_seed(ids[0], self.hparams.seed))
        net = self.network_call(self.ema, sb.Stage.VALID)
        loss, _ = training_loss(
            net, self.hparams.sde, src_n, mix_n, generator=gen, **self.hparams.loss_options
        )
        return loss

    def separate(self, mix, ids, stage):
        """Sample the sources with the EMA weights; noise seeded by the (first) utterance ID."""
        opts = dict(
            self.hparams.valid_separation_options
            if stage == sb.Stage.VALID
            else self.hparams.separation_options
        )
        gen = torch.Generator(device=self.device).manual_seed(utterance_seed(ids[0], self.hparams.seed))
        net = self.network_call(self.ema, stage)
        est, _ = separate_mixture(net, self.hparams.sde, mix, generator=gen, **opts)
        return est


# --------------------------------------------------------------------------- Conv-TasNet
def conv_tasnet_forward(encoder, masknet, decoder, mix):
    """SpeechBrain's Conv-TasNet lobes: mixtures (B, n) -> estimates (B, K, n), float32."""
    n = mix.shape[-1]
    w = encoder(mix)  # (B, frames, N)
    mask = masknet(w.transpose(1, 2))  # (K, B, N, frames)
    est = decoder(w, mask.permute(1, 3, 0, 2))  # (B, n', K)
    est = est.float().transpose(1, 2)
    if est.shape[-1] < n:
        est = torch.nn.functional.pad(est, (0, n - est.shape[-1]))
    return est[..., :n]


class ConvTasNetBrain(SeparationBrain):
    """Conv-TasNet baseline from SpeechBrain's lobes (``speechbrain.lobes.models.conv_tasnet``).

    modules: ``encoder`` (``Encoder(L, N)``), ``masknet`` (``MaskNet(N, B, H, P, X, R, C)``),
    ``decoder`` (``Decoder(L, N)``); loss: SpeechBrain's ``get_si_snr_with_pitwrapper`` (negative
    PIT SI-SNR). Every validation utterance is separated (it is one forward pass), so
    ``n_valid_separations`` is not used. An optional ``lr_scheduler`` (SpeechBrain's
    ``ReduceLROnPlateau``) is stepped on the validation loss.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        missing = {"encoder", "masknet", "decoder"} - set(self.modules.keys())
        if missing:
            raise ValueError(f"ConvTasNetBrain needs modules {sorted(missing)} in the yaml")

    def estimate(self, mix, stage):
        """Network forward: (B,1,n) -> (B,K,n), float32."""
        # training goes through the DDP wrappers (gradient all-reduce); evaluation, whose shards
        # may differ in size across ranks, uses the wrapped modules and no collective
        mods = {name: self.modules[name] for name in ("encoder", "masknet", "decoder")}
        if stage != sb.Stage.TRAIN:
            mods = {name: getattr(m, "module", m) for name, m in mods.items()}
        with torch.autocast(
            device_type=self.device_type,
            dtype=self.network_dtype(stage),
            enabled=self.network_dtype(stage) != torch.float32,
        ):
            return conv_tasnet_forward(mods["encoder"], mods["masknet"], mods["decoder"], mix[:, 0])

    def training_losses(self, mix, sources):
        est = self.estimate(mix, sb.Stage.TRAIN)
        return get_si_snr_with_pitwrapper(sources.transpose(1, 2), est.transpose(1, 2))

    def validation_losses(self, mix, sources, ids):
        """Negative PIT SI-SNR; its negation is also the validation SI-SDR (every utterance)."""
        est = self.estimate(mix, sb.Stage.VALID)
        loss = get_si_snr_with_pitwrapper(sources.transpose(1, 2), est.transpose(1, 2))
        self._valid_sisdr.extend((-loss).tolist())
        return loss

    def _valid_separations(self, ids, mix, sources, lengths):
        """Nothing to add: :meth:`validation_losses` already separated every utterance."""

    def separate(self, mix, ids, stage):
        return self.estimate(mix, stage)


__all__ = [
    "SeparationBrain",
    "DiffSepBrain",
    "ConvTasNetBrain",
    "ShardSampler",
    "gather_lists",
    "world_info",
    "utterance_seed",
    "derive_seed",
    "RankGenerator",
    "DataWorkerInit",
    "data_generator",
    "seed_data_generator",
    "apply_tf32",
    "parameter_fingerprint",
    "remove_incomplete_checkpoints",
    "COMPLETE_MARKER",
    "StopAfterStep",
    "STOP_AFTER_STEP_ENV",
    "STOP_EXIT_CODE",
]
