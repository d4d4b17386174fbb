#!/usr/bin/env python3
"""Train and test a separation model on WSJ0-2mix / WSJ0-3mix (or a MiniMix in the same layout).

Usage (see README.md)::

    python train.py hparams/diffsep.yaml --data_folder=/path/to/wsj0-2mix
    torchrun --nproc_per_node=4 train.py hparams/diffsep.yaml --data_folder=... --precision=bf16
    python train.py hparams/convtasnet.yaml --data_folder=...

The yaml picks the Brain (``brain_class``): :class:`speechbrain_diffsep.brain.DiffSepBrain` or
:class:`speechbrain_diffsep.brain.ConvTasNetBrain`. Both share this data pipeline, validation and
test stage. Training resumes from the last complete checkpoint in ``<output_folder>/save``;
``--test_only`` skips training and tests the best checkpoint (by validation SI-SDR).
"""

import os
import sys

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.utils.distributed import run_on_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_wsj0mix import prepare_wsj0mix  # noqa: E402


def check_data_folder(data_folder):
    """Raise ``FileNotFoundError`` (one line) if the dataset folder is missing."""
    if data_folder is None or not os.path.isdir(str(data_folder)):
        raise FileNotFoundError(
            f"data_folder {data_folder!r} does not exist; pass --data_folder=<folder holding "
            "wav8k/min/{tr,cv,tt}> (a MiniMix can be made with recipes/MiniMix/generate_minimix.py)"
        )


def audio_pipeline(num_spks, sample_rate, segment=None):
    """A SpeechBrain dynamic item: paths -> ``mix_sig, s1_sig, ... s<K>_sig``.

    With ``segment`` (samples) every signal is the same random crop of that length (zero-padded
    at the end if the utterance is shorter); without it the whole utterance is read.
    """
    wav_keys = ["mix_wav"] + [f"s{k}_wav" for k in range(1, num_spks + 1)]
    sig_keys = ["mix_sig"] + [f"s{k}_sig" for k in range(1, num_spks + 1)]

    @sb.utils.data_pipeline.takes("duration", *wav_keys)
    @sb.utils.data_pipeline.provides(*sig_keys)
    def pipeline(duration, *paths):
        start, stop = 0, None
        if segment is not None:
            n = int(round(float(duration) * sample_rate))
            if n > segment:
                start = int(torch.randint(0, n - segment + 1, (1,)))
                stop = start + segment
        for path in paths:
            if stop is None:
                sig = sb.dataio.dataio.read_audio(path)
            else:
                sig = sb.dataio.dataio.read_audio({"file": path, "start": start, "stop": stop})
            if segment is not None and sig.shape[-1] < segment:
                sig = torch.nn.functional.pad(sig, (0, segment - sig.shape[-1]))
            yield sig

    return pipeline


def dataio_prep(hparams):
    """Train/valid/test ``DynamicItemDataset`` objects from the CSVs of the data preparation."""
    num_spks, sr = int(hparams["num_spks"]), int(hparams["sample_rate"])
    segment = hparams["segment_seconds"]
    segment = None if segment is None else int(round(float(segment) * sr))
    keys = ["id", "mix_sig"] + [f"s{k}_sig" for k in range(1, num_spks + 1)]
    datasets = {}
    csvs = {"train": hparams["train_data"], "valid": hparams["valid_data"], "test": hparams["test_data"]}
    for split, csv_path in csvs.items():
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=csv_path)
        seg = segment if split == "train" else None
        ds.add_dynamic_item(audio_pipeline(num_spks, sr, seg))
        ds.set_output_keys(keys)
        datasets[split] = ds
    return datasets


def main(argv=None):
    """Parse the command line, prepare the data, train, test; returns the Brain."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.utils.distributed.ddp_init_group(run_opts)
    check_data_folder(hparams["data_folder"])
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(
        prepare_wsj0mix,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["save_folder"],
            "n_spks": hparams["num_spks"],
            "sample_rate": hparams["sample_rate"],
            "version": hparams["data_version"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    datasets = dataio_prep(hparams)

    brain = hparams["brain_class"](
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.evaluate(
        datasets["test"],
        max_key="si_sdr",
        test_loader_kwargs=hparams["test_dataloader_opts"],
    )
    return brain


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # missing data folder / bad layout: one line, no traceback
        sys.exit(f"error: {err}")
