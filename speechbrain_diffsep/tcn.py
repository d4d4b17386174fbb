"""A noise-conditioned Conv-TasNet as the network ``F`` of the preconditioned DiffSep denoiser.

Why this exists: the paper's NCSN++ (a 2-D U-Net on the STFT) learns to *separate* slowly; on the
2-core machine no NCSN++ DiffSep got above the mixture from the prior in 15-55 minutes, while
SpeechBrain's Conv-TasNet lobes reach +7.6 dB in 15 minutes on the same data
(``benchmarks/results/learn_minimix_15min``). At ``t = T`` the DiffSep denoiser has to do what a
separator does, so here it *is* a Conv-TasNet (after Luo & Mesgarani 2019; the diffusion process,
loss and samplers are unchanged), with two additions that SpeechBrain's ``MaskNet`` does not have:

- its input is the mixture stacked with the (scaled) noisy sources ``[y, c_in x_1, .., c_in x_K]``
  (SpeechBrain's dual-path ``Encoder`` takes several input channels);
- the noise level conditions every repeat of temporal blocks by a feature-wise affine map (FiLM,
  Perez et al. 2018) computed from ``c_noise = log(sigma_t) / 4`` (EDM's choice) by a small MLP.

The encoder, temporal blocks and decoder are SpeechBrain's (``speechbrain.lobes.models``); only the
conditioning and the wiring are written here. The output is a waveform per source (masks on the
joint encoding, SpeechBrain's ``Decoder``), regressed by ``precond.denoiser_loss``.
"""

import math

import torch
from speechbrain.lobes.models.conv_tasnet import ChannelwiseLayerNorm, Decoder, TemporalBlocksSequential
from speechbrain.lobes.models.dual_path import Encoder

from .precond import noise_level


class NoiseEmbedding(torch.nn.Module):
    """Sinusoidal features of a scalar noise level followed by a two-layer MLP.

    Example
    -------
    >>> emb = NoiseEmbedding(32)
    >>> emb(torch.tensor([0.1, -0.3])).shape
    torch.Size([2, 32])
    """

    def __init__(self, dim, num_freqs=16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), num_freqs)), persistent=False)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 * num_freqs, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim), torch.nn.SiLU()
        )

    def forward(self, c_noise):
        arg = c_noise[:, None].float() * self.freqs[None, :]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))


class ConditionedTasNet(torch.nn.Module):
    """``F(x_in (B,K,n), t (B,), y (B,1,n)) -> (B,K,n)``, for ``precond.PreconditionedScoreModel``.

    Arguments
    ---------
    num_sources : int
        K.
    L, N, B, H, P, X, R : int
        Conv-TasNet's sizes (encoder kernel, encoder filters, bottleneck, block channels, block
        kernel, blocks per repeat, repeats), as in SpeechBrain's ``MaskNet``.
    emb_dim : int
        Width of the noise embedding.
    norm_type : str
        "gLN" or "cLN", for the temporal blocks.
    sde : MixingSDE or None
        Gives ``sigma_t`` for the conditioning (the preconditioning's noise level of the
        zero-mean part); ``None`` conditions on ``t`` itself.

    Example
    -------
    >>> net = ConditionedTasNet(num_sources=2, N=16, B=8, H=16, X=2, R=2, emb_dim=8)
    >>> x = torch.randn(3, 2, 1001); y = torch.randn(3, 1, 1001)
    >>> net(x, torch.tensor([0.1, 0.5, 1.0]), y).shape
    torch.Size([3, 2, 1001])
    """

    def __init__(
        self, num_sources=2, L=16, N=128, B=64, H=128, P=3, X=6, R=2, emb_dim=64, norm_type="gLN", sde=None
    ):
        super().__init__()
        if L % 2:
            raise ValueError(f"ConditionedTasNet: L must be even (stride L // 2), got L={L}")
        self.num_sources = num_sources
        self.L = L
        # the deepest temporal block pads by its dilation (reflect): it needs more frames than that
        self.min_frames = 2 ** (X - 1) + 1
        self.sde = sde
        self.encoder = Encoder(kernel_size=L, out_channels=N, in_channels=num_sources + 1)
        self.norm = ChannelwiseLayerNorm(N)
        self.bottleneck = torch.nn.Conv1d(N, B, 1)
        self.embedding = NoiseEmbedding(emb_dim)
        self.film = torch.nn.ModuleList([torch.nn.Linear(emb_dim, 2 * B) for _ in range(R)])
        for lin in self.film:  # start as the identity map
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
        self.repeats = torch.nn.ModuleList(
            [TemporalBlocksSequential((None, None, B), H, P, 1, X, norm_type, False) for _ in range(R)]
        )
        self.mask = torch.nn.Sequential(torch.nn.PReLU(), torch.nn.Conv1d(B, num_sources * N, 1))
        self.decoder = Decoder(L, N)

    def c_noise(self, t):
        """EDM's ``log(sigma) / 4`` with the SDE's sigma of the zero-mean part, else ``t``."""
        if self.sde is None:
            return t
        return (noise_level(self.sde, t.double()).log() / 4).to(t.dtype)

    def forward(self, x, t, y):
        n = x.shape[-1]
        hop = self.L // 2
        total = max(n, self.L + hop * (self.min_frames - 1))
        pad = total - n + (-(total - self.L)) % hop  # whole frames, at least min_frames of them
        inp = torch.nn.functional.pad(torch.cat([y, x], dim=1), (0, pad))
        w = self.encoder(inp)  # (B, N, frames)
        h = self.bottleneck(self.norm(w.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)  # (B, frames, Bc)
        emb = self.embedding(self.c_noise(t))
        for film, blocks in zip(self.film, self.repeats):
            scale, shift = film(emb).chunk(2, dim=1)
            h = blocks(h * (1 + scale[:, None, :]) + shift[:, None, :])
        m = torch.relu(self.mask(h.transpose(1, 2)))  # (B, K*N, frames)
        m = m.view(m.shape[0], self.num_sources, -1, m.shape[-1]).permute(0, 3, 1, 2)  # (B, frames, K, N)
        est = self.decoder(w.transpose(1, 2), m)  # (B, n', K)
        return est.transpose(1, 2)[..., :n]
