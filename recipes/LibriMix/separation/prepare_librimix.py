"""Data preparation for Libri2Mix / Libri3Mix.

Expected layout (the output of the LibriMix generation scripts)::

    <data_folder>/Libri2Mix/wav8k/min/train-100/{mix_clean,mix_both,s1,s2,noise}/<name>.wav
    <data_folder>/Libri2Mix/wav8k/min/train-360/...
    <data_folder>/Libri2Mix/wav8k/min/dev/...      -> valid.csv
    <data_folder>/Libri2Mix/wav8k/min/test/...     -> test.csv

``data_folder`` may also be the ``Libri2Mix`` folder itself. ``mixture="clean"`` uses
``mix_clean`` (sources only); ``mixture="both"`` uses ``mix_both`` (sources + WHAM! noise) and adds
a ``noise_wav`` column. ``train_splits`` selects ``train-100`` and/or ``train-360`` (their rows are
concatenated into train.csv). Only the folders that are needed are checked.

CSV columns: ``ID,duration,mix_wav,s1_wav,s2_wav[,s3_wav][,noise_wav]``.
"""

import argparse
import logging
import os
import sys

from speechbrain_diffsep.dataprep import (
    check_data_folder,
    csv_paths,
    mixture_rows,
    require_dirs,
    save_options,
    should_skip,
    write_csv,
)

logger = logging.getLogger(__name__)

DATASET = "LibriMix"
RATE_FOLDERS = {8000: "wav8k", 16000: "wav16k"}
TRAIN_SPLITS = ("train-100", "train-360")
MIXTURES = {"clean": "mix_clean", "both": "mix_both"}
#: Legitimate LibriMix folder names, never suggested as a misspelling of another one.
KNOWN = ("wav8k", "wav16k", "min", "max", "dev", "test", "mix_single", "s1", "s2", "s3", "noise") + TRAIN_SPLITS + tuple(
    MIXTURES.values()
)


def prepare_librimix(
    data_folder,
    save_folder,
    n_spks=2,
    sample_rate=8000,
    version="min",
    mixture="clean",
    train_splits=("train-360",),
    skip_prep=False,
):
    """Write ``train.csv``, ``valid.csv`` (dev) and ``test.csv`` for LibriMix into ``save_folder``.

    Arguments
    ---------
    data_folder : str
        Folder containing ``Libri<n>Mix/`` (or that folder itself).
    save_folder : str
        Where the CSVs go.
    n_spks : int
        2 or 3.
    sample_rate : int
        8000 or 16000.
    version : str
        ``"min"`` or ``"max"``.
    mixture : str
        ``"clean"`` (``mix_clean``) or ``"both"`` (``mix_both``, speech + noise, adds ``noise_wav``).
    train_splits : sequence of str
        Any of ``"train-100"``, ``"train-360"``.
    skip_prep : bool
        Do nothing.
    """
    if n_spks not in (2, 3):
        raise ValueError(f"n_spks must be 2 or 3, got {n_spks!r}")
    if sample_rate not in RATE_FOLDERS:
        raise ValueError(f"sample_rate must be 8000 or 16000, got {sample_rate!r}")
    if version not in ("min", "max"):
        raise ValueError(f"version must be 'min' or 'max', got {version!r}")
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be 'clean' or 'both', got {mixture!r}")
    if isinstance(train_splits, str):
        train_splits = [train_splits]
    train_splits = list(train_splits)
    bad = [s for s in train_splits if s not in TRAIN_SPLITS]
    if bad or not train_splits:
        raise ValueError(f"train_splits must be a non-empty subset of {list(TRAIN_SPLITS)}, got {train_splits}")

    libri = f"Libri{n_spks}Mix"
    rate_folder = RATE_FOLDERS[sample_rate]
    hint = f"set --data_folder to the folder that contains {libri}/"
    options = {
        "data_folder": os.path.abspath(str(data_folder)),
        "n_spks": n_spks,
        "sample_rate": sample_rate,
        "version": version,
        "mixture": mixture,
        "train_splits": train_splits,
    }
    if should_skip(save_folder, options, skip_prep, DATASET):
        return

    data_folder = check_data_folder(data_folder, DATASET, hint)
    if os.path.basename(os.path.normpath(data_folder)) == libri:
        root = data_folder
    else:
        (root,) = require_dirs(data_folder, [libri], DATASET, hint, KNOWN)
    (rate_dir,) = require_dirs(root, [rate_folder], DATASET, hint, KNOWN)
    (version_dir,) = require_dirs(rate_dir, [version], DATASET, hint, KNOWN)

    mix_folder = MIXTURES[mixture]
    sources = [f"s{k}" for k in range(1, n_spks + 1)]
    extra = ["noise"] if mixture == "both" else []
    fields = ["ID", "duration", "mix_wav"] + [f"{s}_wav" for s in sources + extra]
    plan = {"train": train_splits, "valid": ["dev"], "test": ["test"]}
    split_dirs = require_dirs(version_dir, train_splits + ["dev", "test"], DATASET, hint, KNOWN)
    split_dirs = dict(zip(train_splits + ["dev", "test"], split_dirs))

    for split, parts in plan.items():
        rows = []
        for part in parts:
            rows += mixture_rows(
                split_dirs[part], mix_folder, sources + extra, DATASET, hint, KNOWN, sample_rate,
                f"use --sample_rate matching {rate_folder}",
            )
        write_csv(csv_paths(save_folder)[split], rows, fields)
    save_options(save_folder, options)


def main(argv=None):
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("--n_spks", type=int, default=2)
    parser.add_argument("--sample_rate", type=int, default=8000)
    parser.add_argument("--version", default="min")
    parser.add_argument("--mixture", default="clean", choices=list(MIXTURES))
    parser.add_argument("--train_splits", nargs="+", default=["train-360"], choices=list(TRAIN_SPLITS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        prepare_librimix(
            args.data_folder, args.save_folder, args.n_spks, args.sample_rate, args.version, args.mixture, args.train_splits
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
