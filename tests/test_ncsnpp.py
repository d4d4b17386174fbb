"""NCSN++ backbone and ScoreModel: sizes, structure, FIR resampling, attention, gradients, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from speechbrain_diffsep.frontend import SpectralTransform
from speechbrain_diffsep.ncsnpp import (
    AttnBlock,
    NCSNpp,
    Resample,
    ScoreModel,
    default_init_,
    downsample_fir,
    fir_kernel_2d,
    upsample_fir,
)

SMALL = dict(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), image_size=64,
             num_channels_in=6, num_channels_out=4)


# ----------------------------------------------------------------------------------------------
# sizes and structure
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nf", [128, 64])
def test_parameter_count_matches_reference(ref_values, nf):
    ref = ref_values["network_shapes_and_params"]
    key = next(k for k in ref if k.startswith(f"params_nf{nf} "))  # "params_nf128 (config/...)"
    with torch.device("meta"):
        model = ScoreModel(num_sources=2, nf=nf)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == ref[key] == {128: 65_623_366, 64: 16_456_390}[nf]
    assert sum(p.numel() for p in params if p.requires_grad) == ref[f"params_nf{nf}_trainable"]
    assert len(params) == 647  # as many tensors as the reference's EMA shadow_params


def test_named_lobes_and_attention_placement():
    with torch.device("meta"):
        net = NCSNpp(nf=16, num_channels_in=6, num_channels_out=4)
    # frequency size 16 at F = 256 is level 4 of (256, 128, 64, 32, 16, 8, 4)
    assert [i for i, lvl in enumerate(net.down_levels) if len(lvl.attn)] == [4]
    assert len(net.down_levels[4].attn) == 2
    assert [i for i, lvl in enumerate(net.up_levels) if lvl.attn is not None] == [4]
    assert isinstance(net.mid.attn, AttnBlock)
    assert net.down_levels[6].downsample is None and net.up_levels[0].upsample is None
    assert len(net.up_levels[3].blocks) == 3
    assert net.input_conv.weight.shape == (16, 6, 3, 3)
    assert net.output_layer.weight.shape == (4, 6, 1, 1)
    assert net.up_levels[0].pyramid_conv.weight.shape == (6, 16, 3, 3)
    assert net.down_levels[2].combine.conv.weight.shape == (32, 6, 1, 1)
    # GroupNorm groups min(C // 4, 32), eps 1e-6
    assert net.down_levels[0].blocks[0].norm_0.num_groups == 4
    assert net.down_levels[3].blocks[0].norm_0.eps == 1e-6
    with torch.device("meta"):
        big = NCSNpp(nf=256, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=256)
    assert big.down_levels[1].blocks[0].norm_1.num_groups == 32
    with torch.device("meta"):
        shifted = NCSNpp(nf=16, image_size=128, num_channels_in=6, num_channels_out=4)
    assert [i for i, lvl in enumerate(shifted.down_levels) if len(lvl.attn)] == [3]


def test_initialisation():
    torch.manual_seed(0)
    w = default_init_(torch.empty(256, 128, 3, 3))
    fan_avg = (256 + 128) * 9 / 2
    assert w.abs().max() <= math.sqrt(3 / fan_avg)
    assert abs(w.std().item() / math.sqrt(1 / fan_avg) - 1) < 0.01
    assert default_init_(torch.empty(64, 64), scale=0).abs().max() <= math.sqrt(3e-10 / 64)
    net = NCSNpp(**SMALL)
    block = net.down_levels[0].blocks[0]
    assert block.conv_1.weight.abs().max() < 1e-5  # init_scale 0 -> 1e-10
    assert block.conv_0.weight.abs().max() > 1e-2
    assert torch.count_nonzero(block.conv_0.bias) == 0
    attn = net.down_levels[2].attn[0]
    assert attn.proj_out.W.abs().max() < 1e-5 and attn.query.W.abs().max() > 1e-3
    assert not net.time_embed.fourier.W.requires_grad
    assert abs(net.time_embed.fourier.W.std().item() - 16) < 10  # N(0, 16^2), only 8 draws


# ----------------------------------------------------------------------------------------------
# FIR resampling against a naive upfirdn2d (zero insertion, padding, convolution, decimation)
# ----------------------------------------------------------------------------------------------
def naive_upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    B, C, H, W = x.shape
    u = x.new_zeros(B, C, H * up, W * up)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, (pad[0], pad[1], pad[0], pad[1]))
    L = kernel.shape[0]
    oh, ow = u.shape[2] - L + 1, u.shape[3] - L + 1
    out = x.new_zeros(B, C, oh, ow)
    flipped = torch.flip(kernel, (0, 1))
    for i in range(L):
        for j in range(L):
            out += u[:, :, i:i + oh, j:j + ow] * flipped[i, j]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 1), (1, 2, 3, 4), (1, 4, 6, 4, 1, 2)])
def test_fir_upsample_equals_upfirdn2d(taps):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    p = len(taps) - 2
    k = torch.outer(torch.tensor(taps, dtype=torch.float64), torch.tensor(taps, dtype=torch.float64))
    k = k / k.sum() * 4
    ref = naive_upfirdn2d(x, k, up=2, pad=((p + 1) // 2 + 1, p // 2))
    ours = upsample_fir(x, fir_kernel_2d(taps, gain=4.0))
    assert ours.shape == ref.shape == (2, 3, 16, 12)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 1), (1, 2, 3, 4)])
def test_fir_downsample_equals_upfirdn2d(taps):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    p = len(taps) - 2
    k = torch.outer(torch.tensor(taps, dtype=torch.float64), torch.tensor(taps, dtype=torch.float64))
    k = k / k.sum()
    ref = naive_upfirdn2d(x, k, down=2, pad=((p + 1) // 2, p // 2))
    ours = downsample_fir(x, fir_kernel_2d(taps))
    assert ours.shape == ref.shape == (2, 3, 4, 3)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-13)


def test_default_fir_kernel_values():
    """StyleGAN2 with [1,3,3,1]: up pads (2, 1) with outer/64*4, down pads (1, 1) with outer/64."""
    k = torch.tensor([[1.0, 3, 3, 1]]).T @ torch.tensor([[1.0, 3, 3, 1]])
    x = torch.randn(1, 4, 16, 8)
    up, down = Resample("up"), Resample("down")
    assert torch.equal(up.kernel, k / 64 * 4) and torch.equal(down.kernel, k / 64)
    assert torch.allclose(up(x), naive_upfirdn2d(x, k / 16, up=2, pad=(2, 1)), atol=1e-6)
    assert torch.allclose(down(x), naive_upfirdn2d(x, k / 64, down=2, pad=(1, 1)), atol=1e-6)
    # a constant image stays constant away from the borders
    ones = torch.ones(1, 1, 8, 8)
    assert torch.allclose(up(ones)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))
    assert torch.allclose(down(ones)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))


# ----------------------------------------------------------------------------------------------
# blocks and forward semantics
# ----------------------------------------------------------------------------------------------
def test_attention_matches_explicit_softmax():
    torch.manual_seed(1)
    attn = AttnBlock(8, skip_rescale=True, init_scale=1.0).double()
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    h = attn.norm(x)

    def nin(m, v):
        return torch.einsum("bchw,co->bohw", v, m.W) + m.b[None, :, None, None]

    q, k, v = nin(attn.query, h), nin(attn.key, h), nin(attn.value, h)
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 4, 6, 24) / math.sqrt(8)
    w = torch.softmax(w, dim=-1).reshape(2, 4, 6, 4, 6)
    out = nin(attn.proj_out, torch.einsum("bhwij,bcij->bchw", w, v))
    expected = (x + out) / math.sqrt(2)
    assert torch.allclose(attn(x), expected, rtol=0, atol=1e-12)


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return net


def test_output_layer_after_division_by_t():
    torch.manual_seed(0)
    net = _randomize(NCSNpp(**SMALL).double())
    plain = NCSNpp(**{**SMALL, "scale_by_sigma": False}).double()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 6, 64, 64, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    b = net.output_layer.bias[None, :, None, None]
    lhs = (net(x, t) - b) * t[:, None, None, None]
    assert torch.allclose(lhs, plain(x, t) - b, atol=1e-10)


def test_centered_flag_maps_input():
    net = _randomize(NCSNpp(**SMALL).double())
    centered = NCSNpp(**{**SMALL, "centered": True}).double()
    centered.load_state_dict(net.state_dict())
    x = torch.randn(1, 6, 64, 64, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    assert torch.allclose(net(x, t), centered(2 * x - 1, t), atol=1e-12)


VARIANTS = [
    dict(),
    dict(fir=False),
    dict(resblock_type="ddpm"),
    dict(resblock_type="ddpm", fir=False),
    dict(resblock_type="ddpm", resamp_with_conv=False),
    dict(progressive="none", progressive_input="none"),
    dict(progressive="residual", progressive_input="residual"),
    dict(progressive="residual", progressive_input="residual", fir=False),
    dict(progressive_combine="cat"),
    dict(conditional=False),
    dict(nonlinearity="elu", skip_rescale=False, dropout=0.1),
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_variants_forward_and_backward(options):
    torch.manual_seed(0)
    net = _randomize(NCSNpp(**{**SMALL, **options}))
    x = torch.randn(2, 6, 64, 128, requires_grad=True)
    out = net(x, torch.tensor([0.2, 0.7]))
    assert out.shape == (2, 4, 64, 128)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        unused = not net.config["conditional"] and ("time_embed" in name or "temb_proj" in name)
        if p.requires_grad and not unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("options", [dict(), dict(resblock_type="ddpm", nonlinearity="lrelu", skip_rescale=False)])
def test_inference_fast_path_matches_autograd_path(options):
    """no_grad overwrites intermediates and runs channels_last on CPU: same numbers, input untouched."""
    torch.manual_seed(0)
    net = _randomize(NCSNpp(**{**SMALL, **options})).double()
    x = torch.randn(2, 6, 64, 64, dtype=torch.float64)
    x_copy = x.clone()
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    with torch.no_grad():
        fast = net(x, t)
    assert torch.equal(x, x_copy)
    net.channels_last = False
    slow = net(x, t)  # autograd on: no in-place ops, contiguous format
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=0, atol=1e-12 * slow.abs().max().item())


def _identity_backbone(num_sources):
    """Backbone stand-in returning the channels of x (real parts, imaginary parts)."""

    class Identity(torch.nn.Module):
        size_multiple = 64

        def forward(self, h, t):
            assert h.shape[1] == 2 * num_sources + 2 and h.shape[-1] % 64 == 0
            K = num_sources
            return torch.cat([h[:, :K], h[:, K + 1:2 * K + 1]], dim=1)

    return Identity()


@pytest.mark.parametrize("num_sources", [2, 3])
def test_score_model_channel_order_and_padding(num_sources):
    model = ScoreModel(num_sources=num_sources, nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=())
    model.backbone = _identity_backbone(num_sources)
    x = torch.randn(2, num_sources, 3000, dtype=torch.float64)
    y = torch.randn(2, 1, 3000, dtype=torch.float64) * 10
    out = model.double()(x, torch.tensor([0.5, 0.6], dtype=torch.float64), y)
    assert torch.allclose(out, x, atol=1e-10)  # the mixture's channels were skipped correctly
    # the channel layout fed to the backbone: [Re x_1..Re x_K, Re y, Im x_1..Im x_K, Im y]
    seen = {}
    model.backbone.forward = lambda h, t: seen.setdefault("h", h)[:, : 2 * num_sources]
    model(x, torch.tensor([0.5, 0.6], dtype=torch.float64), y)
    spec = SpectralTransform()(torch.cat([x, y], dim=1))
    frames = spec.shape[-1]
    h = seen["h"]
    assert h.shape == (2, 2 * num_sources + 2, 256, 64)
    assert torch.allclose(h[:, : num_sources + 1, :, :frames], spec.real)
    assert torch.allclose(h[:, num_sources + 1:, :, :frames], spec.imag)
    assert torch.count_nonzero(h[..., frames:]) == 0


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return _randomize(ScoreModel(num_sources=2, nf=16)).eval()


@pytest.mark.parametrize("n", [1000, 8500, 16000])
def test_score_model_output_shapes(tiny_model, n):
    """253 frames -> 256, 70 -> 128 (not a multiple of 64), 128 frames (no padding)."""
    x = torch.randn(2, 2, n)
    y = torch.randn(2, 1, n)
    with torch.no_grad():
        out = tiny_model(x, torch.tensor([0.1, 0.9]), y)
    assert out.shape == (2, 2, n) and torch.isfinite(out).all()
    assert out.abs().max() > 0
    # each example only depends on itself
    with torch.no_grad():
        single = tiny_model(x[1:], torch.tensor([0.9]), y[1:])
    assert torch.allclose(single, out[1:], atol=1e-5 * out.abs().max())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ScoreModel(num_sources=2, nf=8)
    x = torch.randn(1, 2, 2000)
    y = torch.randn(1, 1, 2000)
    model(x, torch.tensor([0.4]), y).square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("fourier.W"):
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.output_layer.weight.grad.abs().sum() > 0
    assert model.backbone.input_conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resblock_type="unet"), "resblock_type"),
        (dict(progressive="skip"), "progressive"),
        (dict(progressive_input="foo"), "progressive_input"),
        (dict(progressive_combine="mul"), "progressive_combine"),
        (dict(embedding_type="positional"), "embedding_type"),
        (dict(nonlinearity="gelu"), "nonlinearity"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(nf=2), "nf"),
        (dict(dropout=1.5), "dropout"),
        (dict(fir_kernel=(1,)), "fir_kernel"),
    ],
)
def test_bad_backbone_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NCSNpp(**{**SMALL, **kwargs})


def test_bad_backbone_inputs():
    net = NCSNpp(**SMALL)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 6, 64, 66), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="x must be shaped"):
        net(torch.randn(1, 5, 64, 64), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="t must be shaped"):
        net(torch.randn(1, 6, 64, 64), torch.tensor(0.5))


def test_bad_score_model_arguments():
    with pytest.raises(ValueError, match="n_fft"):
        ScoreModel(nf=4, n_fft=400)
    with pytest.raises(ValueError, match="num_channels_in"):
        ScoreModel(nf=4, num_channels_in=6)
    with pytest.raises(ValueError, match="num_sources"):
        ScoreModel(num_sources=0, nf=4)


@pytest.mark.parametrize(
    "x_shape, t, y_shape, match",
    [
        ((1, 3, 800), [0.5], (1, 1, 800), "x_t must be shaped"),
        ((1, 800), [0.5], (1, 1, 800), "x_t must be shaped"),
        ((1, 2, 800), [0.5], (1, 2, 800), "y \\(the mixture\\)"),
        ((1, 2, 800), [0.5], (1, 1, 700), "y \\(the mixture\\)"),
        ((2, 2, 800), [0.5], (2, 1, 800), "t must be shaped"),
    ],
)
def test_bad_score_model_inputs(x_shape, t, y_shape, match):
    model = ScoreModel(nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match=match):
        model(torch.randn(x_shape), torch.tensor(t), torch.randn(y_shape))


@pytest.mark.parametrize("t", [[0.0], [-0.5], [0.5, 0.0]])
def test_bad_times_are_checked_once_not_per_call(t):
    # forward checks shapes only (a value check would be a host sync per network call)
    with pytest.raises(ValueError, match="t must be > 0"):
        ScoreModel.check_time(torch.tensor(t))
    assert ScoreModel.check_time(torch.tensor([0.5, 1.0])).shape == (2,)


def test_autocast_bfloat16_returns_input_dtype():
    torch.manual_seed(0)
    model = _randomize(ScoreModel(nf=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,))).eval()
    x, y, t = torch.randn(1, 2, 1500), torch.randn(1, 1, 1500), torch.tensor([0.5])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.dtype == torch.float32
    assert (out - ref).norm() <= 0.05 * ref.norm()  # bfloat16 has ~3 significant digits
