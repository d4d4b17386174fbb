#!/usr/bin/env python3
"""Train and test a separation model on WSJ0-2mix / WSJ0-3mix (or a MiniMix in the same layout).

Usage (see README.md)::

    python train.py hparams/diffsep.yaml --data_folder=/path/to/wsj0-2mix
    torchrun --nproc_per_node=4 train.py hparams/diffsep.yaml --data_folder=... --precision=bf16
    python train.py hparams/convtasnet.yaml --data_folder=...

The yaml picks the Brain (``brain_class``): DiffSep or the Conv-TasNet baseline. The data pipeline,
training, resuming and the test stage are :mod:`speechbrain_diffsep.recipe`'s, shared by all recipes.
"""

import os
import sys

from speechbrain_diffsep.recipe import cli_main, dataio_prep, run_recipe  # noqa: F401 (dataio_prep: benchmarks)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_wsj0mix import prepare_wsj0mix  # noqa: E402

DATA_HINT = (
    "pass --data_folder=<folder holding wav8k/min/{tr,cv,tt}> "
    "(a MiniMix can be made with recipes/MiniMix/generate_minimix.py)"
)


def prepare(hparams):
    """Write the train/valid/test CSVs of WSJ0-<K>mix into ``save_folder``."""
    prepare_wsj0mix(
        data_folder=hparams["data_folder"],
        save_folder=hparams["save_folder"],
        n_spks=hparams["num_spks"],
        sample_rate=hparams["sample_rate"],
        version=hparams["data_version"],
        skip_prep=hparams["skip_prep"],
    )


def main(argv=None):
    """Parse the command line, prepare the data, train, test; returns the Brain."""
    return run_recipe(argv, prepare, DATA_HINT)


if __name__ == "__main__":
    cli_main(main)
