"""Converter of the authors' Lightning checkpoint: outputs vs the reference, EMA, mapping, safety."""
import collections
import importlib.abc
import os
import sys
import zipfile

import pytest
import torch

from conftest import DATA
from speechbrain_diffsep.convert import (
    REF_WINDOW_KEYS,
    from_reference_state_dict,
    load_reference_checkpoint,
    read_checkpoint,
    read_reference_config,
    reference_key_map,
    reference_module_paths,
    to_reference_state_dict,
)
from speechbrain_diffsep.ncsnpp import ScoreModel

CKPT = DATA / "diffsep_reference_nf16.ckpt"
IO = DATA / "diffsep_reference_nf16_io.pt"


@pytest.fixture(scope="module")
def io():
    return torch.load(IO, weights_only=True)


@pytest.fixture(scope="module")
def model():
    return load_reference_checkpoint(CKPT)


@pytest.fixture(scope="module")
def raw_ckpt():
    return read_checkpoint(CKPT)


def _batched(io, dtype):
    """Both reference times in one batch: (2, K, n) inputs and t = score_t."""
    x = io["score_xt"].expand(2, -1, -1).to(dtype)
    y = io["score_y"].expand(2, -1, -1).to(dtype)
    t = io["score_t"].to(dtype)  # float32 [0.5, 0.9] (cast to float64 exactly as the reference did)
    return x, t, y


def test_reproduces_reference_outputs_float32(model, io):
    x, t, y = _batched(io, torch.float32)
    with torch.no_grad():
        out = model(x, t, y)
    for i, name in enumerate(["score_out_t0.5", "score_out_t0.9"]):
        ref = io[name]
        assert out[i : i + 1].shape == ref.shape
        assert (out[i : i + 1] - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_reproduces_reference_outputs_float64(model, io):
    model64 = load_reference_checkpoint(CKPT).double()
    x, t, y = _batched(io, torch.float64)
    with torch.no_grad():
        out = model64(x, t, y)
    for i, name in enumerate(["score_out_t0.5_f64", "score_out_t0.9_f64"]):
        ref = io[name]
        assert (out[i : i + 1] - ref).abs().max() <= 1e-10 * ref.abs().max(), name


def test_uses_ema_weights(model, raw_ckpt, io):
    shadow = raw_ckpt["ema"]["shadow_params"]
    keys = [k for k in raw_ckpt["state_dict"] if k not in REF_WINDOW_KEYS]
    ours = model.state_dict()
    mapping = reference_key_map(model)
    for key, value in zip(keys, shadow):
        assert torch.equal(ours[mapping[key]], value), key
    assert model.reference_config["used_ema"] and not model.training
    raw = load_reference_checkpoint(CKPT, use_ema=False)
    assert not raw.reference_config["used_ema"]
    x, t, y = _batched(io, torch.float32)
    with torch.no_grad():
        out_raw = raw(x[:1], t[:1], y[:1])
    ref = io["score_out_t0.5"]
    assert (out_raw - ref).abs().max() > 0.1 * ref.abs().max()  # raw weights: clearly different


def test_reference_config(model):
    cfg = model.reference_config
    assert cfg["sample_rate"] == 8000 and cfg["num_sources"] == 2 and cfg["nf"] == 16
    assert (cfg["n_fft"], cfg["hop_length"]) == (510, 128)
    assert (cfg["spec_exponent"], cfg["spec_factor"]) == (0.5, 0.15)
    assert cfg["sde"] == {"gamma": 2.0, "sigma_min": 0.05, "sigma_max": 0.5, "N": 30}
    assert cfg["t_eps"] == 0.03
    assert cfg["sampler"] == {"N": 30, "snr": 0.5, "corrector_steps": 1}
    assert cfg["raw"]["model"]["score_model"]["num_sources"] == 2  # ${model.n_speakers} resolved
    assert model.transform.factor == 0.15 and model.num_sources == 2
    assert read_reference_config(CKPT)["sample_rate"] == 8000


def test_key_mapping_round_trip(model, raw_ckpt):
    ref_keys = [k for k in raw_ckpt["state_dict"] if k not in REF_WINDOW_KEYS]
    exported = to_reference_state_dict(model)
    assert list(exported) == ref_keys  # same names, same order as the authors' state_dict
    assert len(set(reference_key_map(model).values())) == len(model.state_dict())
    fresh = ScoreModel(num_sources=2, nf=16)
    from_reference_state_dict(exported, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_key_mapping_spot_checks(model):
    mapping = reference_key_map(model)
    p = "score_model.backbone."
    assert mapping[p + "all_modules.0.W"] == "backbone.time_embed.fourier.W"
    assert mapping[p + "all_modules.3.weight"] == "backbone.input_conv.weight"
    assert mapping[p + "all_modules.4.Dense_0.weight"] == "backbone.down_levels.0.blocks.0.temb_proj.weight"
    assert mapping[p + "all_modules.21.NIN_3.W"] == "backbone.down_levels.4.attn.0.proj_out.W"
    assert mapping[p + "all_modules.33.NIN_0.b"] == "backbone.mid.attn.query.b"
    assert mapping[p + "all_modules.75.weight"] == "backbone.up_levels.0.pyramid_norm.weight"
    assert mapping[p + "all_modules.76.weight"] == "backbone.up_levels.0.pyramid_conv.weight"
    assert mapping[p + "output_layer.bias"] == "backbone.output_layer.bias"
    assert len(reference_module_paths(model.backbone)) == 77


def test_key_mapping_covers_paper_model():
    with torch.device("meta"):
        big = ScoreModel(num_sources=2, nf=128)
    mapping = reference_key_map(big)
    assert len(mapping) == 647
    assert list(to_reference_state_dict(big))[:3] == [
        "score_model.backbone.output_layer.weight",
        "score_model.backbone.output_layer.bias",
        "score_model.backbone.all_modules.0.W",
    ]


@pytest.mark.parametrize(
    "options",
    [dict(resblock_type="ddpm"), dict(progressive="residual", progressive_input="residual"),
     dict(progressive="none", progressive_input="none", conditional=False)],
)
def test_key_mapping_round_trip_variants(options):
    kw = dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(64,), **options)
    a, b = ScoreModel(**kw), ScoreModel(**kw)
    exported = to_reference_state_dict(a)
    assert len(exported) == len(a.state_dict())
    from_reference_state_dict(exported, b)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_state_dict_fallback_and_defaults(tmp_path):
    """A checkpoint without ema / config: weights from state_dict, architecture from shapes."""
    torch.manual_seed(0)
    src = ScoreModel(num_sources=3, nf=4).eval()
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": to_reference_state_dict(src)}, path)
    loaded = load_reference_checkpoint(path)
    assert loaded.num_sources == 3 and loaded.reference_config["nf"] == 4
    assert not loaded.reference_config["used_ema"]
    x, y = torch.randn(1, 3, 1000), torch.randn(1, 1, 1000)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.5]), y), src(x, torch.tensor([0.5]), y))


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_refuses_forbidden_global(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": collections.OrderedDict(), "payload": _Marker(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.ckpt.*'(posix|os|nt)\.mkdir' is not allowed"):
        load_reference_checkpoint(path)
    assert not marker.exists()


class _BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"omegaconf", "hydra", "lightning", "pytorch_lightning", "torch_ema"}:
            raise ImportError(f"{name} blocked by the test")
        return None


def test_needs_no_omegaconf_lightning_or_hydra(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in {"omegaconf", "hydra", "pytorch_lightning", "lightning"}:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockImports()] + sys.meta_path)
    ckpt = read_checkpoint(CKPT)
    assert type(ckpt["hyper_parameters"]["config"]).__name__ == "DictConfig"
    assert len(ckpt["ema"]["shadow_params"]) == 647


def test_errors_name_the_file(tmp_path, raw_ckpt):
    with pytest.raises(ValueError, match="missing.ckpt: not a file"):
        load_reference_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="not a file"):
        load_reference_checkpoint(tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.ckpt: not a torch zip"):
        load_reference_checkpoint(junk)
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("broken/readme.txt", "no data.pkl here")
    with pytest.raises(ValueError, match="broken.ckpt: cannot read"):
        load_reference_checkpoint(broken)
    nostate = tmp_path / "nostate.ckpt"
    torch.save({"epoch": 3}, nostate)
    with pytest.raises(ValueError, match="nostate.ckpt: no 'state_dict'"):
        load_reference_checkpoint(nostate)
    # a tensor with the wrong shape
    state = collections.OrderedDict(raw_ckpt["state_dict"])
    key = "score_model.backbone.all_modules.4.Conv_0.weight"
    state[key] = torch.zeros(16, 16, 1, 1)
    bad = tmp_path / "badshape.ckpt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(ValueError, match=r"badshape.ckpt: .*all_modules\.4\.Conv_0\.weight has shape \(16, 16, 1, 1\)"):
        load_reference_checkpoint(bad)
    # EMA list that does not fit the state_dict
    short = tmp_path / "short_ema.ckpt"
    shadow = raw_ckpt["ema"]["shadow_params"][:-1]
    torch.save({"state_dict": raw_ckpt["state_dict"], "ema": {"shadow_params": shadow}}, short)
    with pytest.raises(ValueError, match="short_ema.ckpt: ema.shadow_params has 646"):
        load_reference_checkpoint(short)
