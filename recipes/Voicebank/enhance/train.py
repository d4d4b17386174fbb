#!/usr/bin/env python3
"""Train and test DiffSep for speech enhancement on VoiceBank-DEMAND (16 kHz).

Usage (see README.md)::

    python train.py hparams/diffsep.yaml --data_folder=/path/to/VoiceBank-DEMAND
    python train.py hparams/diffsep_small.yaml --data_folder=...

Enhancement is DiffSep with K = 2 targets [clean, noisy - clean] (the second one is built in the
data pipeline) and the PriorMixingSDE. The data pipeline, training, resuming and the test stage are
:mod:`speechbrain_diffsep.recipe`'s, shared by all recipes; the test stage scores the clean estimate
(and the noisy input) with :class:`speechbrain_diffsep.recipe.DiffSepEnhancementBrain`.
"""

import os
import sys

from speechbrain_diffsep.recipe import cli_main, run_recipe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_voicebank import prepare_voicebank  # noqa: E402

DATA_HINT = "pass --data_folder=<folder holding clean_trainset_28spk_wav/, noisy_trainset_28spk_wav/, ...>"


def prepare(hparams):
    """Resample VoiceBank-DEMAND once and write the train/valid/test CSVs into ``save_folder``."""
    prepare_voicebank(
        data_folder=hparams["data_folder"],
        save_folder=hparams["save_folder"],
        sample_rate=hparams["sample_rate"],
        valid_speakers=hparams["valid_speakers"],
        skip_prep=hparams["skip_prep"],
    )


def main(argv=None):
    """Parse the command line, prepare the data, train, test; returns the Brain."""
    return run_recipe(argv, prepare, DATA_HINT, mixture="noisy_wav", sources=["clean_wav"], residual_target=True)


if __name__ == "__main__":
    cli_main(main)
