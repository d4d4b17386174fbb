"""Data preparation for VoiceBank-DEMAND (Valentini-Botinhao et al., 2016), speech enhancement.

Expected layout (as distributed, 48 kHz wav files)::

    <data_folder>/clean_trainset_28spk_wav/p226_001.wav
    <data_folder>/noisy_trainset_28spk_wav/p226_001.wav
    <data_folder>/clean_testset_wav/p232_001.wav
    <data_folder>/noisy_testset_wav/p232_001.wav

The files are resampled once to ``sample_rate`` (16 kHz by default; soundfile +
``torchaudio.functional.resample``, written as 32-bit float wav so nothing clips) into
``<save_folder>/wav16k/<same folder names>/``; existing resampled files are reused.

Validation split: the 28 training speakers minus ``valid_speakers`` (default ``p226`` and ``p287``,
one female and one male speaker, as SpeechBrain's VoiceBank recipes) form ``train.csv``; all the
utterances of ``valid_speakers`` form ``valid.csv``; the official test set (speakers p232, p257)
is ``test.csv``. Columns: ``ID,duration,noisy_wav,clean_wav`` (seconds, absolute paths).
"""

import argparse
import logging
import os
import sys

import soundfile as sf
import torch
import torchaudio

from speechbrain_diffsep.dataprep import (
    DataLayoutError,
    audio_duration,
    check_data_folder,
    csv_paths,
    match_file_lists,
    require_dirs,
    save_options,
    should_skip,
    write_csv,
)

logger = logging.getLogger(__name__)

DATASET = "VoiceBank-DEMAND"
FOLDERS = {
    "clean_train": "clean_trainset_28spk_wav",
    "noisy_train": "noisy_trainset_28spk_wav",
    "clean_test": "clean_testset_wav",
    "noisy_test": "noisy_testset_wav",
}
VALID_SPEAKERS = ("p226", "p287")


def speaker_of(name):
    """Speaker ID of a VoiceBank file name: ``'p226_001.wav' -> 'p226'``."""
    return name.split("_")[0]


def resample_file(src, dst, sample_rate):
    """Resample the wav ``src`` to ``sample_rate`` into ``dst`` (skipped if ``dst`` is already done)."""
    if os.path.isfile(dst) and sf.info(dst).samplerate == sample_rate:
        return dst
    x, rate = sf.read(src, dtype="float32", always_2d=True)
    y = torch.from_numpy(x.T.copy())
    if rate != sample_rate:
        y = torchaudio.functional.resample(y, rate, sample_rate)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp.wav"
    sf.write(tmp, y.T.numpy(), sample_rate, subtype="FLOAT")
    os.replace(tmp, dst)
    return dst


def prepare_voicebank(data_folder, save_folder, sample_rate=16000, valid_speakers=VALID_SPEAKERS, skip_prep=False):
    """Resample VoiceBank-DEMAND once and write ``train.csv``, ``valid.csv``, ``test.csv``.

    Arguments
    ---------
    data_folder : str
        Folder holding the four ``*_wav`` folders of the distribution.
    save_folder : str
        Where the CSVs and the resampled audio (``wav<k>k/``) go.
    sample_rate : int
        Target rate; 48000 keeps the original files (no copy).
    valid_speakers : sequence of str
        Training speakers held out for validation.
    skip_prep : bool
        Do nothing.
    """
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    valid_speakers = [valid_speakers] if isinstance(valid_speakers, str) else list(valid_speakers)
    if not valid_speakers:
        raise ValueError("valid_speakers must name at least one training speaker, e.g. ['p226', 'p287']")
    hint = "set --data_folder to the folder that contains clean_trainset_28spk_wav/"
    options = {
        "data_folder": os.path.abspath(str(data_folder)),
        "sample_rate": sample_rate,
        "valid_speakers": valid_speakers,
    }
    if should_skip(save_folder, options, skip_prep, DATASET):
        return

    data_folder = check_data_folder(data_folder, DATASET, hint)
    dirs = dict(zip(FOLDERS, require_dirs(data_folder, list(FOLDERS.values()), DATASET, hint, FOLDERS.values())))
    train_names = match_file_lists({"noisy": dirs["noisy_train"], "clean": dirs["clean_train"]}, DATASET)
    test_names = match_file_lists({"noisy": dirs["noisy_test"], "clean": dirs["clean_test"]}, DATASET)

    speakers = sorted({speaker_of(n) for n in train_names})
    unknown = [s for s in valid_speakers if s not in speakers]
    if unknown:
        raise ValueError(
            f"valid_speakers {unknown} are not training speakers of {dirs['clean_train']} "
            f"(found {speakers[:5]}{'...' if len(speakers) > 5 else ''}); pick held-out speakers from that list"
        )
    if set(valid_speakers) >= set(speakers):
        raise ValueError(f"valid_speakers {valid_speakers} would leave no training speaker; hold out fewer")

    out_root = data_folder if sample_rate == 48000 else os.path.join(os.path.abspath(save_folder), f"wav{sample_rate // 1000}k")

    def make_rows(names, noisy_key, clean_key):
        rows = []
        for name in _progress(names, f"{DATASET} {noisy_key.split('_')[1]}"):
            paths = {}
            for key, col in ((noisy_key, "noisy_wav"), (clean_key, "clean_wav")):
                src = os.path.join(dirs[key], name)
                paths[col] = src if sample_rate == 48000 else resample_file(
                    src, os.path.join(out_root, FOLDERS[key], name), sample_rate
                )
            rows.append({"ID": os.path.splitext(name)[0], "duration": audio_duration(paths["noisy_wav"]), **paths})
        return rows

    if sample_rate == 48000:
        rate = sf.info(os.path.join(dirs["noisy_train"], train_names[0])).samplerate
        if rate != 48000:
            raise DataLayoutError(f"{DATASET}: {dirs['noisy_train']} holds {rate} Hz files, not 48000 Hz; {hint}")
    train_rows = make_rows(train_names, "noisy_train", "clean_train")
    test_rows = make_rows(test_names, "noisy_test", "clean_test")
    fields = ["ID", "duration", "noisy_wav", "clean_wav"]
    held_out = set(valid_speakers)
    paths = csv_paths(save_folder)
    write_csv(paths["train"], [r for r in train_rows if speaker_of(r["ID"]) not in held_out], fields)
    write_csv(paths["valid"], [r for r in train_rows if speaker_of(r["ID"]) in held_out], fields)
    write_csv(paths["test"], test_rows, fields)
    save_options(save_folder, options)


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with speechbrain
        return items
    return tqdm(items, desc=desc, disable=len(items) < 50, leave=False)


def main(argv=None):
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("--sample_rate", type=int, default=16000)
    parser.add_argument("--valid_speakers", nargs="+", default=list(VALID_SPEAKERS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        prepare_voicebank(args.data_folder, args.save_folder, args.sample_rate, args.valid_speakers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
