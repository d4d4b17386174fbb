"""What every recipe's ``train.py`` shares: data sets from the CSVs, the run, the enhancement test stage.

A recipe's ``train.py`` only says how to prepare its data (a function of the hparams that writes
``train.csv``, ``valid.csv``, ``test.csv``) and which CSV columns hold the mixture and the sources;
:func:`run_recipe` does the rest, SpeechBrain style (everything tunable lives in the yaml):

1. parse the command line, load the yaml (an unknown override is hyperpyyaml's error naming it);
2. initialise DDP, check the data folder (one-line error), create the experiment folder;
3. prepare the data on the main process, build the data sets (:func:`dataio_prep`);
4. build the Brain named by ``brain_class``, train (``fit``, skipped with ``test_only``) and test the
   best checkpoint by validation SI-SDR.

:func:`cli_main` turns a missing data / model folder into one ``error: ...`` line without traceback.

Data pipeline: every signal of an utterance gets the same random crop of ``segment_seconds``
(training only; zero-padded when shorter), drawn from the per-rank, per-worker, per-epoch crop
generator of :func:`~speechbrain_diffsep.brain.data_generator` (so DDP ranks crop independently);
batches provide ``mix_sig`` and ``s1_sig`` ... ``s<K>_sig`` as
:class:`~speechbrain_diffsep.brain.SeparationBrain` expects, and ``crop_start`` (the offset in
samples, for the per-rank logs). With
``residual_target=True`` the last target is the mixture minus the other targets (enhancement:
``[clean, noisy - clean]``).

Under torchrun the process group is set up before the yaml is loaded, so that what the yaml
builds can synchronise the ranks: :func:`load_model_folder` (a pretrained model, from ``python -m
speechbrain_diffsep.export`` or a recipe's output folder, for test-only runs such as the paper's
cross-domain evaluation) exports a recipe folder on the main rank only while the others wait.

Also here: the enhancement test stage: :class:`EnhancementMetricStats` and
:class:`DiffSepEnhancementBrain`.
"""

import csv
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.utils.distributed import ddp_broadcast, if_main_process, run_on_main

from .brain import STOP_EXIT_CODE, DiffSepBrain, StopAfterStep, available_metrics, data_generator, example_crop_generator
from .dynamic_mixing import DynamicMixDataset, dynamic_mixing_from_hparams
from .metrics import DEFAULT_METRICS, SeparationMetricStats, evaluate_separation, si_sdr

SPLITS = ("train", "valid", "test")


class RecipeError(ValueError):
    """A one-line problem with a recipe's input (printed without traceback by :func:`cli_main`)."""


# --------------------------------------------------------------------------- data
def check_data_folder(data_folder, hint):
    """Raise ``FileNotFoundError`` (one line, ending with ``hint``) if the folder is missing.

    Example
    -------
    >>> try:
    ...     check_data_folder("/no/such/folder", "pass --data_folder=<...>")
    ... except FileNotFoundError as err:
    ...     print(err)
    data_folder '/no/such/folder' does not exist; pass --data_folder=<...>
    """
    if data_folder is None or not os.path.isdir(str(data_folder)):
        raise FileNotFoundError(f"data_folder {str(data_folder)!r} does not exist; {hint}")
    return str(data_folder)


def signal_keys(num_targets):
    """Names of the signals a batch provides: ``["mix_sig", "s1_sig", ..., "s<K>_sig"]``.

    Example
    -------
    >>> signal_keys(2)
    ['mix_sig', 's1_sig', 's2_sig']
    """
    return ["mix_sig"] + [f"s{k}_sig" for k in range(1, num_targets + 1)]


def random_crop(duration, sample_rate, segment, generator=None, utt_id=None):
    """``(start, stop)`` of a random crop of ``segment`` samples (``(0, None)``: the whole file).

    The offset comes from ``generator``; else, with ``utt_id``, from that example's own generator
    (:func:`~speechbrain_diffsep.brain.example_crop_generator`: seeded from the yaml seed, the DDP
    rank, the epoch and the ID, so that a run resumed mid-epoch draws the crops an uninterrupted
    run draws); else from this process's crop generator
    (:func:`~speechbrain_diffsep.brain.data_generator`, set up by the Brain per rank, epoch and
    DataLoader worker); else from the global RNG.
    """
    if segment is None:
        return 0, None
    n = int(round(float(duration) * sample_rate))
    if n <= segment:
        return 0, None
    gen = generator
    if gen is None and utt_id is not None:
        gen = example_crop_generator(utt_id)
    if gen is None:
        gen = data_generator()
    start = int(torch.randint(0, n - segment + 1, (1,), generator=gen))
    return start, start + segment


def read_crop(path, start, stop, segment):
    """Read ``path[start:stop]`` (all of it if ``stop`` is None), zero-padded to ``segment``."""
    if stop is None:
        sig = sb.dataio.dataio.read_audio(path)
    else:
        sig = sb.dataio.dataio.read_audio({"file": path, "start": start, "stop": stop})
    if segment is not None and sig.shape[-1] < segment:
        sig = torch.nn.functional.pad(sig, (0, segment - sig.shape[-1]))
    return sig


def audio_pipeline(mixture, sources, sample_rate, segment=None, residual_target=False):
    """A SpeechBrain dynamic item: CSV paths -> ``mix_sig, s1_sig, ... s<K>_sig``.

    Arguments
    ---------
    mixture : str
        CSV column of the mixture (``"mix_wav"``, ``"noisy_wav"``).
    sources : list of str
        CSV columns of the targets, in order.
    sample_rate : int
        Rate of the files (to turn the CSV's ``duration`` into samples).
    segment : int, optional
        Crop length in samples: all signals get the same random crop (zero-padded at the end if
        the utterance is shorter). ``None`` reads whole utterances.
    residual_target : bool
        Append a last target ``mix - sum(sources)`` (K = len(sources) + 1).

    The pipeline also provides ``crop_start``, the offset of the crop in samples (0: none).
    """
    keys = signal_keys(len(sources) + int(residual_target))

    @sb.utils.data_pipeline.takes("id", "duration", mixture, *sources)
    @sb.utils.data_pipeline.provides("crop_start", *keys)
    def pipeline(utt_id, duration, mix_path, *source_paths):
        start, stop = random_crop(duration, sample_rate, segment, utt_id=utt_id)
        yield start
        mix = read_crop(mix_path, start, stop, segment)
        yield mix
        rest = mix
        for path in source_paths:
            sig = read_crop(path, start, stop, segment)
            if sig.shape != mix.shape:
                raise ValueError(f"{path} has {sig.shape[-1]} samples but the mixture {mix_path} {mix.shape[-1]}")
            rest = rest - sig
            yield sig
        if residual_target:
            yield rest

    return pipeline


def _split_csv(hparams, split):
    """The CSV of ``split`` (only that key is read: a test-only yaml has no ``train_data``)."""
    if split == "train":
        return hparams["train_data"]
    if split == "valid":
        return hparams["valid_data"]
    return hparams["test_data"]


def dataio_prep(hparams, mixture="mix_wav", sources=None, residual_target=False, splits=SPLITS):
    """``{split: DynamicItemDataset}`` from the CSVs of the data preparation.

    hparams used: ``train_data``, ``valid_data``, ``test_data`` (CSV paths of the splits asked
    for), ``num_spks`` (K, the number of targets), ``sample_rate`` and, for the training split,
    ``segment_seconds`` (random crops; ``null`` for whole utterances).

    Arguments
    ---------
    hparams : dict
        The loaded yaml.
    mixture : str
        CSV column of the mixture.
    sources : list of str, optional
        CSV columns of the targets; default ``s1_wav ... s<K>_wav``.
    residual_target : bool
        The last target is the mixture minus the others (see :func:`audio_pipeline`).
    splits : sequence of str
        Which of ``train``, ``valid``, ``test`` to build.
    """
    num_spks, sr = int(hparams["num_spks"]), int(hparams["sample_rate"])
    if sources is None:
        sources = [f"s{k}_wav" for k in range(1, num_spks + 1 - int(residual_target))]
    sources = list(sources)
    if len(sources) + int(residual_target) != num_spks:
        raise ValueError(
            f"num_spks={num_spks} but the recipe reads {len(sources)} target column(s) {sources}"
            f"{' plus a residual target' if residual_target else ''}; fix num_spks in the yaml"
        )
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"splits must be among {SPLITS}, got {unknown}")
    datasets = {}
    for split in splits:
        segment = None
        if split == "train" and hparams["segment_seconds"] is not None:
            segment = int(round(float(hparams["segment_seconds"]) * sr))
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=_split_csv(hparams, split))
        ds.add_dynamic_item(audio_pipeline(mixture, sources, sr, segment, residual_target))
        ds.set_output_keys(["id"] + signal_keys(num_spks) + (["crop_start"] if segment is not None else []))
        datasets[split] = ds
    if "train" in datasets:
        try:
            mixer = dynamic_mixing_from_hparams(hparams)
        except ValueError as err:
            raise RecipeError(f"dynamic_mixing: {err}") from None
        if mixer is not None:
            if residual_target:
                raise RecipeError("dynamic_mixing mixes separation sources; set dynamic_mixing.enabled: False for enhancement")
            datasets["train"] = mixer  # new mixtures every epoch (the Brain calls set_epoch)
    return datasets


# --------------------------------------------------------------------------- run
def load_recipe_hparams(argv=None, init_distributed=False):
    """``(hparams_file, hparams, run_opts, overrides)`` from the command line (``sys.argv[1:]``).

    ``init_distributed``: set up the DDP process group (under torchrun) before the yaml is loaded,
    so that objects the yaml builds (e.g. :func:`load_model_folder`) can synchronise the ranks.
    """
    _check_repeated_options(sys.argv[1:] if argv is None else argv)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if not os.path.isfile(hparams_file):
        raise RecipeError(f"hyperparameter file {hparams_file!r} does not exist; pass the path of a yaml in hparams/")
    if init_distributed:
        sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as fin:
        try:
            hparams = load_hyperpyyaml(fin, overrides)
        except KeyError as err:
            msg = str(err.args[0]) if err.args else str(err)
            if msg.startswith("Override '"):  # hyperpyyaml: an override names no key of the yaml
                key = msg.split("'")[1]
                raise RecipeError(
                    f"unknown hyperparameter --{key} for {hparams_file}; check its spelling against the yaml's keys"
                ) from None
            raise
    return hparams_file, hparams, run_opts, overrides


def _check_repeated_options(argv):
    """One-line error for a yaml override given twice (the yaml parser would raise a DuplicateKeyError).

    SpeechBrain's run options (``--device``, ``--ckpt_interval_minutes``, ...) go through argparse,
    where the last one wins as usual; they are not checked."""
    run_options = set(sb.RunOptions().as_dict())
    seen = set()
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            if key in run_options:
                continue
            if key in seen:
                raise RecipeError(f"--{key} is given twice on the command line; keep one")
            seen.add(key)


def build_brain(hparams, run_opts):
    """The Brain of ``brain_class`` with the yaml's ``modules``, ``optimizer`` and ``checkpointer``
    (the last two may be absent, e.g. in a test-only yaml)."""
    return hparams["brain_class"](
        modules=hparams["modules"],
        opt_class=hparams["optimizer"] if "optimizer" in hparams else None,
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"] if "checkpointer" in hparams else None,
    )


def run_recipe(argv, prepare, data_hint, mixture="mix_wav", sources=None, residual_target=False):
    """Parse, load the yaml, prepare the data (main process), build the Brain, train, test.

    Arguments
    ---------
    argv : list of str, optional
        Command line (``sys.argv[1:]`` if None): ``hparams.yaml --key=value ...``.
    prepare : callable
        ``prepare(hparams)`` writes the CSVs named by ``train_data``/``valid_data``/``test_data``.
    data_hint : str
        How to fix ``--data_folder``, for the one-line error when it does not exist.
    mixture, sources, residual_target
        CSV columns, see :func:`dataio_prep`.

    Returns
    -------
    The Brain, after its test stage (``brain.test_summary`` holds the metrics).
    """
    hparams_file, hparams, run_opts, overrides = load_recipe_hparams(argv, init_distributed=True)
    check_data_folder(hparams["data_folder"], data_hint)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(prepare, args=[hparams])
    brain = build_brain(hparams, run_opts)
    splits = ("test",) if brain.test_only else SPLITS
    datasets = dataio_prep(hparams, mixture, sources, residual_target, splits=splits)
    if isinstance(datasets.get("train"), DynamicMixDataset):
        brain.train_mixer = datasets["train"]
    if not brain.test_only and hparams.get("init_from"):
        init_from_model_folder(brain, hparams["init_from"], os.path.join(hparams["output_folder"], "init_from"))
    if not brain.test_only:
        brain.fit(
            brain.hparams.epoch_counter,
            datasets["train"],
            datasets["valid"],
            train_loader_kwargs=hparams["train_dataloader_opts"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )
    brain.evaluate(datasets["test"], max_key="si_sdr", test_loader_kwargs=hparams["test_dataloader_opts"])
    if sb.utils.distributed.if_main_process() and "train_log" in hparams:
        plot_train_log(hparams["train_log"], os.path.join(hparams["output_folder"], "train_curves.png"))
    return brain


def plot_train_log(train_log, png_path):
    r"""Plot the per-epoch train/valid losses and valid SI-SDR of SpeechBrain's ``train_log.txt``.

    Returns the number of epochs plotted (0: nothing written).

    Example
    -------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); log = os.path.join(d, "train_log.txt")
    >>> _ = open(log, "w").write("epoch: 1, lr: 1.00e-03 - train loss: 0.9 - valid loss: 0.8, valid si_sdr: 1.5\n"
    ...                          "epoch: 2, lr: 1.00e-03 - train loss: 0.7 - valid loss: 0.6, valid si_sdr: 3.5\n")
    >>> plot_train_log(log, os.path.join(d, "curves.png"))
    2
    """
    import re

    rows = []
    if os.path.isfile(train_log):
        for line in open(train_log, encoding="utf-8"):
            m = re.match(r"epoch: (\d+)", line)
            if not m:
                continue
            vals = dict(re.findall(r"(train loss|valid loss|valid si_sdr): ([-+0-9.eE]+)", line))
            rows.append((int(m.group(1)), {k: float(v) for k, v in vals.items()}))
    if not rows:
        return 0
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image: the curves are in train_log.txt anyway
        print(f"matplotlib is not installed: {png_path} not written (pip install matplotlib)", file=sys.stderr)
        return 0

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("train loss", "valid loss"):
        pts = [(e, v[key]) for e, v in rows if key in v]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    ax1.legend()
    pts = [(e, v["valid si_sdr"]) for e, v in rows if "valid si_sdr" in v]
    if pts:
        ax2.plot(*zip(*pts), marker="o", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_title("valid SI-SDR (dB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return len(rows)


def finish_distributed():
    """Wait for every rank, then destroy the process group (no-op without DDP).

    A torchrun worker that exits with its gloo/NCCL group alive can abort in the group's
    destructor ("terminate called without an active exception", SIGABRT) after its work is done,
    and torchrun then reports a finished job as failed. Destroying the group first makes every
    rank of a finished job exit 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli_main(main, argv=None):
    """Run ``main(argv)``; a missing/bad data or model folder exits with one ``error: ...`` line.

    On success under torchrun the process group is destroyed (:func:`finish_distributed`).
    A run stopped by the test-only ``DIFFSEP_STOP_AFTER_STEP`` hook
    (:class:`~speechbrain_diffsep.brain.StopAfterStep`) exits with status
    :data:`~speechbrain_diffsep.brain.STOP_EXIT_CODE` (75) and one ``stopped: ...`` line.
    """
    try:
        result = main(argv)
    except (FileNotFoundError, RecipeError) as err:
        _destroy_group()  # every rank meets the same error: no barrier, just a clean exit
        sys.exit(f"error: {err}")
    except StopAfterStep as stop:
        _destroy_group()  # every rank stops after the same (collective) checkpoint save
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(STOP_EXIT_CODE)
    finish_distributed()
    return result


def _destroy_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- pretrained models
def load_model_folder(folder, savedir, sample_rate=None, num_spks=None, key="pretrained_folder"):
    """The score network and SDE of a pretrained model, for a test-only recipe run.

    Arguments
    ---------
    folder : str
        A model folder (``hyperparams.yaml`` + ``score_model.ckpt``, from ``python -m
        speechbrain_diffsep.export``) or a recipe's output folder (``hyperparams.yaml`` +
        ``save/CKPT+*``), whose best checkpoint (validation SI-SDR) is first exported, EMA
        weights included, to ``savedir``.
    savedir : str
        Where a recipe output folder is exported to: by the main process only under DDP (the
        other ranks wait for it, then read the folder), written atomically (a concurrent reader
        sees the whole folder or none, see :mod:`speechbrain_diffsep.export`).
    sample_rate, num_spks : int, optional
        Raise if the model was made for another rate / number of sources.
    key : str
        The yaml key that named the folder, for the error messages.

    Returns
    -------
    dict with ``score_model`` (weights loaded), ``sde``, ``sample_rate``, ``num_spks``, ``folder``
    (the model folder used).
    """
    from .export import ExportError
    from .inference import CHECKPOINT_FILE, HPARAMS_FILE, check_model_folder, load_checkpoint_strict

    fix = (
        f"pass --{key}=<a model folder from python -m speechbrain_diffsep.export, "
        "or a recipe's output folder>"
    )
    path = Path(str(folder))
    if not path.is_dir():
        raise FileNotFoundError(f"{key} {str(folder)!r} does not exist; {fix}")
    try:
        if not (path / CHECKPOINT_FILE).is_file() and (path / "save").is_dir():
            path = _export_on_main(path, Path(savedir))
        check_model_folder(path)
        with open(path / HPARAMS_FILE, encoding="utf-8") as f:
            hp = load_hyperpyyaml(f)
        load_checkpoint_strict(hp["score_model"], path / CHECKPOINT_FILE)
    except (ExportError, ValueError, KeyError) as err:
        raise RecipeError(f"{key} {str(folder)!r}: {err}; {fix}") from None
    model = {"score_model": hp["score_model"], "sde": hp["sde"], "sample_rate": int(hp["sample_rate"]),
             "num_spks": int(hp["num_spks"]), "folder": str(path)}
    for name, want in (("sample_rate", sample_rate), ("num_spks", num_spks)):
        if want is not None and int(want) != model[name]:
            raise RecipeError(
                f"{key} {str(folder)!r} holds a model with {name}={model[name]}, "
                f"but the yaml has {name}={want}; use a matching model or data"
            )
    return model


def init_from_model_folder(brain, folder, savedir):
    """Fine-tuning: start training from the weights of a model folder (``init_from:`` in the yaml).

    Only when the Brain's ``save`` folder has no complete checkpoint: a run that has checkpoints
    resumes from them as always, so an interrupted fine-tuning continues where it stopped. The
    folder is a model folder or a recipe output folder (its best checkpoint), as
    ``--pretrained_folder`` of the test-only yamls (:func:`load_model_folder`); its network must have
    the yaml's sizes. The score model and its EMA both start from the folder's weights (the EMA
    averages on from them). Returns True if the weights were loaded.
    """
    from .brain import _is_complete
    from .inference import _state_dict_mismatch

    if brain.checkpointer is not None and brain.checkpointer.find_checkpoint(ckpt_predicate=_is_complete) is not None:
        return False
    if "score_model" not in brain.modules:
        raise RecipeError(f"init_from {str(folder)!r}: only the DiffSep yamls (modules: score_model) can start from a model folder")
    source = load_model_folder(
        folder, savedir, sample_rate=brain.hparams.sample_rate, num_spks=brain.hparams.num_spks, key="init_from"
    )
    target, weights = brain.modules.score_model, source["score_model"].state_dict()
    problem = _state_dict_mismatch(target.state_dict(), weights)
    if problem:
        raise RecipeError(
            f"init_from {str(folder)!r}: its network does not match the yaml's ({problem}); "
            "use a model trained with the same yaml sizes"
        )
    target.load_state_dict(weights)
    ema = getattr(brain, "ema", None)
    if ema is not None:
        ema.module.load_state_dict(weights)
        ema.n_averaged.fill_(1)  # average on from the folder's weights, not from the first step's
    sb.utils.distributed.ddp_barrier()
    if if_main_process():
        print(f"init_from: training starts from the weights of {source['folder']}", file=sys.stderr)
    return True


def _export_on_main(output_folder, savedir):
    """Export ``output_folder``'s best checkpoint to ``savedir`` on the main process; the other DDP
    ranks wait, then use the folder (a rank that does not see it, e.g. on a node without the shared
    file system, exports its own copy). An export error is raised on every rank."""
    from .export import ExportError, export_from_recipe
    from .inference import CHECKPOINT_FILE

    failure = None
    if if_main_process():
        try:
            export_from_recipe(output_folder, savedir, ckpt="best")
        except (ExportError, ValueError, KeyError) as err:
            failure = str(err)
        except Exception as err:  # tell the waiting ranks, then fail here with the traceback
            ddp_broadcast(f"the main process failed to export it ({type(err).__name__})")
            raise
    failure = ddp_broadcast(failure)  # also the barrier that lets the other ranks read the folder
    if failure is not None:
        raise ExportError(failure)
    if not (savedir / CHECKPOINT_FILE).is_file():
        export_from_recipe(output_folder, savedir, ckpt="best")
    return savedir


# --------------------------------------------------------------------------- enhancement
class EnhancementMetricStats(SeparationMetricStats):
    """Enhancement scores: the clean estimate and the noisy input, against the clean reference.

    Targets are ``[clean, noise]`` (``clean_index`` picks the speech); no permutation. For each
    utterance the metrics of the clean estimate (``si_sdr``, ``si_sdri`` = improvement over the
    noisy input, ``pesq`` (wide-band at 16 kHz), ``estoi``, DNSMOS ``ovrl``/``sig``/``bak``) and the
    same metrics of the noisy input itself (``noisy_si_sdr``, ``noisy_pesq``, ...) are stored, so
    the summary is the usual enhancement table with its "Noisy" row.

    Example
    -------
    >>> clean = torch.randn(1, 1, 4000); noise = 0.1 * torch.randn(1, 1, 4000)
    >>> stats = EnhancementMetricStats(fs=16000, metrics=("si_sdr", "si_sdri"))
    >>> stats.metrics
    ('si_sdr', 'si_sdri', 'noisy_si_sdr')
    >>> stats.append(["u"], torch.cat([clean, noise], 1), torch.cat([clean, noise], 1), clean + noise)
    >>> s = stats.summarize()
    >>> s["si_sdr"], round(s["si_sdri"] + s["noisy_si_sdr"], 3)
    (100.0, 100.0)
    """

    def __init__(self, fs, metrics=DEFAULT_METRICS, clean_index=0):
        super().__init__(fs, metrics, permute=False)
        self.estimate_metrics = self.metrics
        self.input_metrics = tuple(m for m in self.metrics if m != "si_sdri")
        self.metrics = self.estimate_metrics + tuple(f"noisy_{m}" for m in self.input_metrics)
        self.clean_index = int(clean_index)

    def append(self, ids, est, ref, mix, lengths=None):
        """Score a batch: ``est``, ``ref`` (batch, K, samples), ``mix`` (batch, 1, samples)."""
        if not (torch.is_tensor(est) and torch.is_tensor(ref)) or est.dim() != 3 or est.shape != ref.shape:
            shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in (est, ref)]
            raise ValueError(f"est and ref must be tensors shaped (batch, K, samples) alike, got {shapes[0]} and {shapes[1]}")
        if not 0 <= self.clean_index < est.shape[1]:
            raise ValueError(f"clean_index {self.clean_index} is not a target index of K={est.shape[1]}")
        if len(ids) != est.shape[0]:
            raise ValueError(f"got {len(ids)} ids for a batch of {est.shape[0]}")
        mix = mix.reshape(est.shape[0], 1, -1)
        n, c = est.shape[-1], self.clean_index
        for b, uid in enumerate(ids):
            stop = n if lengths is None else max(2, int(round(float(lengths[b]) * n)))
            clean, noisy = ref[b, c : c + 1, :stop], mix[b, :, :stop]
            est_clean = est[b, c : c + 1, :stop]
            res = evaluate_separation(est_clean, clean, noisy, self.fs, self.estimate_metrics, permute=False)
            base = evaluate_separation(noisy, clean, noisy, self.fs, self.input_metrics, permute=False)
            scores = {m: res[m] for m in self.estimate_metrics}
            scores.update({f"noisy_{m}": base[m] for m in self.input_metrics})
            scores["perm"] = list(range(est.shape[1]))
            self.ids.append(uid)
            self.scores.append(scores)
        self.summary = {}

    def write_csv(self, path):
        """One row per utterance (``ID`` and one column per metric), last row ``avg`` (NaN ignored)."""
        if not self.scores:
            raise ValueError("no utterance scored yet; call append() first")
        rows = [[uid] + [float(np.mean(res[m])) for m in self.metrics] for uid, res in zip(self.ids, self.scores)]
        avg = ["avg"] + [
            float(np.nanmean(col)) if not np.isnan(col).all() else math.nan
            for col in np.array([r[1:] for r in rows], dtype=np.float64).T
        ]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", *self.metrics])
            writer.writerows(rows)
            writer.writerow(avg)


class DiffSepEnhancementBrain(DiffSepBrain):
    """DiffSep for speech enhancement: targets ``[clean, noise]`` in this fixed order.

    Training is :class:`~speechbrain_diffsep.brain.DiffSepBrain`'s (use a
    :class:`~speechbrain_diffsep.sde.PriorMixingSDE` and ``loss_options: {shuffle: False}`` so the
    order is kept). Validation SI-SDR and the test metrics (:class:`EnhancementMetricStats`) score
    the clean estimate (target 0) only, without permutation; the test tables also hold the noisy
    input's scores.
    """

    def on_stage_start(self, stage, epoch=None):
        """As the parent; the test stage scores enhancement."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TEST:
            self.metric_stats = EnhancementMetricStats(
                fs=int(self.hparams.sample_rate), metrics=available_metrics(self.hparams.test_metrics)
            )

    def _valid_separations(self, ids, mix, sources, lengths):
        """SI-SDR of the clean estimate of the first ``n_valid_separations`` utterances."""
        for i in range(len(ids)):
            if self._valid_done >= self._valid_quota:
                return
            n = int(lengths[i])
            est = self.separate(mix[i : i + 1, :, :n], ids[i : i + 1], sb.Stage.VALID)
            self._valid_sisdr.append(float(si_sdr(est[0, 0], sources[i, 0, :n])))
            self._valid_done += 1


__all__ = [
    "RecipeError",
    "check_data_folder",
    "signal_keys",
    "audio_pipeline",
    "dataio_prep",
    "load_recipe_hparams",
    "build_brain",
    "run_recipe",
    "cli_main",
    "load_model_folder",
    "EnhancementMetricStats",
    "DiffSepEnhancementBrain",
]
