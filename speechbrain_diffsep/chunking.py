"""Separation of arbitrarily long mixtures in overlapping chunks.

A separator is run on consecutive chunks of the mixture (``chunk_seconds`` long, consecutive chunks
sharing ``overlap_seconds``). Chunk ``k+1`` has its sources reordered so that they correlate best,
on the shared region, with the already aligned chunk ``k``; the chunks are then cross-faded (linear
or Hann ramps that sum to one) into a preallocated output, and the whole estimate is finally
rescaled against the mixture. Chunks are processed one after the other and only the overlapping
tail of the previous chunk is kept, so the working memory besides the input and the output does not
grow with the length of the file.

Example
-------
>>> mix = torch.randn(1, 1, 8000)
>>> halves = lambda m: torch.cat([0.5 * m, 0.5 * m], dim=1)
>>> est = separate_in_chunks(halves, mix, 8000, chunk_seconds=0.25, overlap_seconds=0.05, rescale="consistency")
>>> est.shape
torch.Size([1, 2, 8000])
>>> torch.allclose(est.sum(1, keepdim=True), mix, atol=1e-5)
True
"""

import itertools
import math

import torch

CROSSFADES = ("hann", "linear")
RESCALE_MODES = ("gain", "consistency", None)


def chunk_bounds(num_samples, chunk_size, overlap):
    """Start and end sample of every chunk: a regular grid with hop ``chunk_size - overlap``.

    Consecutive chunks share exactly ``overlap`` samples. A last chunk shorter than half a chunk
    is merged into its predecessor (which then runs up to the end), so that no chunk is too short
    to be separated well and no sample is covered by more than two chunks.

    Example
    -------
    >>> chunk_bounds(100, 40, 10)
    [(0, 40), (30, 70), (60, 100)]
    >>> chunk_bounds(105, 40, 10)
    [(0, 40), (30, 70), (60, 105)]
    """
    num_samples, chunk_size, overlap = int(num_samples), int(chunk_size), int(overlap)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2 samples, got {chunk_size}")
    if num_samples <= chunk_size:
        return [(0, num_samples)]
    if not 0 < overlap <= chunk_size // 2:
        raise ValueError(
            f"overlap must lie in (0, chunk_size/2] = (0, {chunk_size // 2}] samples to align and "
            f"cross-fade the chunks, got {overlap}"
        )
    hop = chunk_size - overlap
    bounds = []
    start = 0
    while True:
        end = min(start + chunk_size, num_samples)
        bounds.append((start, end))
        if end == num_samples:
            break
        start += hop
    last_start, last_end = bounds[-1]
    if len(bounds) > 1 and last_end - last_start < chunk_size // 2:
        bounds.pop()
        bounds[-1] = (bounds[-1][0], num_samples)
    return bounds


def fade_in(length, kind="hann", dtype=torch.float32, device=None):
    """Rising cross-fade ramp of ``length`` samples; the falling ramp is ``1 - fade_in``.

    ``"linear"``: ``(n + 1/2) / length``; ``"hann"``: ``sin^2(pi/2 (n + 1/2) / length)`` (half a Hann
    window). Both are strictly inside (0, 1) and complementary to their time reverse, so two
    chunks cross-faded over the same region always sum to weight one.

    Example
    -------
    >>> r = fade_in(4, "linear")
    >>> r.tolist()
    [0.125, 0.375, 0.625, 0.875]
    >>> torch.allclose(r + r.flip(0), torch.ones(4))
    True
    """
    u = (torch.arange(length, dtype=torch.float64, device=device) + 0.5) / length
    if kind == "linear":
        ramp = u
    elif kind == "hann":
        ramp = torch.sin(0.5 * math.pi * u) ** 2
    else:
        raise ValueError(f"unknown crossfade {kind!r}; use one of {CROSSFADES}")
    return ramp.to(dtype)


def correlation_matrix(a, b, eps=1e-8):
    """Pearson correlation ``C[b, i, j]`` between source ``i`` of ``a`` and source ``j`` of ``b``.

    ``a`` and ``b`` are (batch, K, n) signals over the same samples.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    num = torch.bmm(a, b.transpose(1, 2))
    den = torch.linalg.vector_norm(a, dim=-1)[:, :, None] * torch.linalg.vector_norm(b, dim=-1)[:, None, :]
    return num / (den + eps)


def best_permutation(prev, cur):
    """For every example, the order of ``cur``'s sources that best matches ``prev``.

    Returns ``perm`` (batch, K) long such that ``cur[b, perm[b]]`` maximizes the summed
    correlation with ``prev[b]`` (exhaustive search over the K! orders).

    Example
    -------
    >>> prev = torch.randn(1, 3, 50)
    >>> best_permutation(prev, prev[:, [2, 0, 1]]).tolist()
    [[1, 2, 0]]
    """
    corr = correlation_matrix(prev.double(), cur.double())  # (B, K, K)
    num_sources = corr.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(num_sources))), device=corr.device)
    rows = torch.arange(num_sources, device=corr.device)
    # score[b, p] = sum_i corr[b, i, perms[p, i]]
    scores = corr[:, rows[None, :], perms].sum(-1)
    return perms[scores.argmax(dim=1)]


def _apply_permutation(est, perm):
    return torch.gather(est, 1, perm[:, :, None].expand_as(est))


def _rescale_in_place(out, mix, mode, eps=1e-10):
    """``"gain"``: least-squares gain of every source onto the mixture (as the whole-file
    pipeline); ``"consistency"``: add an equal share of the residual so the sources sum to the
    mixture; ``None``: nothing. Works in place, without (batch, K, samples) temporaries."""
    if mode is None:
        return out
    if mode == "gain":
        num = torch.bmm(out, mix.transpose(1, 2))  # (B, K, 1)
        energy = torch.linalg.vector_norm(out, dim=-1, keepdim=True) ** 2
        return out.mul_(num / (energy + eps))
    if mode == "consistency":
        residual = mix - out.sum(dim=1, keepdim=True)
        return out.add_(residual / out.shape[1])
    raise ValueError(f"unknown rescale mode {mode!r}; use one of {RESCALE_MODES}")


def _check_args(mix, sample_rate, chunk_seconds, overlap_seconds, crossfade, rescale):
    if not torch.is_tensor(mix) or mix.dim() != 3 or mix.shape[1] != 1:
        shape = tuple(mix.shape) if torch.is_tensor(mix) else type(mix).__name__
        raise ValueError(f"mix must be shaped (batch, 1, samples), got {shape}")
    if not (isinstance(sample_rate, (int, float)) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive number, got {sample_rate!r}")
    if not (isinstance(chunk_seconds, (int, float)) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be a positive number of seconds, got {chunk_seconds!r}")
    if not (isinstance(overlap_seconds, (int, float)) and 0 < overlap_seconds <= chunk_seconds / 2):
        raise ValueError(
            f"overlap_seconds must lie in (0, chunk_seconds/2] = (0, {chunk_seconds / 2}], got {overlap_seconds!r}"
        )
    if crossfade not in CROSSFADES:
        raise ValueError(f"unknown crossfade {crossfade!r}; use one of {CROSSFADES}")
    if rescale not in RESCALE_MODES:
        raise ValueError(f"unknown rescale mode {rescale!r}; use one of {RESCALE_MODES}")


def _run_chunk(separate_fn, piece):
    est = separate_fn(piece)
    if not torch.is_tensor(est) or est.dim() != 3 or est.shape[0] != piece.shape[0] or est.shape[2] != piece.shape[2]:
        shape = tuple(est.shape) if torch.is_tensor(est) else type(est).__name__
        raise ValueError(
            f"separate_fn must map a (batch, 1, n) chunk to (batch, K, n), got {shape} for {tuple(piece.shape)}"
        )
    return est


def separate_in_chunks(
    separate_fn,
    mix,
    sample_rate,
    chunk_seconds,
    overlap_seconds=1.0,
    crossfade="hann",
    rescale="gain",
    progress=False,
):
    """Separate a long mixture chunk by chunk with aligned, cross-faded overlaps.

    Arguments
    ---------
    separate_fn : callable
        Maps a mixture chunk (batch, 1, n) to source estimates (batch, K, n). It is called once per
        chunk, in time order (so a random generator it closes over is consumed deterministically).
    mix : torch.Tensor
        The mixture, (batch, 1, samples).
    sample_rate : int
        Samples per second, to convert the durations below.
    chunk_seconds, overlap_seconds : float
        Chunk length and the overlap of consecutive chunks (0 < overlap <= chunk / 2). A mixture no
        longer than one chunk is passed to ``separate_fn`` whole.
    crossfade : "hann" | "linear"
        Shape of the complementary ramps used over each overlap.
    rescale : "gain" | "consistency" | None
        Final adjustment to the mixture: least-squares gain per source over the whole file (what
        the whole-file pipeline does, default), sources projected to sum to the mixture, or none.
    progress : bool
        Show a tqdm progress bar over the chunks.

    Returns
    -------
    torch.Tensor
        (batch, K, samples), in the dtype of the separator's output.
    """
    _check_args(mix, sample_rate, chunk_seconds, overlap_seconds, crossfade, rescale)
    num_samples = mix.shape[-1]
    chunk = max(2, int(round(chunk_seconds * sample_rate)))
    overlap = max(1, int(round(overlap_seconds * sample_rate)))
    bounds = chunk_bounds(num_samples, chunk, min(overlap, chunk // 2))
    if len(bounds) == 1:
        return _rescale_in_place(_run_chunk(separate_fn, mix).clone(), mix, rescale)

    iterator = enumerate(bounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(bounds), desc="chunks", leave=False)
    out = None
    prev_tail = None  # aligned estimate of the previous chunk on its overlap with this one
    for k, (start, end) in iterator:
        est = _run_chunk(separate_fn, mix[..., start:end])
        if out is None:
            out = torch.zeros(mix.shape[0], est.shape[1], num_samples, dtype=est.dtype, device=est.device)
        weight = torch.ones(end - start, dtype=est.dtype, device=est.device)
        if prev_tail is not None:
            n_in = prev_tail.shape[-1]
            est = _apply_permutation(est, best_permutation(prev_tail, est[..., :n_in]))
            weight[:n_in] = fade_in(n_in, crossfade, dtype=est.dtype, device=est.device)
        if k + 1 < len(bounds):
            n_out = end - bounds[k + 1][0]
            weight[-n_out:] *= 1.0 - fade_in(n_out, crossfade, dtype=est.dtype, device=est.device)
            prev_tail = est[..., -n_out:].clone()
        out[..., start:end].addcmul_(est, weight)
        del est
    return _rescale_in_place(out, mix.to(out.dtype), rescale)
