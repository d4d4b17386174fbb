"""Dynamic mixing: new mixtures of K distinct speakers every epoch, as SpeechBrain's SepFormer "DM" recipes.

Each training example is drawn afresh from a pool of single-speaker utterances: K distinct speakers
(a speaker drawn with probability proportional to its number of utterances, as SpeechBrain's
``dynamic_mixing.py``, or uniformly), one utterance of each, a random segment of
``segment_seconds``, each source optionally augmented (:mod:`speechbrain_diffsep.augment`), set
to a random level, optionally shifted (partial overlap), then summed. The mixture is EXACTLY the
sum of the sources (float32 sum of the returned tensors), as DiffSep needs; the optional peak
normalization scales all signals alike before the sum.

Per example, in order:

1. speakers and utterances, then per source a random window of ``segment * f`` samples of the
   utterance (``f``: the augmentation's largest speed-up, 1 without augmentation), resampled with
   ``scipy.signal.resample_poly`` when the pool's rate differs from ``sample_rate`` (the two rates
   must be integer multiples of each other);
2. augmentation of each source (its own generator), then the first ``segment`` samples; an
   utterance shorter than the segment is placed at a random offset, zeros around it;
3. levels, wsj0-2mix style: each source normalized to unit RMS over its own samples (zeros of
   the padding excluded), source 1 the reference, every other source ``g_k`` dB below it with
   ``g_k`` uniform in ``gain_db`` (default ``[0, 5]``: for K = 2 the wsj0-2mix rule, s1 at
   ``+g/2`` dB, s2 at ``-g/2`` dB), all gains shifted so their mean in dB is a level uniform in
   ``level_db`` dBFS (``null``: 0 dB, unit RMS);
4. offsets: with probability ``offset_prob`` (per source) the source starts late or stops early
   by a time uniform in ``[0, max_offset_seconds]`` (zeros), for partial overlaps;
5. ``peak_normalize: p``: everything scaled so the largest peak of the mixture and the sources is
   ``p`` (SpeechBrain's DM uses 0.9); ``null``: no scaling. Then ``mix = sum(sources)``.

Determinism: example ``index`` of epoch ``e`` on DDP rank ``r`` draws everything from one
``torch.Generator`` seeded by ``numpy.random.SeedSequence([seed, e, r, index])``: identical when
rerun (with any number of DataLoader workers, and after resuming), new every epoch
(:meth:`DynamicMixDataset.set_epoch`), different on each rank.

The pool
--------
* a pool CSV (``pool:`` in the yaml; e.g. ManyVoices' ``<out>/pool/train.csv``), one row per
  utterance with the columns ``id`` (or ``ID``), ``path`` (or ``wav``; absolute, or relative to
  ``pool_root``, by default the CSV's folder or, if the files are there, its parent, as
  ManyVoices writes them; a leading ``$data_root`` is replaced by ``pool_root``), ``speaker``
  (or ``spk_id``), optionally ``duration`` (seconds) and ``group`` (the recorded voice behind
  several speakers; ``distinct: group`` then never mixes two speakers of one group, as
  ManyVoices' own fixed mixtures). FLAC, WAV and whatever else soundfile reads.
* ``pool: null``: the sources of the training CSV (WSJ0-2mix / WSJ0-3mix / LibriMix / MiniMix),
  its ``s1_wav ... s<K>_wav`` columns. The speaker of each source comes from a column
  ``s<k>_spk`` when the CSV has one, else from the mixture ID (``speaker_rule``):
  ``wsj0`` (``01aa010b_0.97482_209a010p_-0.97482``: utterance ``01aa010b``, speaker = its first 3
  characters ``01a``, as SpeechBrain's DM), ``librimix`` (``103-1240-0003_1034-121119-0049``:
  speaker ``103``), ``minimix`` (``tr00001_flite-kal16_espeak-usm3``: speaker ``flite-kal16``),
  ``column`` (``s<k>_spk`` required) or ``auto`` (the first rule that parses the first row, in
  that order: column, wsj0, librimix, minimix). A wsj0 / LibriMix utterance appears in many
  mixtures: the pool keeps one file per utterance ID (the first seen). Note that wsj0-mix "min"
  sources are cut to their partner's length and carry their mixture's gain; the gain is undone
  by the level normalization, the cut stays (use the original utterances in a pool CSV for the
  full lengths).

Wiring it into the recipes (``recipe.py`` / ``brain.py``, not done here)
-----------------------------------------------------------------------
In :func:`speechbrain_diffsep.recipe.dataio_prep` (or ``run_recipe``), after the train set is
built, one line replaces it::

    from .dynamic_mixing import dynamic_mixing_from_hparams

    dm = dynamic_mixing_from_hparams(hparams)          # None unless dynamic_mixing.enabled
    if dm is not None and "train" in datasets:
        datasets["train"] = dm

and the Brain calls ``set_epoch`` at the start of each training epoch, e.g. in
``SeparationBrain.on_stage_start``::

    if stage == sb.Stage.TRAIN and hasattr(self, "train_mixer"):
        self.train_mixer.set_epoch(epoch)

with ``brain.train_mixer = datasets["train"]`` set in ``run_recipe`` when it is a
:class:`DynamicMixDataset` (SpeechBrain calls ``set_epoch`` on the sampler only). The DataLoader
must not use ``persistent_workers`` (workers copy the dataset, with its epoch, when an epoch's
iteration starts). The dataset is a SpeechBrain ``DynamicItemDataset``: SpeechBrain's
``make_dataloader`` gives it ``PaddedBatch`` and its shuffling sampler (DDP included) as for the
CSV train set; it yields ``id``, ``mix_sig``, ``s1_sig`` ... ``s<K>_sig`` (1-D float32 tensors of
``segment_seconds * sample_rate`` samples), the keys of ``recipe.audio_pipeline``.

yaml (hparams used: ``dynamic_mixing``, ``augmentation``, ``num_spks``, ``sample_rate``,
``segment_seconds``, ``train_data``, ``seed``)::

    dynamic_mixing:
        enabled: True
        pool: null                 # pool CSV; null: the s1..sK sources of train_data
        pool_root: null            # folder of the pool's relative paths (default: the CSV's)
        speaker_rule: auto         # pool null: auto | wsj0 | librimix | minimix | column
        examples_per_epoch: null   # null: as many as train_data has rows
        gain_db: [0.0, 5.0]        # level of source 1 over each other source
        level_db: [-30.0, -20.0]   # mean source level, dBFS RMS (null: unit RMS)
        peak_normalize: null       # e.g. 0.9: scale everything to this peak
        offset_prob: 0.0
        max_offset_seconds: 0.5
        speaker_weights: utterances  # or uniform
        distinct: speaker          # or group: K different groups (the pool's group column)
        seed: !ref <seed>
    augmentation:                  # speechbrain_diffsep.augment.SourceAugment options
        enabled: False
        ...
"""

import csv
import math
import os
import re

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.data_pipeline import provides, takes

from .augment import SourceAugment

SPEAKER_RULES = ("auto", "column", "wsj0", "librimix", "minimix")
SPEAKER_WEIGHTS = ("utterances", "uniform")
DISTINCT = ("speaker", "group")
#: Keys of the yaml's ``dynamic_mixing:`` block (:func:`dynamic_mixing_from_hparams`).
YAML_KEYS = (
    "enabled", "pool", "pool_root", "speaker_rule", "examples_per_epoch", "gain_db", "level_db",
    "peak_normalize", "offset_prob", "max_offset_seconds", "speaker_weights", "distinct", "seed",
)

_ALIASES = {"id": ("id", "ID"), "path": ("path", "wav", "file"), "speaker": ("speaker", "spk_id", "spk")}


def signal_keys(num_spks):
    """``["mix_sig", "s1_sig", ..., "s<K>_sig"]`` (as :func:`speechbrain_diffsep.recipe.signal_keys`)."""
    return ["mix_sig"] + [f"s{k}_sig" for k in range(1, num_spks + 1)]


# --------------------------------------------------------------------------- the pool
class SourcePool:
    """Utterances grouped by speaker: ``paths``, ``speakers`` (per utterance), ``ids``,
    ``by_speaker`` (speaker -> utterance indices), ``durations`` (seconds or None) and, when the
    pool tells them, ``group_of`` (speaker -> group: the recorded person behind several speakers,
    e.g. ManyVoices' pitch / warp / tempo variants of one voice; None otherwise)."""

    def __init__(self, ids, paths, speakers, durations=None, origin="pool", groups=None):
        if not paths:
            raise ValueError(f"{origin} holds no utterance; check the CSV")
        self.ids, self.paths, self.speakers = list(ids), list(paths), [str(s) for s in speakers]
        self.durations = list(durations) if durations is not None else [None] * len(self.paths)
        self.origin = origin
        self.by_speaker = {}
        for i, spk in enumerate(self.speakers):
            self.by_speaker.setdefault(spk, []).append(i)
        self.speaker_list = sorted(self.by_speaker)
        self.group_of = None
        if groups is not None:
            self.group_of = {spk: str(grp) for spk, grp in zip(self.speakers, groups)}

    def __len__(self):
        return len(self.paths)

    def check(self, num_spks, distinct="speaker"):
        """One-line errors: fewer than ``num_spks`` speakers (or groups), no groups, a missing file."""
        if distinct == "group":
            if self.group_of is None:
                raise ValueError(f"{self.origin} has no group column; set distinct: speaker or add a group column")
            names = sorted(set(self.group_of.values()))
        else:
            names = self.speaker_list
        if len(names) < num_spks:
            raise ValueError(
                f"{self.origin} has {len(names)} {distinct}(s) ({', '.join(names[:5])}) "
                f"but dynamic mixing needs {num_spks} distinct {distinct}s per mixture; add speakers or lower num_spks"
            )
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{self.origin}: {len(missing)} of {len(self.paths)} audio file(s) missing, e.g. {missing[0]}; "
                "fix the paths (or pool_root)"
            )
        return self

    def __repr__(self):
        return f"SourcePool({len(self)} utterances, {len(self.speaker_list)} speakers, from {self.origin})"


def _column(fieldnames, what, csv_path):
    for name in _ALIASES[what]:
        if name in fieldnames:
            return name
    raise ValueError(
        f"pool CSV {csv_path} has no {what} column (one of {list(_ALIASES[what])}); its columns are {list(fieldnames)}"
    )


def load_source_pool(csv_path, root=None):
    """A :class:`SourcePool` from a pool CSV: ``id``, ``path``/``wav``, ``speaker``
    [, ``duration``] [, ``group``].

    Relative paths are taken relative to ``root``; by default the CSV's folder, or its parent
    folder when the first file is there and not in the CSV's folder (ManyVoices writes
    ``<out>/pool/train.csv`` with paths relative to ``<out>``). A leading ``$data_root`` is
    replaced by ``root``.
    """
    csv_path = str(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"pool CSV {csv_path} does not exist; set dynamic_mixing.pool to a source pool CSV")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if not rows:
        raise ValueError(f"pool CSV {csv_path} holds no utterance; check the CSV")
    c_id, c_path, c_spk = (_column(fields, w, csv_path) for w in ("id", "path", "speaker"))
    if root is None:
        here = os.path.dirname(os.path.abspath(csv_path))
        first = rows[0][c_path].strip().replace("$data_root/", "")
        parent = os.path.dirname(here)
        use_parent = not os.path.isfile(os.path.join(here, first)) and os.path.isfile(os.path.join(parent, first))
        root = parent if use_parent else here
    root = str(root)
    ids, paths, spks, durs = [], [], [], []
    for row in rows:
        path = row[c_path].strip()
        if path.startswith("$data_root"):
            path = root + path[len("$data_root"):]
        elif not os.path.isabs(path):
            path = os.path.join(root, path)
        ids.append(row[c_id])
        paths.append(path)
        spks.append(row[c_spk])
        durs.append(float(row["duration"]) if row.get("duration") not in (None, "") else None)
    groups = [row["group"] for row in rows] if "group" in fields else None
    return SourcePool(ids, paths, spks, durs, origin=f"pool CSV {csv_path}", groups=groups)


_LIBRI = re.compile(r"^\d+-\d+-\d+$")


def _parse_wsj0(mix_id, num_spks):
    tokens = mix_id.split("_")
    if len(tokens) != 2 * num_spks:
        return None
    try:
        [float(t) for t in tokens[1::2]]
    except ValueError:
        return None
    utts = tokens[0::2]
    if not all(len(u) >= 4 for u in utts):
        return None
    return [(u[:3], u) for u in utts]


def _parse_librimix(mix_id, num_spks):
    tokens = mix_id.split("_")
    if len(tokens) != num_spks or not all(_LIBRI.match(t) for t in tokens):
        return None
    return [(t.split("-")[0], t) for t in tokens]


def _parse_minimix(mix_id, num_spks):
    tokens = mix_id.split("_")
    if len(tokens) != num_spks + 1 or not all(tokens[1:]):
        return None
    return [(t, None) for t in tokens[1:]]


_PARSERS = {"wsj0": _parse_wsj0, "librimix": _parse_librimix, "minimix": _parse_minimix}


def speakers_of_row(row, num_spks, rule):
    """``[(speaker, utterance key or None), ...]`` of the K sources of a mixture CSV row, or None."""
    if rule == "column":
        cols = [f"s{k}_spk" for k in range(1, num_spks + 1)]
        if not all(row.get(c) not in (None, "") for c in cols):
            return None
        return [(row[c], None) for c in cols]
    return _PARSERS[rule](row["ID"], num_spks)


def pool_from_mixture_csv(csv_paths, num_spks, speaker_rule="auto"):
    """A :class:`SourcePool` of the ``s1_wav ... s<K>_wav`` sources of mixture CSVs (``ID`` column),
    the speakers from ``s<k>_spk`` columns or the mixture IDs (see the module docstring)."""
    if speaker_rule not in SPEAKER_RULES:
        raise ValueError(f"speaker_rule must be one of {list(SPEAKER_RULES)}, got {speaker_rule!r}")
    paths_in = [csv_paths] if isinstance(csv_paths, (str, os.PathLike)) else list(csv_paths)
    rows = []
    for path in paths_in:
        if not os.path.isfile(str(path)):
            raise FileNotFoundError(f"training CSV {path} does not exist; run the data preparation first")
        with open(str(path), newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = [f"s{k}_wav" for k in range(1, num_spks + 1)]
            missing = [c for c in cols + ["ID"] if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"training CSV {path} has no column {missing[0]} (num_spks={num_spks}); "
                    f"its columns are {reader.fieldnames}"
                )
            rows.extend(list(reader))
    origin = f"the sources of {', '.join(str(p) for p in paths_in)}"
    if not rows:
        raise ValueError(f"{origin}: no rows")
    rule = speaker_rule
    if rule == "auto":
        for cand in ("column", "wsj0", "librimix", "minimix"):
            if speakers_of_row(rows[0], num_spks, cand) is not None:
                rule = cand
                break
        else:
            raise ValueError(
                f"cannot tell the speakers of mixture {rows[0]['ID']!r} of {origin}: add s1_spk..s{num_spks}_spk "
                "columns or name wsj0-mix / LibriMix / MiniMix IDs"
            )
    ids, paths, spks, durs, seen = [], [], [], [], set()
    for row in rows:
        parsed = speakers_of_row(row, num_spks, rule)
        if parsed is None:
            raise ValueError(
                f"mixture {row['ID']!r} of {origin} does not follow speaker_rule {rule!r}; "
                "set speaker_rule or add s<k>_spk columns"
            )
        for k, (spk, utt) in enumerate(parsed, start=1):
            path = row[f"s{k}_wav"]
            key = utt if utt is not None else path
            if key in seen:
                continue
            seen.add(key)
            ids.append(utt if utt is not None else f"{row['ID']}_s{k}")
            paths.append(path)
            spks.append(spk)
            durs.append(float(row["duration"]) if row.get("duration") not in (None, "") else None)
    pool = SourcePool(ids, paths, spks, durs, origin=origin)
    pool.rule = rule
    return pool


# --------------------------------------------------------------------------- audio
def resample_ratio(file_rate, sample_rate, path="audio"):
    """``(up, down)`` for ``resample_poly`` from ``file_rate`` to ``sample_rate``; one-line error
    unless one rate is an integer multiple of the other."""
    file_rate, sample_rate = int(file_rate), int(sample_rate)
    if file_rate == sample_rate:
        return 1, 1
    if sample_rate % file_rate == 0:
        return sample_rate // file_rate, 1
    if file_rate % sample_rate == 0:
        return 1, file_rate // sample_rate
    raise ValueError(
        f"{path} is sampled at {file_rate} Hz, not an integer multiple or divisor of sample_rate={sample_rate}; "
        "resample the pool or change sample_rate"
    )


def read_window(path, sample_rate, num_samples, generator):
    """A random window of ``num_samples`` samples (at ``sample_rate``) of an audio file: the whole
    file if shorter; first channel; resampled if the file's rate differs (integer ratio)."""
    with sf.SoundFile(path) as f:
        up, down = resample_ratio(f.samplerate, sample_rate, path)
        frames = f.frames
        need = int(math.ceil(num_samples * down / up))
        start = 0
        if frames > need:
            start = int(torch.randint(0, frames - need + 1, (), generator=generator))
            f.seek(start)
            data = f.read(need, dtype="float32", always_2d=True)
        else:
            data = f.read(dtype="float32", always_2d=True)
    x = data[:, 0]
    if (up, down) != (1, 1):
        x = resample_poly(x, up, down).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x[:num_samples]))


def example_seed(seed, epoch, rank, index):
    """The 62-bit seed of one example (stable across platforms and numpy versions).

    Example
    -------
    >>> example_seed(0, 1, 0, 5) == example_seed(0, 1, 0, 5) != example_seed(0, 2, 0, 5)
    True
    """
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(rank), int(index)]).generate_state(1, np.uint64)
    return int(state[0] >> 2)


def _check_range(name, value, nonneg=False):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"dynamic_mixing option {name} must be a [low, high] pair of numbers, got {value!r}") from None
    if lo > hi or (nonneg and lo < 0):
        raise ValueError(f"dynamic_mixing option {name} must have {'0 <= ' if nonneg else ''}low <= high, got {[lo, hi]}")
    return lo, hi


def _default_rank():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# --------------------------------------------------------------------------- the data set
class DynamicMixDataset(DynamicItemDataset):
    """Mixtures drawn afresh per (seed, epoch, rank, index) from a :class:`SourcePool`.

    A SpeechBrain ``DynamicItemDataset`` of ``num_examples`` items with the output keys ``id``,
    ``mix_sig``, ``s1_sig`` ... ``s<K>_sig`` (see the module docstring for the recipe).

    Arguments
    ---------
    pool : SourcePool
        The utterances (at least ``num_spks`` speakers; every file must exist).
    num_spks : int
        K, distinct speakers per mixture.
    sample_rate : int
        Rate of the output (the pool's files may be at an integer multiple / divisor).
    segment_seconds : float
        Length of every example.
    num_examples : int
        Examples per epoch.
    seed, rank, epoch : int
        The draws depend on ``(seed, epoch, rank, index)`` only; ``rank`` defaults to the DDP rank.
    gain_db, level_db, peak_normalize, offset_prob, max_offset_seconds, speaker_weights, distinct
        See the module docstring.
    augment : SourceAugment or dict, optional
        Per-source augmentation (:class:`speechbrain_diffsep.augment.SourceAugment` options).

    Example
    -------
    >>> import tempfile, soundfile as sf, numpy as np, os
    >>> d = tempfile.mkdtemp(); rows = []
    >>> for i, spk in enumerate(["a", "a", "b", "c"]):
    ...     p = os.path.join(d, f"{i}.wav"); sf.write(p, np.random.randn(4000) * 0.1, 8000)
    ...     rows.append((f"u{i}", p, spk))
    >>> pool = SourcePool(*zip(*rows))
    >>> ds = DynamicMixDataset(pool, num_spks=2, sample_rate=8000, segment_seconds=0.25, num_examples=3)
    >>> ex = ds[0]; sorted(ex)
    ['id', 'mix_sig', 's1_sig', 's2_sig']
    >>> bool(torch.equal(ex["mix_sig"], ex["s1_sig"] + ex["s2_sig"])), ex["mix_sig"].shape
    (True, torch.Size([2000]))
    """

    def __init__(
        self,
        pool,
        num_spks,
        sample_rate,
        segment_seconds,
        num_examples,
        seed=0,
        rank=None,
        epoch=0,
        gain_db=(0.0, 5.0),
        level_db=(-30.0, -20.0),
        peak_normalize=None,
        offset_prob=0.0,
        max_offset_seconds=0.5,
        speaker_weights="utterances",
        augment=None,
        distinct="speaker",
    ):
        if not isinstance(pool, SourcePool):
            raise ValueError(f"pool must be a SourcePool (load_source_pool / pool_from_mixture_csv), got {type(pool).__name__}")
        if not isinstance(num_spks, int) or num_spks < 1:
            raise ValueError(f"num_spks must be a positive integer, got {num_spks!r}")
        if segment_seconds is None or float(segment_seconds) <= 0:
            raise ValueError(
                f"dynamic mixing needs segment_seconds > 0, got {segment_seconds!r}; set segment_seconds in the yaml"
            )
        if int(num_examples) < 1:
            raise ValueError(f"examples_per_epoch must be >= 1, got {num_examples!r}")
        if distinct not in DISTINCT:
            raise ValueError(f"dynamic_mixing option distinct must be one of {list(DISTINCT)}, got {distinct!r}")
        self.distinct = distinct
        self.pool = pool.check(num_spks, distinct)
        self.num_spks, self.sample_rate = int(num_spks), int(sample_rate)
        self.segment = int(round(float(segment_seconds) * self.sample_rate))
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank = _default_rank() if rank is None else int(rank)
        self.gain_db = _check_range("gain_db", gain_db)
        self.level_db = None if level_db is None else _check_range("level_db", level_db)
        if peak_normalize is not None and not float(peak_normalize) > 0:
            raise ValueError(f"dynamic_mixing option peak_normalize must be null or > 0, got {peak_normalize!r}")
        self.peak_normalize = None if peak_normalize is None else float(peak_normalize)
        if not 0.0 <= float(offset_prob) <= 1.0:
            raise ValueError(f"dynamic_mixing option offset_prob must lie in [0, 1], got {offset_prob!r}")
        self.offset_prob = float(offset_prob)
        if float(max_offset_seconds) < 0:
            raise ValueError(f"dynamic_mixing option max_offset_seconds must be >= 0, got {max_offset_seconds!r}")
        self.max_offset = int(round(float(max_offset_seconds) * self.sample_rate))
        if speaker_weights not in SPEAKER_WEIGHTS:
            raise ValueError(
                f"dynamic_mixing option speaker_weights must be one of {list(SPEAKER_WEIGHTS)}, got {speaker_weights!r}"
            )
        self.speaker_weights = speaker_weights
        if augment is not None and not isinstance(augment, SourceAugment):
            augment = SourceAugment(**dict(augment))
        self.augment = augment if augment is not None and augment.active else None
        # check the rate of one file now (the others when read): a mismatch is a one-line error
        with sf.SoundFile(self.pool.paths[0]) as f:
            resample_ratio(f.samplerate, self.sample_rate, self.pool.paths[0])
        counts = torch.tensor([len(self.pool.by_speaker[s]) for s in self.pool.speaker_list], dtype=torch.float64)
        self._spk_weights = counts if speaker_weights == "utterances" else torch.ones_like(counts)
        self._group_members = {}
        if self.pool.group_of is not None:
            for j, spk in enumerate(self.pool.speaker_list):
                self._group_members.setdefault(self.pool.group_of[spk], []).append(j)

        keys = signal_keys(self.num_spks)

        @takes("index")
        @provides(*keys)
        def pipeline(index):
            ex = self.example(int(index))
            for key in keys:
                yield ex[key]

        data = {f"dm{i:07d}": {"index": i} for i in range(int(num_examples))}
        super().__init__(data, dynamic_items=[pipeline], output_keys=["id"] + keys)

    def set_epoch(self, epoch):
        """New draws for ``epoch`` (call at the start of every training epoch)."""
        self.epoch = int(epoch)

    def generator(self, index, epoch=None):
        """The generator of example ``index`` of ``epoch`` (default: the current one) on this rank."""
        epoch = self.epoch if epoch is None else epoch
        return torch.Generator().manual_seed(example_seed(self.seed, epoch, self.rank, index))

    def draw_utterances(self, g):
        """K utterance indices of K distinct speakers."""
        weights = self._spk_weights.clone()
        chosen = []
        for _ in range(self.num_spks):
            s = int(torch.multinomial(weights, 1, generator=g))
            weights[s] = 0.0
            if self.distinct == "group":  # none of the chosen speaker's group again
                for j in self._group_members[self.pool.group_of[self.pool.speaker_list[s]]]:
                    weights[j] = 0.0
            utts = self.pool.by_speaker[self.pool.speaker_list[s]]
            chosen.append(utts[int(torch.randint(len(utts), (), generator=g))])
        return chosen

    def _place(self, x, g):
        """First ``segment`` samples of ``x``, or ``x`` at a random offset in zeros if shorter;
        also returns the mask of the samples that came from ``x``."""
        n = self.segment
        out = torch.zeros(n)
        mask = torch.zeros(n, dtype=torch.bool)
        if x.shape[-1] >= n:
            out[:] = x[:n]
            mask[:] = True
        else:
            start = int(torch.randint(0, n - x.shape[-1] + 1, (), generator=g))
            out[start : start + x.shape[-1]] = x
            mask[start : start + x.shape[-1]] = True
        return out, mask

    def example(self, index, epoch=None):
        """Example ``index`` as a dict: ``id``, ``mix_sig``, ``s1_sig`` ... (1-D float32), plus
        ``speakers`` and ``utterances`` (pool IDs), ``gains_db`` (levels relative to unit RMS)."""
        g = self.generator(index, epoch)
        utts = self.draw_utterances(g)
        read_len = int(math.ceil(self.segment * (self.augment.max_length_factor if self.augment else 1.0)))
        sources, masks = [], []
        for u in utts:
            gu = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            x = read_window(self.pool.paths[u], self.sample_rate, read_len, gu)
            if self.augment is not None:
                x = self.augment(x, self.sample_rate, gu)
            x, mask = self._place(x, gu)
            sources.append(x)
            masks.append(mask)
        # levels: unit RMS over each source's own samples, source 1 the reference
        lo, hi = self.gain_db
        rel = [0.0] + [-(lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64)))
                       for _ in range(self.num_spks - 1)]
        mean = sum(rel) / len(rel)
        level = 0.0
        if self.level_db is not None:
            lo, hi = self.level_db
            level = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
        gains = [r - mean + level for r in rel]
        for k, (x, mask) in enumerate(zip(sources, masks)):
            rms = float(torch.sqrt(torch.mean(x[mask].double() ** 2))) if mask.any() else 0.0
            if rms > 0:
                sources[k] = (x.double() * (10.0 ** (gains[k] / 20.0) / rms)).float()
        # offsets: start late or stop early
        if self.offset_prob > 0 and self.max_offset > 0:
            for k in range(self.num_spks):
                if float(torch.rand((), generator=g)) < self.offset_prob:
                    shift = int(torch.randint(0, self.max_offset + 1, (), generator=g))
                    if float(torch.rand((), generator=g)) < 0.5:
                        sources[k][: min(shift, self.segment)] = 0.0
                    elif shift > 0:
                        sources[k][-shift:] = 0.0
        src = torch.stack(sources)
        if self.peak_normalize is not None:
            peak = max(float(src.abs().max()), float(src.sum(0).abs().max()))
            if peak > 0:
                src = src * (self.peak_normalize / peak)
        out = {"id": f"dm{index:07d}", "mix_sig": src.sum(0)}
        for k in range(self.num_spks):
            out[f"s{k + 1}_sig"] = src[k]
        out["speakers"] = [self.pool.speakers[u] for u in utts]
        out["utterances"] = [self.pool.ids[u] for u in utts]
        out["gains_db"] = gains
        return out


# --------------------------------------------------------------------------- from the yaml
def _count_rows(csv_path):
    with open(str(csv_path), newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def dynamic_mixing_from_hparams(hparams, rank=None):
    """The training set of the yaml's ``dynamic_mixing:`` block, or None when it is absent or
    ``enabled`` is false. The ``augmentation:`` block (if present and ``enabled``) augments each
    source. See the module docstring for the keys and the recipe wiring.
    """
    opts = hparams["dynamic_mixing"] if "dynamic_mixing" in hparams else None
    if not opts or not opts.get("enabled", False):
        return None
    unknown = sorted(k for k in opts if k not in YAML_KEYS)
    if unknown:
        raise ValueError(f"unknown dynamic_mixing option {unknown[0]!r}; known options: {', '.join(YAML_KEYS)}")
    num_spks = int(hparams["num_spks"])
    if opts.get("pool"):
        pool = load_source_pool(opts["pool"], opts.get("pool_root"))
    else:
        pool = pool_from_mixture_csv(hparams["train_data"], num_spks, opts.get("speaker_rule", "auto") or "auto")
    n = opts.get("examples_per_epoch")
    if n is None:
        n = _count_rows(hparams["train_data"]) if os.path.isfile(str(hparams.get("train_data", ""))) else len(pool)
    aug = hparams["augmentation"] if "augmentation" in hparams else None
    augment = SourceAugment(**dict(aug)) if aug else None
    seed = opts.get("seed")
    return DynamicMixDataset(
        pool,
        num_spks=num_spks,
        sample_rate=int(hparams["sample_rate"]),
        segment_seconds=hparams.get("segment_seconds"),
        num_examples=int(n),
        seed=int(hparams.get("seed", 0) if seed is None else seed),
        rank=rank,
        gain_db=opts.get("gain_db", (0.0, 5.0)),
        level_db=opts.get("level_db", (-30.0, -20.0)),
        peak_normalize=opts.get("peak_normalize"),
        offset_prob=opts.get("offset_prob", 0.0),
        max_offset_seconds=opts.get("max_offset_seconds", 0.5),
        speaker_weights=opts.get("speaker_weights", "utterances"),
        augment=augment,
        distinct=opts.get("distinct", "speaker"),
    )


__all__ = [
    "SourcePool",
    "load_source_pool",
    "pool_from_mixture_csv",
    "speakers_of_row",
    "read_window",
    "resample_ratio",
    "example_seed",
    "DynamicMixDataset",
    "dynamic_mixing_from_hparams",
    "YAML_KEYS",
]
