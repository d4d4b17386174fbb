"""Shared helpers for the data preparation scripts (layout checks, file matching, CSV writing).

The recipe-level ``prepare_*`` functions (``recipes/*/prepare_*.py``) describe a data set's folder
layout and use these helpers to

* check the layout and fail with ONE line that names exactly what is missing or misnamed and how
  to fix ``--data_folder`` (:class:`DataLayoutError`);
* check that the mixture and source folders hold the same file names;
* write SpeechBrain CSV manifests (``ID,duration,<paths...>``, durations in seconds, absolute
  paths) and skip that work on a re-run with the same options (SpeechBrain convention).
"""

import csv
import difflib
import json
import logging
import os

import soundfile as sf

logger = logging.getLogger(__name__)

OPTS_FILE = "prep_options.json"


class DataLayoutError(FileNotFoundError):
    """A data folder does not have the expected layout (the message says what and how to fix)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _fmt_set(names):
    names = list(names)
    return names[0] if len(names) == 1 else "{" + ",".join(names) + "}"


def _close_names(parent, name, known=()):
    """Entries of ``parent`` that look like a misspelling / other casing of ``name``.

    Entries listed in ``known`` (legitimate names of the layout, e.g. another split) are never
    suggested.
    """
    try:
        entries = sorted(e for e in os.listdir(parent) if e not in known)
    except OSError:
        return []
    lower = {e.lower(): e for e in entries}
    found = [lower[name.lower()]] if name.lower() in lower else []
    found += [e for e in difflib.get_close_matches(name, entries, n=3, cutoff=0.6) if e not in found]
    return found


def check_data_folder(data_folder, dataset, hint):
    """Raise :class:`DataLayoutError` if ``data_folder`` is not an existing folder."""
    if data_folder is None or not os.path.isdir(str(data_folder)):
        raise DataLayoutError(f"{dataset}: data folder {data_folder} does not exist; {hint}")
    return os.path.abspath(str(data_folder))


def require_dirs(parent, names, dataset, hint, known=()):
    """Check that every folder in ``names`` exists under ``parent``; return their paths.

    The error names the first missing folder, the expected set, any look-alike folder that is
    there instead (``'S2'``, ``'s_2'``...; never one of ``known``, the other legitimate names of
    the layout) and the ``hint`` on how to fix it, all on one line.

    Example
    -------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "mix")); os.makedirs(os.path.join(root, "S1"))
    >>> try:
    ...     require_dirs(root, ["mix", "s1"], "demo", "fix it")
    ... except DataLayoutError as err:
    ...     print(str(err).replace(root, "<root>"))
    demo: missing folder <root>/s1 (expected {mix,s1} under <root>; found 'S1' instead, misnamed?); fix it
    """
    paths = []
    for name in names:
        path = os.path.join(parent, name)
        if not os.path.isdir(path):
            close = _close_names(parent, name, known)
            found = f"; found {', '.join(repr(c) for c in close)} instead, misnamed?" if close else ""
            raise DataLayoutError(
                f"{dataset}: missing folder {path} (expected {_fmt_set(names)} under {parent}{found}); {hint}"
            )
        paths.append(path)
    return paths


def list_audio(folder, dataset, hint, ext=".wav"):
    """Sorted file names ending in ``ext`` in ``folder``; an empty folder is an error."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(ext) and not f.startswith("."))
    if not names:
        raise DataLayoutError(f"{dataset}: no {ext} files in {folder}; {hint}")
    return names


def match_file_lists(folders, dataset, ext=".wav"):
    """Check that all ``folders`` (dict label -> path) hold the same ``ext`` file names.

    Returns the sorted common list. The first folder is the reference; the error gives the
    counts and an example name on each side.
    """
    labels = list(folders)
    ref_label = labels[0]
    ref_names = list_audio(folders[ref_label], dataset, "check that the data set was extracted completely", ext)
    ref_set = set(ref_names)
    for label in labels[1:]:
        names = set(list_audio(folders[label], dataset, "check that the data set was extracted completely", ext))
        if names != ref_set:
            only_ref = sorted(ref_set - names)
            only_other = sorted(names - ref_set)
            parts = []
            if only_ref:
                parts.append(f"{len(only_ref)} file(s) of {ref_label} missing in {label} (e.g. {only_ref[0]!r})")
            if only_other:
                parts.append(f"{len(only_other)} file(s) of {label} missing in {ref_label} (e.g. {only_other[0]!r})")
            raise DataLayoutError(
                f"{dataset}: file names differ between {folders[ref_label]} and {folders[label]}: "
                f"{'; '.join(parts)}; every {ref_label} file needs a same-named file in each source folder"
            )
    return ref_names


def check_sample_rate(path, sample_rate, dataset, hint):
    """Raise :class:`DataLayoutError` unless the wav file ``path`` is sampled at ``sample_rate``."""
    rate = sf.info(path).samplerate
    if rate != sample_rate:
        raise DataLayoutError(f"{dataset}: {path} is sampled at {rate} Hz, expected {sample_rate} Hz; {hint}")


def audio_duration(path):
    """Duration of an audio file in seconds (from its header, via soundfile)."""
    info = sf.info(path)
    return info.frames / info.samplerate


def write_csv(path, rows, fieldnames):
    """Write a SpeechBrain CSV manifest: a header then one row per dict of ``rows``.

    ``fieldnames`` must start with ``ID`` and ``duration``. IDs must be unique. The file is
    written to a temporary name first and renamed, so an interrupted run leaves no partial CSV.
    """
    if list(fieldnames[:2]) != ["ID", "duration"]:
        raise ValueError(f"fieldnames must start with ['ID', 'duration'], got {list(fieldnames)}")
    seen = set()
    for row in rows:
        if row["ID"] in seen:
            raise ValueError(f"duplicate ID {row['ID']!r} while writing {path}; IDs must be unique")
        seen.add(row["ID"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            out = dict(row)
            out["duration"] = f"{float(row['duration']):.6f}"
            writer.writerow(out)
    os.replace(tmp, path)
    logger.info("wrote %s (%d rows)", path, len(rows))


def read_csv(path):
    """Rows of a CSV manifest as a list of dicts (strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def csv_paths(save_folder, splits=("train", "valid", "test")):
    """``{split: <save_folder>/<split>.csv}``."""
    return {s: os.path.join(save_folder, f"{s}.csv") for s in splits}


def already_prepared(save_folder, options, splits=("train", "valid", "test")):
    """True when every split CSV exists and was written with the same ``options`` (a dict)."""
    opts_path = os.path.join(save_folder, OPTS_FILE)
    if not all(os.path.isfile(p) for p in csv_paths(save_folder, splits).values()):
        return False
    if not os.path.isfile(opts_path):
        return False
    with open(opts_path, encoding="utf-8") as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError:
            return False
    return saved == json.loads(json.dumps(options))


def save_options(save_folder, options):
    """Record the options the CSVs were written with (read back by :func:`already_prepared`)."""
    os.makedirs(save_folder, exist_ok=True)
    with open(os.path.join(save_folder, OPTS_FILE), "w", encoding="utf-8") as f:
        json.dump(options, f, indent=2, sort_keys=True)


def should_skip(save_folder, options, skip_prep, dataset, splits=("train", "valid", "test")):
    """SpeechBrain convention: skip with ``skip_prep`` or when the CSVs are already up to date."""
    if skip_prep:
        missing = [p for p in csv_paths(save_folder, splits).values() if not os.path.isfile(p)]
        if missing:
            logger.warning("%s: skip_prep is set but %s does not exist", dataset, missing[0])
        return True
    if already_prepared(save_folder, options, splits):
        logger.info("%s: CSVs in %s are up to date, skipping preparation", dataset, save_folder)
        return True
    return False


def mixture_rows(split_dir, mix_folder, source_folders, dataset, hint, known, sample_rate, rate_hint):
    """CSV rows of one split folder holding ``<mix_folder>/`` and ``<source>/`` folders of same-named wavs.

    Checks that the folders exist and hold the same file names and that the mixtures are at
    ``sample_rate``; each row is ``ID, duration, mix_wav, <source>_wav...`` (absolute paths as given).
    """
    names_of = [mix_folder] + list(source_folders)
    folders = dict(zip(names_of, require_dirs(split_dir, names_of, dataset, hint, known)))
    names = match_file_lists(folders, dataset)
    check_sample_rate(os.path.join(folders[mix_folder], names[0]), sample_rate, dataset, rate_hint)
    rows = []
    for name in names:
        mix_path = os.path.join(folders[mix_folder], name)
        row = {"ID": os.path.splitext(name)[0], "duration": audio_duration(mix_path), "mix_wav": mix_path}
        for src in source_folders:
            row[f"{src}_wav"] = os.path.join(folders[src], name)
        rows.append(row)
    return rows
