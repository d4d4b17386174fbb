"""NCSN++ score network (Song et al., ICLR 2021) in the STFT domain, as used by DiffSep.

This is a readable re-implementation of the U-Net that the DiffSep authors took from SGMSE+
(itself adapted from ``yang-song/score_sde``). The layers are grouped into named lobes instead of
the reference's flat ``all_modules`` list:

``time_embed``
    Gaussian Fourier features of ``log t`` followed by two linear layers.
``input_conv``
    3x3 convolution from the ``2K + 2`` input channels to ``nf``.
``down_levels[i]``
    ``blocks[j]`` (residual blocks), ``attn[j]`` (self-attention after each block, only at the
    level whose frequency size is 16 when F = 256), ``downsample`` (a down-sampling residual block)
    and ``combine`` (the progressive input branch: 1x1 conv of the FIR-downsampled input, summed).
``mid``
    residual block, attention, residual block.
``up_levels[i]``
    ``blocks[j]`` (``num_res_blocks + 1`` residual blocks fed with the concatenated skip),
    ``attn``, the progressive output branch ``pyramid_norm`` / ``pyramid_conv`` and ``upsample``.
``pyramid_upsample`` / ``pyramid_downsample``
    parameter-free FIR resamplers of the output / input pyramids.
``output_layer``
    1x1 convolution applied after the division by ``t`` (``scale_by_sigma``).

Everything is plain PyTorch. The FIR resampling of StyleGAN2 (``upfirdn2d`` with the kernel
``[1, 3, 3, 1]``) is a depthwise ``conv_transpose2d`` (up) or strided ``conv2d`` (down) with the
outer-product kernel, which gives the same numbers as the reference's ``upfirdn2d_native``.
:func:`speechbrain_diffsep.convert.load_reference_checkpoint` maps the authors' weights here.

:class:`ScoreModel` wraps the backbone with the spectral front end: waveforms in, waveforms out.
"""

import math

import torch
import torch.nn.functional as F

from .frontend import SpectralTransform

_SQRT2 = math.sqrt(2.0)

_ACTIVATIONS = {
    "swish": torch.nn.SiLU,
    "silu": torch.nn.SiLU,
    "elu": torch.nn.ELU,
    "relu": torch.nn.ReLU,
    "lrelu": lambda: torch.nn.LeakyReLU(negative_slope=0.2),
}


# ----------------------------------------------------------------------------------------------
# Initialisation and elementary layers
# ----------------------------------------------------------------------------------------------
def default_init_(weight, scale=1.0):
    """DDPM's ``default_init`` in place: variance scaling, fan-average, uniform distribution.

    Fans are computed as in JAX (``out`` on axis 0, ``in`` on axis 1, times the receptive field),
    the bound is ``sqrt(3 * scale / fan_avg)``; ``scale = 0`` means ``1e-10`` (near-zero layers).

    Arguments
    ---------
    weight : torch.Tensor
        Parameter with at least 2 dimensions, modified in place.
    scale : float
        Variance scale.

    Returns
    -------
    torch.Tensor
        ``weight``.

    Example
    -------
    >>> w = default_init_(torch.empty(64, 32))
    >>> bool(w.abs().max() <= math.sqrt(3 / 48))
    True
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2.0
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
    return weight


def conv3x3(in_ch, out_ch, bias=True, init_scale=1.0, stride=1, padding=1):
    """3x3 ``Conv2d`` with DDPM initialisation (zero bias)."""
    conv = torch.nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        torch.nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch, out_ch, bias=True, init_scale=1.0):
    """1x1 ``Conv2d`` with DDPM initialisation (zero bias)."""
    conv = torch.nn.Conv2d(in_ch, out_ch, 1, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        torch.nn.init.zeros_(conv.bias)
    return conv


def dense(in_features, out_features):
    """``Linear`` layer with DDPM initialisation (zero bias)."""
    layer = torch.nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def _activate(act, h, inplace):
    """``act(h)``, overwriting ``h`` when ``inplace`` (inference: saves an allocation per call)."""
    if not inplace:
        return act(h)
    if isinstance(act, torch.nn.SiLU):
        return F.silu(h, inplace=True)
    if isinstance(act, torch.nn.ReLU):
        return F.relu(h, inplace=True)
    if isinstance(act, torch.nn.ELU):
        return F.elu(h, act.alpha, inplace=True)
    if isinstance(act, torch.nn.LeakyReLU):
        return F.leaky_relu(h, act.negative_slope, inplace=True)
    return act(h)


def _residual_sum(x, h, skip_rescale, inplace):
    """``(x + h) / sqrt(2)`` (or ``x + h``); accumulates into ``h`` when ``inplace``."""
    if inplace:
        h = h.add_(x)
        return h.div_(_SQRT2) if skip_rescale else h
    return (x + h) / _SQRT2 if skip_rescale else x + h


def _can_overwrite():
    """Intermediate tensors may be overwritten when autograd does not record (no_grad / inference)."""
    return not torch.is_grad_enabled()


def group_norm(channels):
    """GroupNorm with ``min(channels // 4, 32)`` groups and ``eps = 1e-6``, as in NCSN++."""
    return torch.nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


class NIN(torch.nn.Module):
    """Linear map over the channel axis ("network in network"), ``y = W^T x + b`` per pixel.

    ``W`` is stored as ``(in_ch, out_ch)`` like the reference, so checkpoints map one-to-one.

    Arguments
    ---------
    in_ch, out_ch : int
        Channel counts.
    init_scale : float
        Variance scale of :func:`default_init_` (0.1 for attention projections, 0 -> 1e-10).

    Example
    -------
    >>> nin = NIN(4, 3)
    >>> nin(torch.randn(2, 4, 5, 6)).shape
    torch.Size([2, 3, 5, 6])
    """

    def __init__(self, in_ch, out_ch, init_scale=0.1):
        super().__init__()
        self.W = torch.nn.Parameter(default_init_(torch.empty(in_ch, out_ch), init_scale))
        self.b = torch.nn.Parameter(torch.zeros(out_ch))

    def forward(self, x):
        """Apply to ``x`` shaped ``(batch, in_ch, H, W)``."""
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class GaussianFourierProjection(torch.nn.Module):
    """Random Fourier features ``[sin(2 pi x W), cos(2 pi x W)]`` of a scalar per example.

    ``W ~ N(0, scale^2)`` is a fixed (non-trainable) parameter of size ``embedding_size``.

    Example
    -------
    >>> proj = GaussianFourierProjection(8, scale=16)
    >>> proj(torch.tensor([0.1, 0.2])).shape
    torch.Size([2, 16])
    """

    def __init__(self, embedding_size=256, scale=1.0):
        super().__init__()
        w = torch.empty(embedding_size)
        with torch.no_grad():
            w.normal_(0.0, scale)
        self.W = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        """Embed ``x`` shaped ``(batch,)`` into ``(batch, 2 * embedding_size)``."""
        x_proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class TimeEmbedding(torch.nn.Module):
    """Conditioning vector of the diffusion time: ``dense_1(act(dense_0(fourier(log t))))``.

    The result is not passed through the activation; each residual block applies
    ``act`` then its own linear projection.

    Arguments
    ---------
    nf : int
        Base width; Fourier features of size ``nf`` (so ``2 nf`` inputs), output ``4 nf``.
    fourier_scale : float
        Standard deviation of the Fourier frequencies.
    act : torch.nn.Module
        Activation between the two linear layers.
    conditional : bool
        If False, there are no linear layers and :meth:`forward` returns None.
    """

    def __init__(self, nf, fourier_scale=16.0, act=None, conditional=True):
        super().__init__()
        self.fourier = GaussianFourierProjection(nf, scale=fourier_scale)
        self.conditional = conditional
        if conditional:
            self.dense_0 = dense(2 * nf, 4 * nf)
            self.dense_1 = dense(4 * nf, 4 * nf)
        self.act = act if act is not None else torch.nn.SiLU()

    def forward(self, t):
        """Embedding shaped ``(batch, 4 nf)`` of ``t`` shaped ``(batch,)`` (t > 0)."""
        temb = self.fourier(torch.log(t))
        if not self.conditional:
            return None
        return self.dense_1(self.act(self.dense_0(temb)))


# ----------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 upfirdn2d, plain torch)
# ----------------------------------------------------------------------------------------------
def fir_kernel_2d(kernel, gain=1.0):
    """Outer product of a 1-D FIR kernel with itself, normalized to sum ``gain``."""
    k = torch.as_tensor(kernel, dtype=torch.float64)
    if k.dim() != 1 or k.numel() < 2:
        raise ValueError(f"fir_kernel must be a 1-D sequence of at least 2 taps, got {kernel}")
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * gain


def _depthwise(kernel2d, x):
    """``kernel2d`` repeated per channel of ``x``: weight ``(C, 1, kh, kw)`` in ``x``'s dtype."""
    return kernel2d.to(device=x.device, dtype=x.dtype)[None, None].expand(x.shape[1], 1, *kernel2d.shape)


def upsample_fir(x, kernel2d):
    """2x FIR up-sampling, equal to ``upfirdn2d(x, kernel2d, up=2, pad=(p0, p1))`` of StyleGAN2.

    ``p = len(k) - 2``, ``p0 = (p + 1) // 2 + 1``, ``p1 = p // 2``; ``kernel2d`` already carries the
    gain 4 (``fir_kernel_2d(k, 4)``). Zero insertion + padding + correlation with the flipped
    kernel is the transposed convolution with the kernel itself and padding ``L - 1 - p0``.

    Arguments
    ---------
    x : torch.Tensor
        ``(batch, C, H, W)``.
    kernel2d : torch.Tensor
        ``(L, L)`` FIR kernel (gain included).

    Returns
    -------
    torch.Tensor
        ``(batch, C, 2H, 2W)``.
    """
    length = kernel2d.shape[-1]
    p = length - 2
    pad0 = (p + 1) // 2 + 1
    pad1 = p // 2
    out_h = 2 * x.shape[2] + pad0 + pad1 - length + 1
    out_w = 2 * x.shape[3] + pad0 + pad1 - length + 1
    y = F.conv_transpose2d(
        x, _depthwise(kernel2d, x), stride=2, padding=length - 1 - pad0, groups=x.shape[1]
    )
    return y[:, :, :out_h, :out_w]


def downsample_fir(x, kernel2d):
    """2x FIR down-sampling, equal to ``upfirdn2d(x, kernel2d, down=2, pad=(p0, p1))``.

    ``p = len(k) - 2``, ``p0 = (p + 1) // 2``, ``p1 = p // 2`` (``(1, 1)`` for ``[1, 3, 3, 1]``).

    Arguments
    ---------
    x : torch.Tensor
        ``(batch, C, H, W)``.
    kernel2d : torch.Tensor
        ``(L, L)`` FIR kernel (normalized to sum 1).

    Returns
    -------
    torch.Tensor
        ``(batch, C, H // 2, W // 2)`` for even sizes.
    """
    p = kernel2d.shape[-1] - 2
    pad0, pad1 = (p + 1) // 2, p // 2
    weight = _depthwise(torch.flip(kernel2d, (0, 1)), x)
    if pad0 == pad1:
        return F.conv2d(x, weight, stride=2, padding=pad0, groups=x.shape[1])
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    return F.conv2d(x, weight, stride=2, groups=x.shape[1])


def naive_upsample(x):
    """Nearest-neighbour 2x up-sampling (``fir=False``)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def naive_downsample(x):
    """2x2 average pooling (``fir=False``)."""
    return F.avg_pool2d(x, 2, stride=2)


class Resample(torch.nn.Module):
    """Parameter-free 2x up- or down-sampling, FIR (default) or naive.

    Arguments
    ---------
    mode : str
        ``"up"`` or ``"down"``.
    fir : bool
        FIR filter (StyleGAN2) if True, nearest / average pooling otherwise.
    fir_kernel : sequence of float
        1-D FIR taps, e.g. ``(1, 3, 3, 1)``.

    Example
    -------
    >>> Resample("up")(torch.ones(1, 2, 4, 4)).shape
    torch.Size([1, 2, 8, 8])
    """

    def __init__(self, mode, fir=True, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode = mode
        self.fir = fir
        if fir:
            gain = 4.0 if mode == "up" else 1.0
            self.register_buffer("kernel", fir_kernel_2d(fir_kernel, gain).float(), persistent=False)

    def forward(self, x):
        """Resample ``x`` shaped ``(batch, C, H, W)``."""
        if self.fir:
            return upsample_fir(x, self.kernel) if self.mode == "up" else downsample_fir(x, self.kernel)
        return naive_upsample(x) if self.mode == "up" else naive_downsample(x)


class FIRConv2d(torch.nn.Module):
    """3x3 convolution fused with FIR 2x up- or down-sampling (StyleGAN2 ``Conv2d`` layer).

    Only used by the non-default options (``resblock_type="ddpm"`` with ``fir=True`` and
    ``progressive[_input]="residual"``). Down: FIR with padding ``(p + 1) // 2, p // 2``
    (``p = L - 2 + 2``), then a stride-2 convolution. Up: stride-2 transposed convolution with the
    spatially flipped kernel, then FIR with padding ``((p + 1) // 2 + 1, p // 2 + 1)``,
    ``p = L - 4``, gain 4. (The authors' PyTorch port of the up branch slices with a negative step,
    which torch rejects, so there is no working reference for it; this follows StyleGAN2.)
    Parameters ``weight (out, in, 3, 3)`` and ``bias`` as in the reference.
    """

    def __init__(self, in_ch, out_ch, mode, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode = mode
        self.weight = torch.nn.Parameter(default_init_(torch.empty(out_ch, in_ch, 3, 3)))
        self.bias = torch.nn.Parameter(torch.zeros(out_ch))
        gain = 4.0 if mode == "up" else 1.0
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel, gain).float(), persistent=False)

    def forward(self, x):
        """Resample and convolve ``x`` shaped ``(batch, in_ch, H, W)``."""
        length = self.kernel.shape[-1]
        if self.mode == "down":
            p = length - 2 + 2
            x = F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
            x = F.conv2d(x, _depthwise(torch.flip(self.kernel, (0, 1)), x), groups=x.shape[1])
            x = F.conv2d(x, self.weight, stride=2)
        else:
            w = torch.flip(self.weight, (2, 3)).transpose(0, 1)
            x = F.conv_transpose2d(x, w, stride=2)
            p = length - 4
            x = F.pad(x, ((p + 1) // 2 + 1, p // 2 + 1, (p + 1) // 2 + 1, p // 2 + 1))
            x = F.conv2d(x, _depthwise(torch.flip(self.kernel, (0, 1)), x), groups=x.shape[1])
        return x + self.bias.view(1, -1, 1, 1)


class ConvResample(torch.nn.Module):
    """Up/down-sampling layer of the DDPM-style U-Net (``layerspp.Upsample`` / ``Downsample``).

    With ``with_conv`` a convolution is included: fused FIR conv (``fir=True``), else nearest
    up-sampling + 3x3 conv / a stride-2 3x3 conv after padding by (0, 1). Without it, a
    parameter-free :class:`Resample`.
    """

    def __init__(self, in_ch, out_ch=None, mode="up", with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        self.mode, self.fir, self.with_conv = mode, fir, with_conv
        if not with_conv:
            self.resample = Resample(mode, fir, fir_kernel)
        elif fir:
            self.conv = FIRConv2d(in_ch, out_ch, mode, fir_kernel)
        elif mode == "up":
            self.conv = conv3x3(in_ch, out_ch)
        else:
            self.conv = conv3x3(in_ch, out_ch, stride=2, padding=0)

    def forward(self, x):
        """Resample ``x`` shaped ``(batch, in_ch, H, W)``."""
        if not self.with_conv:
            return self.resample(x)
        if self.fir:
            return self.conv(x)
        if self.mode == "up":
            return self.conv(naive_upsample(x))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class ResnetBlockBigGAN(torch.nn.Module):
    """BigGAN-style residual block with optional FIR up/down-sampling (``ResnetBlockBigGANpp``).

    ``h = conv_1(dropout(act(norm_1(conv_0(resample(act(norm_0(x)))) + temb_proj(act(temb))))))``,
    output ``(skip(resample(x)) + h) / sqrt(2)`` (``skip_rescale``); ``skip`` is a 1x1 conv when the
    width or the resolution changes, identity otherwise.

    Arguments
    ---------
    act : torch.nn.Module
        Activation.
    in_ch, out_ch : int
        Channels (``out_ch=None`` keeps ``in_ch``).
    temb_dim : int or None
        Width of the time embedding (None: no conditioning layer).
    up, down : bool
        2x up- or down-sampling of both branches.
    dropout : float
        Dropout probability before the second convolution.
    fir, fir_kernel
        FIR resampling (else nearest / average pooling) and its taps.
    skip_rescale : bool
        Divide the sum by ``sqrt(2)``.
    init_scale : float
        Init scale of the last convolution (0 -> 1e-10, the block starts as the skip path).
    """

    # our attribute -> the reference's (score_sde ``layerspp``) attribute, used by convert.py
    REFERENCE_NAMES = {
        "norm_0": "GroupNorm_0",
        "conv_0": "Conv_0",
        "temb_proj": "Dense_0",
        "norm_1": "GroupNorm_1",
        "conv_1": "Conv_1",
        "skip": "Conv_2",
    }

    def __init__(
        self,
        act,
        in_ch,
        out_ch=None,
        temb_dim=None,
        up=False,
        down=False,
        dropout=0.1,
        fir=False,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        init_scale=0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.temb_proj = dense(temb_dim, out_ch)
        self.norm_1 = group_norm(out_ch)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.skip = conv1x1(in_ch, out_ch)
        else:
            self.skip = None
        self.resample = Resample("up" if up else "down", fir, fir_kernel) if (up or down) else None
        self.act = act
        self.skip_rescale = skip_rescale

    def forward(self, x, temb=None):
        """Apply to ``x (batch, in_ch, H, W)`` with ``temb (batch, temb_dim)`` or None."""
        inplace = _can_overwrite()
        h = _activate(self.act, self.norm_0(x), inplace)
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.conv_0(h)
        return _resblock_tail(self, h, x, temb, inplace)


def _resblock_tail(block, h, x, temb, inplace):
    """The part both residual blocks share after their first convolution: time-embedding bias,
    norm/activation/dropout/second convolution, shortcut and (rescaled) sum."""
    if temb is not None:
        bias = block.temb_proj(block.act(temb))[:, :, None, None]
        h = h.add_(bias) if inplace else h + bias
    h = block.conv_1(block.dropout(_activate(block.act, block.norm_1(h), inplace)))
    if block.skip is not None:
        x = block.skip(x)
    return _residual_sum(x, h, block.skip_rescale, inplace)


class ResnetBlockDDPM(torch.nn.Module):
    """DDPM++ residual block (``ResnetBlockDDPMpp``), no resampling; NIN shortcut on width change.

    Arguments are those of :class:`ResnetBlockBigGAN` without ``up``/``down``/``fir``.
    """

    REFERENCE_NAMES = {
        "norm_0": "GroupNorm_0",
        "conv_0": "Conv_0",
        "temb_proj": "Dense_0",
        "norm_1": "GroupNorm_1",
        "conv_1": "Conv_1",
        "skip": "NIN_0",
    }

    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, dropout=0.1, skip_rescale=False, init_scale=0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.temb_proj = dense(temb_dim, out_ch)
        self.norm_1 = group_norm(out_ch)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.skip = NIN(in_ch, out_ch) if in_ch != out_ch else None
        self.act = act
        self.skip_rescale = skip_rescale

    def forward(self, x, temb=None):
        """Apply to ``x (batch, in_ch, H, W)`` with ``temb (batch, temb_dim)`` or None."""
        inplace = _can_overwrite()
        h = self.conv_0(_activate(self.act, self.norm_0(x), inplace))
        return _resblock_tail(self, h, x, temb, inplace)


class AttnBlock(torch.nn.Module):
    """Single-head self-attention over all time-frequency positions (``AttnBlockpp``).

    ``q, k, v`` are NIN projections of ``norm(x)``; ``softmax(q k^T / sqrt(C)) v`` is computed with
    :func:`torch.nn.functional.scaled_dot_product_attention`, then ``proj_out`` and the residual
    ``(x + h) / sqrt(2)`` (``skip_rescale``).

    Example
    -------
    >>> attn = AttnBlock(8)
    >>> attn(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    REFERENCE_NAMES = {
        "norm": "GroupNorm_0",
        "query": "NIN_0",
        "key": "NIN_1",
        "value": "NIN_2",
        "proj_out": "NIN_3",
    }

    def __init__(self, channels, skip_rescale=False, init_scale=0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.query = NIN(channels, channels)
        self.key = NIN(channels, channels)
        self.value = NIN(channels, channels)
        self.proj_out = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        """Apply to ``x`` shaped ``(batch, C, H, W)``."""
        B, C, H, W = x.shape
        h = self.norm(x)
        # one 1x1 conv for the three projections: (B, 3C, H, W) -> 3 x (B, 1, HW, C)
        w = torch.cat([self.query.W, self.key.W, self.value.W], dim=1).t()[:, :, None, None]
        b = torch.cat([self.query.b, self.key.b, self.value.b])
        qkv = F.conv2d(h, w, b).reshape(B, 3, C, H * W).transpose(2, 3)
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)
        h = self.proj_out(h)
        return _residual_sum(x, h, self.skip_rescale, _can_overwrite())


class Combine(torch.nn.Module):
    """Progressive input branch: ``conv(pyramid)`` summed with (or concatenated to) ``h``."""

    REFERENCE_NAMES = {"conv": "Conv_0"}

    def __init__(self, dim1, dim2, method="sum"):
        super().__init__()
        self.conv = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, pyramid, h):
        """Combine the input pyramid ``(batch, dim1, H, W)`` with ``h (batch, dim2, H, W)``."""
        p = self.conv(pyramid)
        if self.method == "cat":
            return torch.cat([p, h], dim=1)
        return p + h


class DownLevel(torch.nn.Module):
    """One resolution of the U-Net encoder: residual blocks (+ attention), then down-sampling.

    Attributes: ``blocks`` (ModuleList), ``attn`` (ModuleList, one per block, or empty),
    ``downsample`` (None at the last level), ``combine`` (progressive ``input_skip``) or
    ``pyramid_downsample`` (progressive ``residual``).
    """

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        self.attn = torch.nn.ModuleList()
        self.downsample = None
        self.combine = None
        self.pyramid_downsample = None


class UpLevel(torch.nn.Module):
    """One resolution of the U-Net decoder.

    Attributes: ``blocks`` (``num_res_blocks + 1`` residual blocks fed with the concatenated skip),
    ``attn`` (or None), ``pyramid_norm`` / ``pyramid_conv`` (progressive output branch) or
    ``pyramid_upsample`` (progressive ``residual``), ``upsample`` (None at the top level).
    """

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        self.attn = None
        self.pyramid_norm = None
        self.pyramid_conv = None
        self.pyramid_upsample = None
        self.upsample = None


class MidBlock(torch.nn.Module):
    """Bottleneck: residual block, self-attention, residual block."""

    def __init__(self, block_0, attn, block_1):
        super().__init__()
        self.block_0 = block_0
        self.attn = attn
        self.block_1 = block_1

    def forward(self, h, temb):
        """Apply to the deepest feature map."""
        return self.block_1(self.attn(self.block_0(h, temb)), temb)


# ----------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------
def _check_choice(name, value, choices):
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value.lower()


class NCSNpp(torch.nn.Module):
    """NCSN++ U-Net on ``(batch, channels, F, T)`` real "images" (the DiffSep/SGMSE+ backbone).

    Forward: ``h = 2 x - 1`` (unless ``centered``), the U-Net conditioned on ``log t`` through
    Gaussian Fourier features, output ``h / t`` (``scale_by_sigma``) then the 1x1 ``output_layer``.
    ``F`` and ``T`` must be multiples of ``2 ** (len(ch_mult) - 1)`` (64 by default).

    Arguments
    ---------
    scale_by_sigma : bool
        Divide the U-Net output by ``t`` (t plays the role of sigma).
    nonlinearity : str
        ``"swish"`` (default), ``"elu"``, ``"relu"`` or ``"lrelu"``.
    nf : int
        Base width (128 in the paper).
    ch_mult : tuple of int
        Width multiplier of each resolution.
    num_res_blocks : int
        Residual blocks per resolution in the encoder (one more in the decoder).
    attn_resolutions : tuple of int
        Frequency sizes (for an input of ``image_size``) where self-attention is used.
    resamp_with_conv : bool
        Convolution in the resampling layers (``resblock_type="ddpm"`` only).
    conditional : bool
        Time conditioning of the residual blocks.
    fir : bool
        FIR resampling (else nearest / average pooling).
    fir_kernel : sequence of float
        FIR taps.
    skip_rescale : bool
        Residual sums divided by ``sqrt(2)``.
    resblock_type : str
        ``"biggan"`` (default) or ``"ddpm"``.
    progressive : str
        Output pyramid: ``"output_skip"`` (default), ``"residual"`` or ``"none"``.
    progressive_input : str
        Input pyramid: ``"input_skip"`` (default), ``"residual"`` or ``"none"``.
    progressive_combine : str
        ``"sum"`` (default) or ``"cat"``.
    init_scale : float
        Init scale of the last layers of the residual branches (0 -> 1e-10).
    fourier_scale : float
        Std of the Fourier embedding frequencies.
    image_size : int
        Frequency size the attention placement refers to (level ``i`` has size
        ``image_size // 2**i``).
    num_channels_in, num_channels_out : int
        Input / output channels (``2K + 2`` and ``2K`` for DiffSep).
    embedding_type : str
        Only ``"fourier"`` (the reference's ``"positional"`` branch needs a noise table that
        the model never defines).
    dropout : float
        Dropout in the residual blocks.
    centered : bool
        If False, the input is mapped by ``2 x - 1`` first.
    channels_last : bool or None
        Run the U-Net in ``torch.channels_last`` memory format (not a reference option; it only
        changes speed: about 1.5x faster convolutions and 10x faster FIR up-sampling on CPU).
        None (default): on CPU only.

    Example
    -------
    >>> net = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), image_size=64,
    ...              num_channels_in=6, num_channels_out=4)
    >>> net(torch.randn(1, 6, 64, 64), torch.tensor([0.5])).shape
    torch.Size([1, 4, 64, 64])
    """

    def __init__(
        self,
        scale_by_sigma=True,
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 1, 2, 2, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
        fir=True,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        resblock_type="biggan",
        progressive="output_skip",
        progressive_input="input_skip",
        progressive_combine="sum",
        init_scale=0.0,
        fourier_scale=16,
        image_size=256,
        num_channels_in=4,
        num_channels_out=4,
        embedding_type="fourier",
        dropout=0.0,
        centered=False,
        channels_last=None,
    ):
        super().__init__()
        nonlinearity = _check_choice("nonlinearity", nonlinearity, set(_ACTIVATIONS))
        resblock_type = _check_choice("resblock_type", resblock_type, {"biggan", "ddpm"})
        progressive = _check_choice("progressive", progressive, {"none", "output_skip", "residual"})
        progressive_input = _check_choice(
            "progressive_input", progressive_input, {"none", "input_skip", "residual"}
        )
        combine_method = _check_choice("progressive_combine", progressive_combine, {"sum", "cat"})
        embedding_type = _check_choice("embedding_type", embedding_type, {"fourier"})
        for name, value in (("nf", nf), ("num_res_blocks", num_res_blocks), ("image_size", image_size),
                            ("num_channels_in", num_channels_in), ("num_channels_out", num_channels_out)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if len(ch_mult) < 1 or any(int(m) != m or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive integers, got {ch_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if min(nf * m for m in ch_mult) < 4:
            raise ValueError(f"nf={nf} is too small: GroupNorm needs at least 4 channels per layer")

        self.nf = nf
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.scale_by_sigma = scale_by_sigma
        self.centered = centered
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.channels_last = channels_last
        self.config = dict(
            scale_by_sigma=scale_by_sigma, nonlinearity=nonlinearity, nf=nf, ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
            resamp_with_conv=resamp_with_conv, conditional=conditional, fir=fir,
            fir_kernel=tuple(fir_kernel), skip_rescale=skip_rescale, resblock_type=resblock_type,
            progressive=progressive, progressive_input=progressive_input,
            progressive_combine=combine_method, init_scale=init_scale, fourier_scale=fourier_scale,
            image_size=image_size, num_channels_in=num_channels_in,
            num_channels_out=num_channels_out, embedding_type=embedding_type, dropout=dropout,
            centered=centered,
        )
        self.act = act = _ACTIVATIONS[nonlinearity]()
        resolutions = [image_size // (2**i) for i in range(self.num_resolutions)]
        self.attn_levels = [i for i, r in enumerate(resolutions) if r in attn_resolutions]
        temb_dim = 4 * nf

        # Registration order follows the reference, so that parameters() lists in the same order
        # up to the output layer (see convert.py for the explicit name mapping).
        self.output_layer = torch.nn.Conv2d(num_channels_in, num_channels_out, 1)
        self.time_embed = TimeEmbedding(nf, fourier_scale, act, conditional)

        def resblock(in_ch, out_ch=None, up=False, down=False):
            if resblock_type == "ddpm":
                return ResnetBlockDDPM(act, in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale)
            return ResnetBlockBigGAN(
                act, in_ch, out_ch, temb_dim, up, down, dropout, fir, fir_kernel, skip_rescale, init_scale
            )

        def attention(ch):
            return AttnBlock(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        channels = num_channels_in
        self.input_conv = conv3x3(channels, nf)
        self.pyramid_downsample = Resample("down", fir, fir_kernel) if progressive_input == "input_skip" else None
        self.pyramid_upsample = Resample("up", fir, fir_kernel) if progressive == "output_skip" else None

        # Encoder
        hs_c = [nf]
        in_ch = nf
        input_pyramid_ch = channels
        self.down_levels = torch.nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level = DownLevel()
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                level.blocks.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if i_level in self.attn_levels:
                    level.attn.append(attention(in_ch))
                hs_c.append(in_ch)
            if i_level != self.num_resolutions - 1:
                if resblock_type == "ddpm":
                    level.downsample = ConvResample(in_ch, mode="down", with_conv=resamp_with_conv,
                                                    fir=fir, fir_kernel=fir_kernel)
                else:
                    level.downsample = resblock(in_ch, down=True)
                if progressive_input == "input_skip":
                    level.combine = Combine(input_pyramid_ch, in_ch, combine_method)
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    level.pyramid_downsample = ConvResample(
                        input_pyramid_ch, in_ch, mode="down", with_conv=True, fir=fir, fir_kernel=fir_kernel
                    )
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)
            self.down_levels.append(level)

        # Bottleneck
        in_ch = hs_c[-1]
        self.mid = MidBlock(resblock(in_ch), attention(in_ch), resblock(in_ch))

        # Decoder (built deepest first, stored by resolution index)
        pyramid_ch = 0
        up_levels = [None] * self.num_resolutions
        for i_level in reversed(range(self.num_resolutions)):
            level = UpLevel()
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                level.blocks.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if i_level in self.attn_levels:
                level.attn = attention(in_ch)
            if progressive != "none":
                top = i_level == self.num_resolutions - 1
                if progressive == "output_skip":
                    level.pyramid_norm = group_norm(in_ch)
                    level.pyramid_conv = conv3x3(in_ch, channels, init_scale=init_scale)
                    pyramid_ch = channels
                elif top:  # residual, deepest level
                    level.pyramid_norm = group_norm(in_ch)
                    level.pyramid_conv = conv3x3(in_ch, in_ch)
                    pyramid_ch = in_ch
                else:  # residual
                    level.pyramid_upsample = ConvResample(
                        pyramid_ch, in_ch, mode="up", with_conv=True, fir=fir, fir_kernel=fir_kernel
                    )
                    pyramid_ch = in_ch
            if i_level != 0:
                if resblock_type == "ddpm":
                    level.upsample = ConvResample(in_ch, mode="up", with_conv=resamp_with_conv,
                                                  fir=fir, fir_kernel=fir_kernel)
                else:
                    level.upsample = resblock(in_ch, up=True)
            up_levels[i_level] = level
        assert not hs_c
        self.up_levels = torch.nn.ModuleList(up_levels)

        if progressive != "output_skip":
            self.final_norm = group_norm(in_ch)
            self.final_conv = conv3x3(in_ch, channels, init_scale=init_scale)
        else:
            self.final_norm = self.final_conv = None

    @property
    def size_multiple(self):
        """``F`` and ``T`` of the input must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.num_resolutions - 1)

    def _check_input(self, x, t):
        channels = self.config["num_channels_in"]
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be shaped (batch, {channels}, F, T), got {shape}")
        m = self.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"x has F={x.shape[2]}, T={x.shape[3]}; both must be multiples of {m} "
                "(zero-pad the frames, as ScoreModel does)"
            )
        if not torch.is_tensor(t) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"t must be shaped (batch,) = ({x.shape[0]},), got {shape}")

    def forward(self, x, t):
        """Apply the U-Net.

        Arguments
        ---------
        x : torch.Tensor
            ``(batch, num_channels_in, F, T)``.
        t : torch.Tensor
            Diffusion times ``(batch,)``, > 0.

        Returns
        -------
        torch.Tensor
            ``(batch, num_channels_out, F, T)``.
        """
        self._check_input(x, t)
        use_cl = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        if use_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        temb = self.time_embed(t)
        if not self.centered:
            x = 2 * x - 1.0

        # Encoder
        input_pyramid = x
        hs = [self.input_conv(x)]
        for level in self.down_levels:
            for j, block in enumerate(level.blocks):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.downsample is None:
                continue
            if self.resblock_type == "ddpm":
                h = level.downsample(hs[-1])
            else:
                h = level.downsample(hs[-1], temb)
            if self.progressive_input == "input_skip":
                input_pyramid = self.pyramid_downsample(input_pyramid)
                h = level.combine(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = level.pyramid_downsample(input_pyramid)
                input_pyramid = self._skip_sum(input_pyramid, h)
                h = input_pyramid
            hs.append(h)

        h = self.mid(hs[-1], temb)

        # Decoder
        inplace = _can_overwrite()
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up_levels[i_level]
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if level.attn is not None:
                h = level.attn(h)
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = level.pyramid_conv(_activate(self.act, level.pyramid_norm(h), inplace))
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid) + level.pyramid_conv(
                        _activate(self.act, level.pyramid_norm(h), inplace)
                    )
                else:
                    pyramid = self._skip_sum(level.pyramid_upsample(pyramid), h)
                    h = pyramid
            if level.upsample is not None:
                h = level.upsample(h) if self.resblock_type == "ddpm" else level.upsample(h, temb)

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.final_conv(_activate(self.act, self.final_norm(h), inplace))
        if self.scale_by_sigma:
            h = h / t.reshape(-1, 1, 1, 1)
        return self.output_layer(h)

    def _skip_sum(self, a, b):
        if self.config["skip_rescale"]:
            return (a + b) / _SQRT2
        return a + b


# ----------------------------------------------------------------------------------------------
# Time-domain score model
# ----------------------------------------------------------------------------------------------
class ScoreModel(torch.nn.Module):
    """DiffSep's score network: waveforms in, score waveforms out (``ScoreModelNCSNpp``).

    The ``K`` noisy sources ``x_t`` and the mixture ``y`` go through :class:`SpectralTransform`,
    are stacked as ``[Re x_1..Re x_K, Re y, Im x_1..Im x_K, Im y]`` (``2K + 2`` channels), the
    frames are zero-padded on the right to a multiple of 64, :class:`NCSNpp` maps them to ``2K``
    channels (real parts then imaginary parts), the padding is cropped and the inverse transform
    gives ``K`` waveforms of the input length.

    Arguments
    ---------
    num_sources : int
        Number of sources K.
    nf : int
        Base width of the backbone (128 in the paper).
    n_fft, hop_length : int
        STFT parameters (``n_fft // 2 + 1`` must be a multiple of 64 with the default ``ch_mult``).
    spec_exponent, spec_factor : float
        Amplitude compression ``alpha`` and ``beta``.
    **backbone_kwargs
        Any other :class:`NCSNpp` argument (``ch_mult``, ``attn_resolutions``, ...).

    Example
    -------
    >>> model = ScoreModel(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    >>> y = torch.randn(1, 1, 4000)
    >>> model(torch.randn(1, 2, 4000), torch.tensor([0.5]), y).shape
    torch.Size([1, 2, 4000])
    """

    def __init__(
        self,
        num_sources=2,
        nf=128,
        n_fft=510,
        hop_length=128,
        spec_exponent=0.5,
        spec_factor=0.15,
        **backbone_kwargs,
    ):
        super().__init__()
        if int(num_sources) != num_sources or num_sources < 1:
            raise ValueError(f"num_sources must be a positive integer, got {num_sources}")
        for key in ("num_channels_in", "num_channels_out"):
            if key in backbone_kwargs:
                raise ValueError(f"{key} is set from num_sources; do not pass it to ScoreModel")
        self.num_sources = int(num_sources)
        self.transform = SpectralTransform(n_fft, hop_length, spec_exponent, spec_factor)
        self.backbone = NCSNpp(
            nf=nf,
            num_channels_in=2 * self.num_sources + 2,
            num_channels_out=2 * self.num_sources,
            **backbone_kwargs,
        )
        m = self.backbone.size_multiple
        if self.transform.num_freqs % m:
            raise ValueError(
                f"n_fft={n_fft} gives {self.transform.num_freqs} frequency bins, which must be a "
                f"multiple of {m} for this backbone; use n_fft = {m}*j - 2 (e.g. 510)"
            )
        self.config = dict(
            num_sources=self.num_sources, nf=nf, n_fft=n_fft, hop_length=hop_length,
            spec_exponent=spec_exponent, spec_factor=spec_factor, **backbone_kwargs,
        )

    def _check_inputs(self, x_t, t, y):
        K = self.num_sources
        if not torch.is_tensor(x_t) or x_t.dim() != 3 or x_t.shape[1] != K:
            shape = tuple(x_t.shape) if torch.is_tensor(x_t) else type(x_t).__name__
            raise ValueError(f"x_t must be shaped (batch, K={K}, samples), got {shape}")
        B, _, n = x_t.shape
        if not torch.is_tensor(y) or tuple(y.shape) != (B, 1, n):
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(
                f"y (the mixture) must be shaped (batch, 1, samples) = ({B}, 1, {n}) like x_t, got {shape}"
            )
        if not torch.is_tensor(t) or tuple(t.shape) != (B,):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"t must be shaped (batch,) = ({B},), got {shape}; use t.expand(batch)")

    @staticmethod
    def check_time(t):
        """Check that the diffusion times are > 0 (the network embeds ``log t`` and divides by ``t``).

        :meth:`forward` checks shapes only: a value check reads ``t`` back to the host, which on a
        GPU stalls every network call and breaks a compiled graph. The samplers and losses give
        times in ``[t_eps, T]`` by construction; check times from elsewhere once with this.
        """
        t = torch.as_tensor(t)
        if not bool((t > 0).all()):
            raise ValueError("t must be > 0 (the network embeds log t and divides by t)")
        return t

    def forward(self, x_t, t, y):
        """Score estimate for the noisy sources.

        Arguments
        ---------
        x_t : torch.Tensor
            Noisy sources ``(batch, K, samples)``.
        t : torch.Tensor
            Diffusion times ``(batch,)``, > 0 (not checked per call, see :meth:`check_time`).
        y : torch.Tensor
            Mixture ``(batch, 1, samples)``.

        Returns
        -------
        torch.Tensor
            Score ``(batch, K, samples)``.
        """
        self._check_inputs(x_t, t, y)
        n = x_t.shape[-1]
        K = self.num_sources
        spec = self.transform(torch.cat([x_t, y], dim=1))
        h = torch.cat([spec.real, spec.imag], dim=1)
        frames = h.shape[-1]
        m = self.backbone.size_multiple
        pad = (-frames) % m
        if pad:
            h = F.pad(h, (0, pad))
        # .to(): under autocast the backbone returns bfloat16/float16; the iSTFT needs float32/64
        h = self.backbone(h, t.to(h.dtype))[..., :frames].to(h.dtype)
        out = torch.complex(h[:, :K].contiguous(), h[:, K:].contiguous())
        return self.transform.inverse(out, n)
