"""Chunked separation: grid, ramps, permutation alignment, and exactness with an oracle separator."""
import itertools

import pytest
import torch

from speechbrain_diffsep.chunking import (
    best_permutation,
    chunk_bounds,
    correlation_matrix,
    fade_in,
    separate_in_chunks,
)
from speechbrain_diffsep.normalize import rescale_to_mixture

SR = 1000  # 1 kHz keeps the signals short; the code only sees sample counts


@pytest.mark.parametrize("num_samples", [1, 39, 40, 41, 100, 105, 119, 120, 121, 1000])
@pytest.mark.parametrize("chunk,overlap", [(40, 10), (40, 20), (41, 1)])
def test_chunk_bounds_cover_the_signal_with_exact_overlaps(num_samples, chunk, overlap):
    b = chunk_bounds(num_samples, chunk, overlap)
    assert b[0][0] == 0 and b[-1][1] == num_samples
    for (s0, e0), (s1, e1) in zip(b[:-1], b[1:]):
        assert e0 - s1 == overlap  # consecutive chunks share exactly `overlap` samples
        assert s1 > s0 and e1 > e0
    for i, (s, e) in enumerate(b):
        assert e - s <= chunk or (i == len(b) - 1 and e - s < chunk + chunk // 2)
        assert e - s >= min(num_samples, chunk // 2)
    # no sample lies in three chunks
    for (s0, e0), (s2, e2) in zip(b[:-2], b[2:]):
        assert e0 <= s2


@pytest.mark.parametrize("bad", [0, 21])
def test_chunk_bounds_reject_overlap_outside_half_chunk(bad):
    with pytest.raises(ValueError, match="overlap must lie in"):
        chunk_bounds(100, 40, bad)


@pytest.mark.parametrize("kind", ["hann", "linear"])
@pytest.mark.parametrize("length", [1, 2, 7, 64])
def test_fade_in_is_monotone_and_complementary(kind, length):
    r = fade_in(length, kind, dtype=torch.float64)
    assert ((r > 0) & (r < 1)).all()
    assert (r[1:] > r[:-1]).all()
    assert torch.allclose(r + r.flip(0), torch.ones(length, dtype=torch.float64), atol=1e-12)


def test_hann_fade_values():
    r = fade_in(2, "hann", dtype=torch.float64)
    assert torch.allclose(r, torch.sin(torch.tensor([0.125, 0.375], dtype=torch.float64) * torch.pi) ** 2)


def test_correlation_matrix_is_pearson():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 200, generator=g, dtype=torch.float64)
    b = 5 * a[:, [1, 2, 0]] + 3.0  # gain and offset do not change the correlation
    c = correlation_matrix(a, b)
    assert torch.allclose(c[:, 1, 0], torch.ones(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(c[:, 2, 1], torch.ones(2, dtype=torch.float64), atol=1e-9)
    assert c[:, 0, 0].abs().max() < 0.3


@pytest.mark.parametrize("num_sources", [2, 3, 4])
def test_best_permutation_recovers_every_order(num_sources):
    g = torch.Generator().manual_seed(num_sources)
    prev = torch.randn(1, num_sources, 300, generator=g)
    for order in itertools.permutations(range(num_sources)):
        noisy = prev[:, list(order)] + 0.3 * torch.randn(1, num_sources, 300, generator=g)
        perm = best_permutation(prev, noisy)
        assert torch.equal(noisy[0, perm[0]], noisy[0, torch.argsort(torch.tensor(order))])


class OracleSeparator:
    """Returns the true sources of the chunk it is given, in a random order per chunk and example.

    It finds the chunk's position by matching its samples against the full mixture.
    """

    def __init__(self, sources, seed=0):
        self.sources = sources
        self.mix = sources.sum(1, keepdim=True)
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def locate(self, piece):
        probe = piece[0, 0, :8]
        windows = self.mix[0, 0].unfold(0, probe.numel(), 1)
        hits = (windows == probe).all(-1).nonzero().flatten()
        assert hits.numel() == 1
        return int(hits[0])

    def __call__(self, piece):
        start = self.locate(piece)
        n = piece.shape[-1]
        self.calls.append((start, n))
        out = self.sources[..., start : start + n].clone()
        for b in range(out.shape[0]):
            out[b] = out[b, torch.randperm(out.shape[1], generator=self.gen)]
        return out


def make_sources(batch=2, num_sources=2, n=2345, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish, distinct sources so that the per-chunk correlations are informative
    s = torch.randn(batch, num_sources, n, generator=g, dtype=torch.float64)
    s = torch.nn.functional.avg_pool1d(s, 5, stride=1, padding=2)
    return s


@pytest.mark.parametrize("crossfade", ["hann", "linear"])
@pytest.mark.parametrize("num_sources", [2, 3])
def test_chunked_oracle_equals_whole_with_shuffled_chunks(crossfade, num_sources):
    s = make_sources(num_sources=num_sources)
    oracle = OracleSeparator(s, seed=num_sources)
    mix = oracle.mix
    est = separate_in_chunks(oracle, mix, SR, chunk_seconds=0.4, overlap_seconds=0.1, crossfade=crossfade, rescale=None)
    assert len(oracle.calls) == len(chunk_bounds(mix.shape[-1], 400, 100)) > 4
    # every example has its own random order per chunk; after alignment the order is that of
    # the first chunk, which is a global permutation of the truth
    for b in range(s.shape[0]):
        first = best_permutation(s[b : b + 1, :, :400], est[b : b + 1, :, :400])[0]
        assert torch.allclose(est[b, first], s[b], atol=1e-10)


@pytest.mark.parametrize("rescale", ["gain", "consistency"])
def test_chunked_rescaling_matches_whole_file_rescaling(rescale):
    s = make_sources(batch=1, n=3000, seed=3)
    oracle = OracleSeparator(s, seed=1)
    est = separate_in_chunks(oracle, oracle.mix, SR, chunk_seconds=0.5, overlap_seconds=0.2, rescale=rescale)
    perm = best_permutation(s, est)[0]
    est = est[:, perm]
    if rescale == "gain":
        expected = rescale_to_mixture(s, oracle.mix)  # what the whole-file pipeline does
    else:
        expected = s  # the truth already sums to the mixture
    assert torch.allclose(est, expected, atol=1e-10)


def test_chunks_are_bounded_and_processed_in_order():
    s = make_sources(batch=1, n=10_000)
    oracle = OracleSeparator(s)
    separate_in_chunks(oracle, oracle.mix, SR, chunk_seconds=0.3, overlap_seconds=0.05)
    starts = [c[0] for c in oracle.calls]
    assert starts == sorted(starts)
    assert max(c[1] for c in oracle.calls) < 450  # never more than 1.5 chunks, whatever the length


def test_short_input_is_separated_whole():
    s = make_sources(batch=1, n=300)
    oracle = OracleSeparator(s)
    est = separate_in_chunks(oracle, oracle.mix, SR, chunk_seconds=0.4, overlap_seconds=0.1, rescale=None)
    assert oracle.calls == [(0, 300)]
    perm = best_permutation(s, est)[0]
    assert torch.equal(est[:, perm], s)


@pytest.mark.parametrize("crossfade", ["hann", "linear"])
@pytest.mark.parametrize(
    "num_samples, chunk, overlap",
    [(1000, 400, 100), (1050, 400, 100), (1001, 400, 200), (1150, 400, 150), (4000, 41, 20), (801, 400, 1)],
)
def test_crossfade_weights_sum_to_one_at_every_sample(num_samples, chunk, overlap, crossfade):
    """A separator that returns ones makes the output the summed chunk weights: exactly 1 at every sample
    (first and last samples, every seam, a short tail merged into its predecessor (1050), overlap = chunk/2,
    a one-sample overlap)."""
    mix = torch.randn(2, 1, num_samples, generator=torch.Generator().manual_seed(num_samples), dtype=torch.float64)
    calls = []

    def ones(piece):
        calls.append(piece.shape[-1])
        return torch.ones(piece.shape[0], 2, piece.shape[-1], dtype=torch.float64)

    est = separate_in_chunks(ones, mix, SR, chunk / SR, overlap / SR, crossfade=crossfade, rescale=None)
    assert len(calls) == len(chunk_bounds(num_samples, chunk, overlap)) >= 2
    assert torch.allclose(est, torch.ones_like(est), rtol=0, atol=1e-12), (est - 1).abs().max()


def test_crossfade_blends_inconsistent_chunks():
    """A separator whose output is the chunk index: the overlap gets the ramp between them."""
    mix = torch.randn(1, 1, 1000, dtype=torch.float64)
    state = {"k": 0}

    def constant(piece):
        state["k"] += 1
        return torch.full((1, 2, piece.shape[-1]), float(state["k"]), dtype=torch.float64)

    est = separate_in_chunks(constant, mix, SR, chunk_seconds=0.4, overlap_seconds=0.1, crossfade="linear", rescale=None)
    ramp = fade_in(100, "linear", dtype=torch.float64)
    assert torch.allclose(est[0, 0, :300], torch.ones(300, dtype=torch.float64))
    assert torch.allclose(est[0, 0, 300:400], 1 + ramp)  # 1 * (1 - r) + 2 * r
    assert torch.allclose(est[0, 0, 400:600], torch.full((200,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_seconds=0.0), "chunk_seconds"),
        (dict(chunk_seconds=0.4, overlap_seconds=0.3), "overlap_seconds"),
        (dict(chunk_seconds=0.4, overlap_seconds=0.0), "overlap_seconds"),
        (dict(chunk_seconds=0.4, crossfade="cosine"), "crossfade"),
        (dict(chunk_seconds=0.4, rescale="max"), "rescale"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    kwargs.setdefault("overlap_seconds", 0.1)
    with pytest.raises(ValueError, match=match):
        separate_in_chunks(lambda m: m.repeat(1, 2, 1), torch.randn(1, 1, 1000), SR, **kwargs)


def test_bad_mixture_shape_and_separator_output_are_reported():
    with pytest.raises(ValueError, match=r"mix must be shaped \(batch, 1, samples\)"):
        separate_in_chunks(lambda m: m, torch.randn(1, 1000), SR, chunk_seconds=0.4, overlap_seconds=0.1)
    with pytest.raises(ValueError, match="separate_fn must map"):
        separate_in_chunks(lambda m: m[..., :-1], torch.randn(1, 1, 1000), SR, chunk_seconds=0.4, overlap_seconds=0.1)
