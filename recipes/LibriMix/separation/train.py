#!/usr/bin/env python3
"""Train and test DiffSep on Libri2Mix / Libri3Mix, or test a WSJ0-2mix model on Libri2Mix.

Usage (see README.md)::

    python train.py hparams/diffsep.yaml --data_folder=/path/to/LibriMix
    python train.py hparams/eval_wsj0mix_model.yaml --data_folder=/path/to/LibriMix \\
        --pretrained_folder=/path/to/model_folder

The data pipeline, training, resuming and the test stage are :mod:`speechbrain_diffsep.recipe`'s,
shared by all recipes; the mixture type (``mix_clean`` / ``mix_both``) and the training splits
come from the yaml.
"""

import os
import sys

from speechbrain_diffsep.recipe import cli_main, run_recipe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_librimix import prepare_librimix  # noqa: E402

DATA_HINT = "pass --data_folder=<folder holding Libri2Mix/wav8k/min/{train-360,dev,test}>"


def prepare(hparams):
    """Write the train/valid/test CSVs of Libri<K>Mix into ``save_folder``."""
    prepare_librimix(
        data_folder=hparams["data_folder"],
        save_folder=hparams["save_folder"],
        n_spks=hparams["num_spks"],
        sample_rate=hparams["sample_rate"],
        version=hparams["data_version"],
        mixture=hparams["mixture"],
        train_splits=hparams["train_splits"],
        skip_prep=hparams["skip_prep"],
    )


def main(argv=None):
    """Parse the command line, prepare the data, train (unless ``test_only``), test; returns the Brain."""
    return run_recipe(argv, prepare, DATA_HINT)


if __name__ == "__main__":
    cli_main(main)
