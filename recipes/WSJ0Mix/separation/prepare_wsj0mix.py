"""Data preparation for WSJ0-2mix / WSJ0-3mix (and MiniMix, which uses the same layout).

Expected layout (the output of the standard wsj0-mix generation scripts)::

    <data_folder>/wav8k/min/tr/mix/<name>.wav      (also wav16k/, max/)
    <data_folder>/wav8k/min/tr/s1/<name>.wav
    <data_folder>/wav8k/min/tr/s2/<name>.wav       (s3/ for 3 speakers)
    <data_folder>/wav8k/min/cv/...                  -> valid.csv
    <data_folder>/wav8k/min/tt/...                  -> test.csv

``data_folder`` may also be the parent of ``2speakers/`` (or ``3speakers/``) holding ``wav8k/``.
The CSVs have columns ``ID,duration,mix_wav,s1_wav,s2_wav[,s3_wav]`` (seconds, absolute paths).

Usage::

    python prepare_wsj0mix.py /path/to/wsj0-2mix /path/to/save [--n_spks 2 --sample_rate 8000]
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

DATASET = "wsj0-mix"
SPLITS = {"train": "tr", "valid": "cv", "test": "tt"}
RATE_FOLDERS = {8000: "wav8k", 16000: "wav16k"}
#: Legitimate wsj0-mix folder names, never suggested as a misspelling of another one.
KNOWN = ("wav8k", "wav16k", "min", "max", "tr", "cv", "tt", "mix", "s1", "s2", "s3")


def resolve_root(data_folder, n_spks, rate_folder):
    """The folder that holds ``wav8k/`` (``data_folder`` itself or its ``<n>speakers/``)."""
    if not os.path.isdir(os.path.join(data_folder, rate_folder)):
        nested = os.path.join(data_folder, f"{n_spks}speakers")
        if os.path.isdir(os.path.join(nested, rate_folder)):
            return nested
    return data_folder


def prepare_wsj0mix(data_folder, save_folder, n_spks=2, sample_rate=8000, version="min", skip_prep=False):
    """Write ``train.csv``, ``valid.csv`` and ``test.csv`` for wsj0-mix into ``save_folder``.

    Arguments
    ---------
    data_folder : str
        Folder that contains ``wav8k/`` (or ``wav16k/``), or the parent of ``<n>speakers/``.
    save_folder : str
        Where the CSVs go.
    n_spks : int
        2 or 3 speakers (folders ``s1..s<n>``).
    sample_rate : int
        8000 (``wav8k``) or 16000 (``wav16k``).
    version : str
        ``"min"`` or ``"max"``.
    skip_prep : bool
        Do nothing (the CSVs are assumed to be there).

    Raises
    ------
    DataLayoutError (a FileNotFoundError) with a one-line message naming the missing or
    misnamed folder or the mismatched files; ValueError for bad arguments.
    """
    if n_spks not in (2, 3):
        raise ValueError(f"n_spks must be 2 or 3, got {n_spks!r}")
    if sample_rate not in RATE_FOLDERS:
        raise ValueError(f"sample_rate must be 8000 or 16000, got {sample_rate!r}")
    if version not in ("min", "max"):
        raise ValueError(f"version must be 'min' or 'max', got {version!r}")
    rate_folder = RATE_FOLDERS[sample_rate]
    hint = f"set --data_folder to the folder that contains {rate_folder}/"
    options = {
        "data_folder": os.path.abspath(str(data_folder)),
        "n_spks": n_spks,
        "sample_rate": sample_rate,
        "version": version,
    }
    if should_skip(save_folder, options, skip_prep, DATASET):
        return

    root = resolve_root(check_data_folder(data_folder, DATASET, hint), n_spks, rate_folder)
    (rate_dir,) = require_dirs(root, [rate_folder], DATASET, hint, KNOWN)
    (version_dir,) = require_dirs(rate_dir, [version], DATASET, hint, KNOWN)
    split_dirs = require_dirs(version_dir, list(SPLITS.values()), DATASET, hint, KNOWN)
    sources = [f"s{k}" for k in range(1, n_spks + 1)]
    fields = ["ID", "duration", "mix_wav"] + [f"{s}_wav" for s in sources]

    for split, split_dir in zip(SPLITS, split_dirs):
        rows = mixture_rows(
            split_dir, "mix", sources, DATASET, hint, KNOWN, sample_rate, f"use --sample_rate matching {rate_folder}"
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        prepare_wsj0mix(args.data_folder, args.save_folder, args.n_spks, args.sample_rate, args.version)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
