"""Evaluation metrics for speech separation and enhancement, following the DiffSep paper.

The paper's protocol (authors' ``evaluate.py``) is:

1. choose the permutation of the estimates that maximizes the mean **SI-SIR**
   (``fast_bss_eval.si_bss_eval_sources(ref, est, zero_mean=False, clamp_db=100)``);
2. per source, after that permutation: SI-SDR (same call), PESQ (narrow-band at 8 kHz,
   wide-band at 16 kHz), ESTOI (``pystoi.stoi(..., extended=True)``) and DNSMOS P.835
   OVRL/SIG/BAK (16 kHz input).

Everything here is a plain function over tensors shaped ``(..., K, samples)`` (the project's
``(batch, K, samples)`` convention), plus :class:`SeparationMetricStats`, a SpeechBrain-style
accumulator with ``append``/``summarize``/``write_stats``/``write_csv``.

Scale-invariant decomposition (Vincent et al. 2006 with a one-tap distortion filter, Le Roux et
al. 2019). For an estimate ``e`` and references ``r_1..r_K`` (rows of ``R``)::

    s_target = <e, r_j> / ||r_j||^2 r_j            (projection on the target reference)
    P_all e  = R^T (R R^T)^{-1} R e                 (projection on all the references)
    e_interf = P_all e - s_target,   e_artif = e - P_all e
    SI-SDR = 10 log10 ||s_target||^2 / ||e - s_target||^2
    SI-SIR = 10 log10 ||s_target||^2 / ||e_interf||^2
    SI-SAR = 10 log10 ||P_all e||^2 / ||e_artif||^2
"""

import csv
import itertools
import logging
import math
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Metric names understood by :func:`evaluate_separation` (``"dnsmos"`` expands to the last three).
ALL_METRICS = ("si_sdr", "si_sdri", "si_sir", "si_sar", "pesq", "estoi", "ovrl", "sig", "bak")
DEFAULT_METRICS = ("si_sdr", "si_sdri", "pesq", "estoi")
_DNSMOS_KEYS = ("ovrl", "sig", "bak")
_EVAL_EXTRA_HINT = "pip install speechbrain-diffsep[eval]  (installs speechmos, onnxruntime, librosa)"


# --------------------------------------------------------------------------- input checks
def _as_tensor(x, name):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] < 2:
        raise ValueError(f"{name} must have a time axis of at least 2 samples, got shape {tuple(x.shape)}")
    return x


def _check_pair(est, ref):
    est = _as_tensor(est, "est")
    ref = _as_tensor(ref, "ref")
    if est.shape != ref.shape:
        raise ValueError(
            f"est and ref must have the same shape (..., K, samples), got {tuple(est.shape)} and "
            f"{tuple(ref.shape)}; crop both to the same length"
        )
    return est, ref


def _to_db(num, den, clamp_db=None):
    """10 log10(num / den) for energies in float64: +inf when den = 0, -inf when num = 0.

    Optionally clamped to ``[-clamp_db, clamp_db]``.
    """
    tiny = torch.finfo(torch.float64).tiny
    db = 10 * (torch.log10(num.clamp_min(tiny)) - torch.log10(den.clamp_min(tiny)))
    db = torch.where(den <= 0, torch.full_like(db, math.inf), db)
    db = torch.where(num <= 0, torch.full_like(db, -math.inf), db)
    if clamp_db is not None:
        db = db.clamp(-clamp_db, clamp_db)
    return db


# --------------------------------------------------------------------------- SI-SDR
def si_sdr(est, ref, zero_mean=True, clamp_db=None):
    """Scale-invariant signal-to-distortion ratio in dB, one value per source.

    Arguments
    ---------
    est, ref : torch.Tensor
        Same shape ``(..., samples)``, e.g. ``(batch, K, samples)``; estimates already aligned
        to the references (see :func:`best_permutation`).
    zero_mean : bool
        Remove the mean of each signal first (the usual SI-SDR). The paper's evaluation uses
        ``False`` (fast_bss_eval's default); for speech the difference is negligible.
    clamp_db : float, optional
        Clamp the result to ``[-clamp_db, clamp_db]`` (the paper uses 100).

    Returns
    -------
    torch.Tensor shaped ``est.shape[:-1]`` (computed in float64, returned in est's dtype).

    Example
    -------
    >>> ref = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    >>> noise = torch.tensor([[1.0, 1.0, -1.0, -1.0]]) * 0.1  # orthogonal, 20 dB below
    >>> round(float(si_sdr(3 * (ref + noise), ref)), 4)
    20.0
    """
    est, ref = _check_pair(est, ref)
    out_dtype = est.dtype if est.is_floating_point() else torch.float32
    e, r = est.double(), ref.double()
    if zero_mean:
        e = e - e.mean(-1, keepdim=True)
        r = r - r.mean(-1, keepdim=True)
    dot = (e * r).sum(-1)
    r_energy = (r * r).sum(-1)
    target_energy = dot**2 / r_energy.clamp_min(torch.finfo(torch.float64).tiny)
    distortion_energy = ((e * e).sum(-1) - target_energy).clamp_min(0.0)
    return _to_db(target_energy, distortion_energy, clamp_db).to(out_dtype)


def si_sdr_improvement(est, ref, mix, zero_mean=True, clamp_db=None):
    """SI-SDR of the estimates minus SI-SDR of the unprocessed mixture, per source (dB).

    ``mix`` is broadcast against ``ref``: shape ``(batch, 1, samples)`` for ``(batch, K, samples)``
    references, or ``(samples,)`` for a single source.

    Example
    -------
    >>> ref = torch.randn(1, 2, 800)
    >>> mix = ref.sum(1, keepdim=True)
    >>> bool((si_sdr_improvement(ref + 0.01 * torch.randn(1, 2, 800), ref, mix) > 10).all())
    True
    """
    est, ref = _check_pair(est, ref)
    mix = _as_tensor(mix, "mix")
    try:
        mix = torch.broadcast_to(mix, ref.shape)
    except RuntimeError:
        raise ValueError(
            f"mix shape {tuple(mix.shape)} does not broadcast to ref shape {tuple(ref.shape)}; "
            "pass mix as (batch, 1, samples)"
        ) from None
    return si_sdr(est, ref, zero_mean, clamp_db) - si_sdr(mix, ref, zero_mean, clamp_db)


# --------------------------------------------------------------------------- SI-SIR / permutation
def _decomposition_energies(est, ref, zero_mean):
    """Energies of the scale-invariant decomposition for every (reference, estimate) pair.

    Returns ``(target, projection_all, total)`` with ``target`` shaped (..., K_ref, K_est) =
    ||s_target||^2 of estimate j on reference i, and the other two shaped (..., 1, K_est).
    """
    e, r = est.double(), ref.double()
    if zero_mean:
        e = e - e.mean(-1, keepdim=True)
        r = r - r.mean(-1, keepdim=True)
    gram = r @ r.transpose(-1, -2)  # (..., K, K)
    xcorr = r @ e.transpose(-1, -2)  # (..., K_ref, K_est)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    # tiny diagonal loading so that silent or collinear references stay solvable
    load = 1e-12 * diag.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    gram = gram + torch.diag_embed(load.expand_as(diag))
    target = xcorr**2 / diag.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    proj_all = (xcorr * torch.linalg.solve(gram, xcorr)).sum(-2, keepdim=True)
    total = (e * e).sum(-1).unsqueeze(-2)
    return target, proj_all, total


def pairwise_si_sir(est, ref, zero_mean=False, clamp_db=None):
    """SI-SIR of every estimate against every reference, shaped (..., K_ref, K_est) in dB.

    The interference subspace is spanned by all references, as in bss_eval with a one-tap
    filter (fast_bss_eval ``si_bss_eval_sources``).
    """
    est, ref = _check_pair(est, ref)
    if est.dim() < 2:
        raise ValueError(f"est must be shaped (..., K, samples), got {tuple(est.shape)}")
    target, proj_all, _ = _decomposition_energies(est, ref, zero_mean)
    return _to_db(target, (proj_all - target).clamp_min(0.0), clamp_db)


def best_permutation(est, ref, zero_mean=False):
    """Permutation of the estimates that maximizes the mean SI-SIR (the paper's choice).

    Arguments
    ---------
    est, ref : torch.Tensor
        ``(batch, K, samples)``.

    Returns
    -------
    torch.LongTensor ``perm`` shaped (batch, K) such that ``est[b, perm[b, k]]`` is the estimate
    of ``ref[b, k]``; apply it with :func:`apply_permutation`.

    Example
    -------
    >>> ref = torch.randn(1, 2, 1000)
    >>> best_permutation(ref.flip(1) + 0.1 * torch.randn(1, 2, 1000), ref).tolist()
    [[1, 0]]
    """
    est, ref = _check_pair(est, ref)
    if est.dim() != 3:
        raise ValueError(f"est and ref must be shaped (batch, K, samples), got {tuple(est.shape)}")
    n_src = est.shape[1]
    if n_src > 8:
        raise ValueError(f"best_permutation searches all K! permutations; K={n_src} is too many (max 8)")
    with torch.no_grad():
        sir = pairwise_si_sir(est.detach(), ref.detach(), zero_mean=zero_mean, clamp_db=100.0)  # (B, K_ref, K_est)
    perms = torch.tensor(list(itertools.permutations(range(n_src))), dtype=torch.long, device=sir.device)  # (P, K)
    rows = torch.arange(n_src, device=sir.device)
    scores = sir[:, rows, perms]  # (B, P, K): ref k paired with est perms[p, k]
    best = scores.mean(-1).argmax(-1)
    return perms[best]


def apply_permutation(est, perm):
    """Reorder ``est`` (batch, K, samples) with ``perm`` (batch, K) from :func:`best_permutation`."""
    if perm.shape != est.shape[:2]:
        raise ValueError(f"perm must be shaped (batch, K) = {tuple(est.shape[:2])}, got {tuple(perm.shape)}")
    return torch.gather(est, 1, perm.to(est.device).unsqueeze(-1).expand_as(est))


def si_bss_eval(est, ref, zero_mean=False, clamp_db=None):
    """SI-SDR, SI-SIR and SI-SAR (dB) of aligned estimates, each shaped (..., K).

    ``est[..., k, :]`` is evaluated against ``ref[..., k, :]`` with all references spanning the
    interference subspace (fast_bss_eval ``si_bss_eval_sources`` with the permutation fixed).
    """
    est, ref = _check_pair(est, ref)
    if est.dim() < 2:
        raise ValueError(f"est must be shaped (..., K, samples), got {tuple(est.shape)}")
    target, proj_all, total = _decomposition_energies(est, ref, zero_mean)
    target = torch.diagonal(target, dim1=-2, dim2=-1)
    proj_all, total = proj_all.squeeze(-2), total.squeeze(-2)
    sdr = _to_db(target, (total - target).clamp_min(0.0), clamp_db)
    sir = _to_db(target, (proj_all - target).clamp_min(0.0), clamp_db)
    sar = _to_db(proj_all, (total - proj_all).clamp_min(0.0), clamp_db)
    return sdr, sir, sar


# --------------------------------------------------------------------------- PESQ / ESTOI
def _to_numpy_rows(x, name):
    x = _as_tensor(x, name)
    arr = x.detach().cpu().double().numpy()
    return arr.reshape(-1, arr.shape[-1]), tuple(x.shape[:-1])


def pesq_score(est, ref, fs, mode=None):
    """PESQ of ``est`` against ``ref`` (ITU-T P.862 via the ``pesq`` package).

    ``mode`` defaults to ``'nb'`` at 8 kHz and ``'wb'`` at 16 kHz, as in the paper. Inputs are
    ``(..., samples)``; returns a float64 tensor shaped ``est.shape[:-1]``. A signal that PESQ
    rejects (e.g. no utterance detected, too short) gives NaN and a logged warning.
    """
    from pesq import PesqError, pesq

    if fs not in (8000, 16000):
        raise ValueError(f"fs must be 8000 or 16000 for PESQ, got {fs}; resample the signals first")
    mode = mode or ("nb" if fs == 8000 else "wb")
    if mode not in ("nb", "wb") or (mode == "wb" and fs != 16000):
        raise ValueError(f"mode must be 'nb' (8 or 16 kHz) or 'wb' (16 kHz only), got {mode!r} at fs={fs}")
    est, ref = _check_pair(est, ref)
    e_rows, shape = _to_numpy_rows(est, "est")
    r_rows, _ = _to_numpy_rows(ref, "ref")
    out = []
    for e, r in zip(e_rows, r_rows):
        try:
            out.append(pesq(fs, r, e, mode))
        except PesqError as err:
            logger.warning("PESQ failed (%s: %s); scoring this signal as NaN", type(err).__name__, err)
            out.append(math.nan)
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def estoi_score(est, ref, fs):
    """Extended STOI (``pystoi.stoi(ref, est, fs, extended=True)``), shaped ``est.shape[:-1]``."""
    from pystoi import stoi

    est, ref = _check_pair(est, ref)
    e_rows, shape = _to_numpy_rows(est, "est")
    r_rows, _ = _to_numpy_rows(ref, "ref")
    out = [stoi(r, e, fs, extended=True) for e, r in zip(e_rows, r_rows)]
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


# --------------------------------------------------------------------------- DNSMOS
def _import_speechmos():
    try:
        from speechmos import dnsmos as _dnsmos
    except ImportError as err:
        raise ImportError(f"DNSMOS needs the optional evaluation packages ({err}); run: {_EVAL_EXTRA_HINT}") from None
    return _dnsmos


def dnsmos(est, fs):
    """DNSMOS P.835 (non-intrusive) OVRL, SIG and BAK scores, via the ``speechmos`` package.

    The signal is resampled to 16 kHz (``torchaudio.functional.resample``). speechmos requires
    samples in [-1, 1]; a louder signal is scaled down to a peak of 1 (DNSMOS is evaluated on
    wav files in the paper, which are within that range). The ONNX models ship inside the
    speechmos wheel, so this works offline.

    Arguments
    ---------
    est : torch.Tensor
        ``(..., samples)``.
    fs : int
        Sampling rate of ``est``.

    Returns
    -------
    dict with keys ``"ovrl"``, ``"sig"``, ``"bak"``, each a float64 tensor shaped ``est.shape[:-1]``.
    """
    import torchaudio

    backend = _import_speechmos()
    est = _as_tensor(est, "est")
    if not isinstance(fs, int) or fs <= 0:
        raise ValueError(f"fs must be a positive int, got {fs!r}")
    x = est.detach().cpu().float()
    if fs != 16000:
        x = torchaudio.functional.resample(x, fs, 16000)
    rows, shape = _to_numpy_rows(x, "est")
    out = {k: [] for k in _DNSMOS_KEYS}
    for row in rows:
        peak = np.abs(row).max()
        if peak > 1.0:
            row = row / peak
        res = backend.run(row.astype(np.float32), 16000)
        out["ovrl"].append(float(res["ovrl_mos"]))
        out["sig"].append(float(res["sig_mos"]))
        out["bak"].append(float(res["bak_mos"]))
    return {k: torch.tensor(v, dtype=torch.float64).reshape(shape) for k, v in out.items()}


# --------------------------------------------------------------------------- per utterance
def _expand_metrics(metrics):
    names = []
    for m in metrics:
        if m == "dnsmos":
            names.extend(_DNSMOS_KEYS)
        elif m in ALL_METRICS:
            names.append(m)
        else:
            raise ValueError(f"unknown metric {m!r}; choose from {ALL_METRICS + ('dnsmos',)}")
    return tuple(dict.fromkeys(names))


def evaluate_separation(est, ref, mix, fs, metrics=DEFAULT_METRICS, permute=True, clamp_db=100.0):
    """Evaluate one utterance as in the paper: SI-SIR permutation, then per-source metrics.

    Arguments
    ---------
    est, ref : torch.Tensor
        ``(K, samples)`` or ``(1, K, samples)``.
    mix : torch.Tensor
        ``(samples,)``, ``(1, samples)`` or ``(1, 1, samples)``; used by ``si_sdri``.
    fs : int
        Sampling rate (PESQ is 'nb' at 8 kHz, 'wb' at 16 kHz).
    metrics : sequence of str
        Any of :data:`ALL_METRICS` (``"dnsmos"`` = ``ovrl``, ``sig``, ``bak``).
    permute : bool
        Align the estimates by the SI-SIR permutation first.
    clamp_db : float
        Clamp for the SI-* metrics (the paper uses 100 dB).

    Returns
    -------
    dict: metric name -> list of K floats (one per reference source), plus ``"perm"`` (list of K
    ints, ``est`` index used for each reference). SI-* metrics use ``zero_mean=False`` as the
    paper (fast_bss_eval's default).

    Example
    -------
    >>> ref = torch.randn(2, 4000)
    >>> out = evaluate_separation(ref.flip(0), ref, ref.sum(0), 8000, metrics=("si_sdr",))
    >>> out["perm"], out["si_sdr"] == [100.0, 100.0]
    ([1, 0], True)
    """
    names = _expand_metrics(metrics)
    est = _as_tensor(est, "est")
    ref = _as_tensor(ref, "ref")
    if est.dim() == 2:
        est, ref = est.unsqueeze(0), ref.unsqueeze(0)
    if est.dim() != 3 or est.shape[0] != 1:
        raise ValueError(f"est must be shaped (K, samples) or (1, K, samples) for one utterance, got {tuple(est.shape)}")
    est, ref = _check_pair(est, ref)
    mix = _as_tensor(mix, "mix").reshape(1, 1, -1)
    if mix.shape[-1] != ref.shape[-1]:
        raise ValueError(f"mix has {mix.shape[-1]} samples but ref has {ref.shape[-1]}; crop them to the same length")

    perm = best_permutation(est, ref) if permute else torch.arange(est.shape[1]).unsqueeze(0)
    est = apply_permutation(est, perm)
    out = {}
    if {"si_sdr", "si_sir", "si_sar", "si_sdri"} & set(names):
        sdr, sir, sar = si_bss_eval(est, ref, zero_mean=False, clamp_db=clamp_db)
        vals = {"si_sdr": sdr, "si_sir": sir, "si_sar": sar}
        if "si_sdri" in names:
            mix_sdr = si_sdr(mix.expand_as(ref), ref, zero_mean=False, clamp_db=clamp_db)
            vals["si_sdri"] = sdr - mix_sdr.double()
        for k, v in vals.items():
            if k in names:
                out[k] = v[0].tolist()
    if "pesq" in names:
        out["pesq"] = pesq_score(est[0], ref[0], fs).tolist()
    if "estoi" in names:
        out["estoi"] = estoi_score(est[0], ref[0], fs).tolist()
    if set(_DNSMOS_KEYS) & set(names):
        scores = dnsmos(est[0], fs)
        for k in _DNSMOS_KEYS:
            if k in names:
                out[k] = scores[k].tolist()
    out = {k: out[k] for k in names}
    out["perm"] = perm[0].tolist()
    return out


class SeparationMetricStats:
    """Accumulates separation metrics over utterances, in the style of SpeechBrain's MetricStats.

    Arguments
    ---------
    fs : int
        Sampling rate of the signals.
    metrics : sequence of str
        See :func:`evaluate_separation`.
    permute : bool
        Align estimates by the SI-SIR permutation (the paper's protocol).

    Example
    -------
    >>> stats = SeparationMetricStats(fs=8000, metrics=("si_sdr", "si_sdri"))
    >>> ref = torch.randn(2, 2, 4000)
    >>> stats.append(["a", "b"], ref + 0.1 * torch.randn(2, 2, 4000), ref, ref.sum(1, keepdim=True))
    >>> s = stats.summarize()
    >>> sorted(s), 15 < s["si_sdr"] < 25
    (['n_utts', 'si_sdr', 'si_sdr_std', 'si_sdri', 'si_sdri_std'], True)
    """

    def __init__(self, fs, metrics=DEFAULT_METRICS, permute=True):
        self.fs = fs
        self.metrics = _expand_metrics(metrics)
        self.permute = permute
        self.clear()

    def clear(self):
        """Remove all stored scores."""
        self.ids = []
        self.scores = []  # one dict per utterance: metric -> list of per-source values
        self.summary = {}

    def append(self, ids, est, ref, mix, lengths=None):
        """Score a batch.

        Arguments
        ---------
        ids : list of str
            Utterance IDs, one per batch item.
        est, ref : torch.Tensor
            ``(batch, K, samples)``.
        mix : torch.Tensor
            ``(batch, 1, samples)`` or ``(batch, samples)``.
        lengths : torch.Tensor, optional
            Relative lengths in (0, 1] (SpeechBrain's padding convention); each utterance is
            cropped to ``round(length * samples)`` before scoring.
        """
        est, ref = _check_pair(est, ref)
        if est.dim() != 3:
            raise ValueError(f"est must be shaped (batch, K, samples), got {tuple(est.shape)}")
        if len(ids) != est.shape[0]:
            raise ValueError(f"got {len(ids)} ids for a batch of {est.shape[0]}")
        mix = _as_tensor(mix, "mix").reshape(est.shape[0], 1, -1)
        n = est.shape[-1]
        for b, uid in enumerate(ids):
            stop = n if lengths is None else max(2, int(round(float(lengths[b]) * n)))
            res = evaluate_separation(
                est[b, :, :stop], ref[b, :, :stop], mix[b, :, :stop], self.fs, self.metrics, self.permute
            )
            self.ids.append(uid)
            self.scores.append(res)
        self.summary = {}

    def summarize(self, field=None):
        """Mean and std over utterances of the per-utterance source average of each metric.

        NaN values (e.g. PESQ failures) are ignored. Returns ``{metric: mean, metric_std: std,
        "n_utts": N}``, or the single value for ``field``.
        """
        if not self.scores:
            raise ValueError("no utterance scored yet; call append() first")
        summary = {}
        for m in self.metrics:
            vals = np.array([np.mean(s[m]) for s in self.scores], dtype=np.float64)
            if np.isnan(vals).any():
                logger.warning("%s: %d of %d utterances are NaN and are ignored", m, np.isnan(vals).sum(), len(vals))
            summary[m] = float(np.nanmean(vals)) if not np.isnan(vals).all() else math.nan
            summary[f"{m}_std"] = float(np.nanstd(vals)) if not np.isnan(vals).all() else math.nan
        summary["n_utts"] = len(self.scores)
        self.summary = summary
        return summary[field] if field is not None else summary

    def write_stats(self, filestream, verbose=False):
        """Write the summary (one ``metric: mean +- std`` line each) to an open text stream."""
        summary = self.summarize()
        lines = [f"{m}: {summary[m]:.4f} +- {summary[m + '_std']:.4f}" for m in self.metrics]
        message = f"{summary['n_utts']} utterances\n" + "\n".join(lines) + "\n"
        filestream.write(message)
        if verbose:
            print(message, end="")

    def write_csv(self, path):
        """Write one row per utterance (mean over sources and each source) and a final ``avg`` row.

        Columns: ``ID``, then for every metric ``m``: ``m`` (source mean), ``m_s1``, ``m_s2``, ...
        The last row has ID ``avg`` with the means over utterances (NaN ignored).
        """
        if not self.scores:
            raise ValueError("no utterance scored yet; call append() first")
        n_src = len(self.scores[0]["perm"])
        header = ["ID"]
        for m in self.metrics:
            header += [m] + [f"{m}_s{k + 1}" for k in range(n_src)]
        rows = []
        for uid, res in zip(self.ids, self.scores):
            row = [uid]
            for m in self.metrics:
                row += [float(np.mean(res[m]))] + [float(v) for v in res[m]]
            rows.append(row)
        avg = ["avg"] + [float(np.nanmean([r[i] for r in rows])) for i in range(1, len(header))]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
            writer.writerow(avg)
