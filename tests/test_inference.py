"""DiffSepSeparation / DiffSepEnhancement: SpeechBrain-compatible usage, options, bad input.

The model folders are made by the export command in temporary folders: the separator from the
authors' tiny checkpoint (nf=16, so the folder can be checked against their seeded separation),
the enhancer from a fake recipe run with the PriorMixingSDE at 16 kHz.
"""
import os

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from hyperpyyaml import load_hyperpyyaml

from conftest import DATA
from speechbrain.dataio import audio_io
from speechbrain.inference.separation import SepformerSeparation
from speechbrain_diffsep import export
from speechbrain_diffsep.chunking import chunk_bounds
from speechbrain_diffsep.inference import DiffSepEnhancement, DiffSepSeparation, read_audio
from test_export import make_recipe_run

SR = 8000
FAST = dict(num_steps=2)


@pytest.fixture(scope="module")
def sep_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "diffsep-nf16"
    assert export.main(["--out", str(out), "--from-reference", str(DATA / "diffsep_reference_nf16.ckpt")]) == 0
    return out


@pytest.fixture(scope="module")
def separator(sep_folder):
    return DiffSepSeparation.from_hparams(source=str(sep_folder), run_opts={"device": "cpu"})


@pytest.fixture(scope="module")
def enh_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enh")
    run, _, _ = make_recipe_run(root / "run", sample_rate=16000, sde="PriorMixingSDE", si_sdrs=(1.0,), incomplete_best=False)
    export.export_from_recipe(run, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def enhancer(enh_folder):
    return DiffSepEnhancement.from_hparams(source=str(enh_folder), run_opts={"device": "cpu"})


def signal(n, seed=0, channels=None):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n if channels is None else (n, channels), generator=g)
    return x.numpy()


def write(path, data, rate=SR, **kw):
    soundfile.write(str(path), data, rate, **kw)
    return str(path)


# ------------------------------------------------------------------ batch API
def test_separate_batch_shape_dtype_and_seed(separator):
    mix = torch.from_numpy(np.stack([signal(2000, 1), signal(2000, 2)]))
    a = separator.separate_batch(mix, seed=3, **FAST)
    b = separator.separate_batch(mix.double(), seed=3, **FAST)
    c = separator.separate_batch(mix, seed=4, **FAST)
    assert a.shape == (2, 2000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)  # deterministic for a seed (float64 input is cast to the model's dtype)
    assert not torch.allclose(a, c)
    assert separator.last_nfe == 4  # PC sampler: 2 steps x (predictor + corrector)
    assert torch.isfinite(a).all()


def test_model_folder_reproduces_the_authors_seeded_separation(separator):
    """yaml defaults (pc, 30 steps, snr 0.5, dt 1/N) + seed 1234 = the reference's separate.py output."""
    io = torch.load(DATA / "diffsep_reference_nf16_io.pt", weights_only=True)
    est = separator.separate_batch(io["sep_mix"], seed=int(io["sep_seed"]))
    assert separator.last_nfe == 60
    ref = io["sep_scaled"].transpose(1, 2)
    assert (est - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_per_call_options_override_the_yaml(separator):
    mix = torch.from_numpy(signal(1500))[None]
    separator.separate_batch(mix, sampler="ode", num_steps=3, seed=0)
    assert separator.last_nfe == 5  # Heun on 3 points (4) + final denoising call; pc options not passed
    separator.separate_batch(mix, num_steps=2, seed=0, corrector_steps=0)
    assert separator.last_nfe == 2
    with pytest.raises(ValueError, match="sampler 'ode' has no option 'snr'"):
        separator.separate_batch(mix, sampler="ode", snr=0.3)
    with pytest.raises(ValueError, match="sampler 'em': .*unexpected keyword argument 'snrr'"):
        separator.separate_batch(mix, sampler="em", snrr=0.3)
    with pytest.raises(ValueError, match="unknown sampler"):
        separator.separate_batch(mix, sampler="dpm-solver")
    with pytest.raises(ValueError, match="overlap_seconds must lie in"):
        separator.separate_batch(mix, chunk_seconds=0.1, overlap_seconds=0.08)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        separator.separate_batch(mix, num_steps=0)


def test_yaml_sampling_defaults_are_used(sep_folder, tmp_path):
    model = DiffSepSeparation.from_hparams(
        source=str(sep_folder), overrides={"num_steps": 2, "seed": 7, "sampler_options": {"corrector_steps": 0}}
    )
    mix = torch.from_numpy(signal(1500))[None]
    a = model.separate_batch(mix)
    assert model.last_nfe == 2
    assert torch.equal(a, model.separate_batch(mix))  # the yaml seed makes the default call deterministic


def test_sampler_presets_apply_to_a_sampler_chosen_by_name(sep_folder):
    """``sampler_presets[name]`` < the yaml's ``sampler_options`` (default sampler only) < per-call options."""
    model = DiffSepSeparation.from_hparams(
        source=str(sep_folder),
        overrides={"sampler_presets": {"em": {"restart_t": 0.5}, "pc": {"corrector_steps": 0, "snr": 0.25}},
                   "sampler_options": {"corrector_steps": 1}},
    )
    mix = torch.from_numpy(signal(1500))[None]
    a = model.separate_batch(mix, sampler="em", num_steps=3, seed=0)
    assert model.last_nfe == 4  # 3 steps + the restart's call at T
    assert torch.equal(a, separator_call(model, mix, sampler="em", num_steps=3, seed=0, restart_t=0.5))
    model.separate_batch(mix, sampler="em", num_steps=3, seed=0, restart_t=None)
    assert model.last_nfe == 3  # a per-call option beats the preset
    # the default sampler (pc): the yaml's sampler_options (corrector_steps 1, snr 0.5) beat the preset's
    b = model.separate_batch(mix, num_steps=2, seed=0)
    assert model.last_nfe == 4
    assert torch.equal(b, separator_call(model, mix, num_steps=2, seed=0, corrector_steps=1, snr=0.5))
    assert not torch.equal(b, separator_call(model, mix, num_steps=2, seed=0, corrector_steps=1, snr=0.25))
    model.separate_batch(mix, sampler="ode", num_steps=3, seed=0)
    assert model.last_nfe == 5  # no preset for ode


def separator_call(model, mix, **kw):
    """The same call on a copy of the model without presets."""
    saved = model.hparams.sampler_presets
    model.hparams.sampler_presets = {}
    try:
        return model.separate_batch(mix, **kw)
    finally:
        model.hparams.sampler_presets = saved


@pytest.mark.parametrize("presets, match", [
    ({"em": {"snrr": 0.3}}, "sampler 'em': .*unexpected keyword argument 'snrr'"),
    ({"ode": {"snr": 0.3}}, "sampler 'ode' has no option 'snr'"),
    ([0.3], "sampler_presets in hyperparams.yaml must map sampler names to options"),
])
def test_bad_sampler_presets_are_one_line_errors(sep_folder, presets, match):
    model = DiffSepSeparation.from_hparams(source=str(sep_folder), overrides={"sampler_presets": presets})
    name = next(iter(presets)) if isinstance(presets, dict) else "em"
    with pytest.raises(ValueError, match=match):
        model.separate_batch(torch.from_numpy(signal(800))[None], sampler=name, num_steps=2)


def test_chunked_batch_agrees_with_whole_when_one_chunk(separator):
    """One chunk = the whole; several chunks: deterministic, one sampler run per chunk, and the first chunk's
    own part (before the first overlap) is that chunk separated alone, times the whole-file gain per source."""
    mix = torch.from_numpy(signal(2400, 5))[None]
    whole = separator.separate_batch(mix, seed=1, **FAST)
    one_chunk = separator.separate_batch(mix, seed=1, chunk_seconds=0.5, overlap_seconds=0.1, **FAST)
    assert torch.allclose(whole, one_chunk, atol=1e-6)  # only the (idempotent) final gain differs
    chunked = separator.separate_batch(mix, seed=1, chunk_seconds=0.1, overlap_seconds=0.02, **FAST)
    assert chunked.shape == whole.shape and torch.isfinite(chunked).all()
    assert separator.last_nfe == 4 * 4  # 4 chunks of 800 samples with hop 640 over 2400 samples
    assert torch.equal(chunked, separator.separate_batch(mix, seed=1, chunk_seconds=0.1, overlap_seconds=0.02, **FAST))
    first = separator.separate_batch(mix[:, :800], seed=1, **FAST)[0, :640]  # the same draws: chunk 1 comes first
    part = chunked[0, :640]
    gain = (part * first).sum(0) / (first * first).sum(0)
    assert float((part - gain * first).abs().max()) < 1e-5 * float(part.abs().max())
    assert not torch.allclose(part, whole[0, :640], atol=1e-3)  # (the chunk was not the whole file's first part)


def test_chunked_batch_of_a_known_separator_is_the_unchunked_output(separator, monkeypatch):
    """With the sampler replaced by a pointwise separator [2 max(m, 0), min(m, 0) / 2] that returns its sources
    in a random order per chunk, the chunked separation must be [max(m, 0), min(m, 0)] (the final
    least-squares gains onto the mixture are 1/2 and 2) at every sample, seams included: the chunks are
    aligned, the cross-fade weights sum to 1 and the gains are applied."""
    from speechbrain_diffsep import inference

    order = torch.Generator().manual_seed(0)

    def pointwise(model, sde, piece, **kw):
        est = torch.cat([2 * piece.clamp(min=0), 0.5 * piece.clamp(max=0)], dim=1)
        for b in range(est.shape[0]):
            est[b] = est[b, torch.randperm(2, generator=order)]
        return est, 1

    monkeypatch.setattr(inference, "separate_mixture", pointwise)
    mix = torch.from_numpy(np.stack([signal(2500, 6), signal(2500, 7)]))
    expected = torch.stack([mix.clamp(min=0), mix.clamp(max=0)], dim=-1)
    for overlap in (0.02, 0.05):
        est = separator.separate_batch(mix, chunk_seconds=0.1, overlap_seconds=overlap)
        assert separator.last_nfe == len(chunk_bounds(2500, 800, round(overlap * SR))) >= 3
        for b in range(2):
            aligned = est[b] if float((est[b] - expected[b]).abs().max()) < 1e-3 else est[b].flip(-1)
            assert torch.allclose(aligned, expected[b], atol=1e-6), (overlap, b)


@pytest.mark.parametrize(
    "mix,match",
    [
        (torch.zeros(100), r"mix must be a tensor shaped \[batch, time\]"),
        (torch.zeros(1, 100, 2), r"mix must be a tensor shaped \[batch, time\]"),
        (torch.full((1, 100), float("nan")), "NaN or inf"),
        (torch.zeros(1, 0), "at least 2 samples"),
    ],
)
def test_bad_batches_are_named(separator, mix, match):
    with pytest.raises(ValueError, match=match) as err:
        separator.separate_batch(mix)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ files
def sepformer_usage(separator, source, savedir, path, outdir):
    """SpeechBrain's documented SepformerSeparation usage (model card), unchanged except that
    ``torchaudio.save`` (needs torchcodec) is SpeechBrain's drop-in ``audio_io.save``."""
    model = separator.from_hparams(source=source, savedir=savedir)
    est_sources = model.separate_file(path=path)
    audio_io.save(os.path.join(outdir, "source1hat.wav"), est_sources[:, :, 0].detach().cpu(), 8000)
    audio_io.save(os.path.join(outdir, "source2hat.wav"), est_sources[:, :, 1].detach().cpu(), 8000)
    return est_sources


TINY_SEPFORMER = """
sample_rate: 8000
num_spks: 2
encoder: !new:speechbrain.lobes.models.dual_path.Encoder {kernel_size: 16, out_channels: 8}
block: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock {num_layers: 1, d_model: 8, nhead: 1, d_ffn: 16}
masknet: !new:speechbrain.lobes.models.dual_path.Dual_Path_Model
    {num_spks: 2, in_channels: 8, out_channels: 8, num_layers: 1, K: 25, intra_model: !ref <block>, inter_model: !ref <block>}
decoder: !new:speechbrain.lobes.models.dual_path.Decoder {in_channels: 8, out_channels: 1, kernel_size: 16, stride: 8, bias: False}
modules: {encoder: !ref <encoder>, masknet: !ref <masknet>, decoder: !ref <decoder>}
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables: {encoder: !ref <encoder>, masknet: !ref <masknet>, decoder: !ref <decoder>}
"""


def test_sepformer_usage_runs_unchanged(sep_folder, tmp_path):
    sepformer = tmp_path / "sepformer"
    sepformer.mkdir()
    (sepformer / "hyperparams.yaml").write_text(TINY_SEPFORMER)
    hp = load_hyperpyyaml(TINY_SEPFORMER)
    for key in ("encoder", "masknet", "decoder"):
        torch.save(hp[key].state_dict(), sepformer / f"{key}.ckpt")
    fast = _copy_yaml(sep_folder, tmp_path / "diffsep", edit=("num_steps: 30", "num_steps: 3"))  # the code stays unchanged
    path = write(tmp_path / "mix.wav", signal(1600, 3))
    results = {}
    for cls, source in ((SepformerSeparation, sepformer), (DiffSepSeparation, fast)):
        out = tmp_path / cls.__name__
        out.mkdir()
        est = sepformer_usage(cls, str(source), str(tmp_path / f"{cls.__name__}_save"), path, str(out))
        info = [soundfile.info(str(out / f"source{i}hat.wav")) for i in (1, 2)]
        results[cls] = (est.shape, est.dtype, est.abs().amax(dim=1), [(i.frames, i.samplerate, i.channels) for i in info])
    ours, theirs = results[DiffSepSeparation], results[SepformerSeparation]
    assert ours[0] == theirs[0] == (1, 1600, 2)
    assert ours[1] == theirs[1] == torch.float32
    assert torch.allclose(ours[2], theirs[2]) and torch.allclose(ours[2], torch.ones(1, 2))  # peak-normalized
    assert ours[3] == theirs[3] == [(1600, 8000, 1)] * 2
    assert (tmp_path / "DiffSepSeparation_save" / "score_model.ckpt").is_symlink()  # savedir as SpeechBrain


def test_separate_file_is_the_peak_normalized_batch_result(separator, tmp_path):
    x = signal(2000, 8)
    est = separator.separate_file(write(tmp_path / "m.wav", x, subtype="FLOAT"), seed=2, **FAST)
    ref = separator.separate_batch(torch.from_numpy(x)[None], seed=2, **FAST)
    assert torch.allclose(est, ref / ref.abs().amax(dim=1, keepdim=True), atol=1e-6)


def test_other_sample_rate_is_resampled(separator, tmp_path):
    x = signal(3200, 9)
    est = separator.separate_file(write(tmp_path / "m16.wav", x, 16000, subtype="FLOAT"), seed=2, **FAST)
    assert est.shape == (1, 1600, 2)
    down = AF.resample(torch.from_numpy(x)[None], 16000, SR)
    ref = separator.separate_batch(down, seed=2, **FAST)
    assert torch.allclose(est, ref / ref.abs().amax(dim=1, keepdim=True), atol=1e-5)


def test_stereo_is_downmixed_with_a_warning(separator, tmp_path):
    x = signal(1600, 10, channels=2)
    with pytest.warns(UserWarning, match="2 channels averaged to mono"):
        est = separator.separate_file(write(tmp_path / "st.wav", x, subtype="FLOAT"), seed=2, **FAST)
    mono = separator.separate_file(write(tmp_path / "mono.wav", x.mean(1), subtype="FLOAT"), seed=2, **FAST)
    assert torch.allclose(est, mono, atol=1e-6)


def test_silent_file_gives_zeros_with_a_warning(separator, tmp_path):
    with pytest.warns(UserWarning, match="silent"):
        est = separator.separate_file(write(tmp_path / "z.wav", np.zeros(1600)), **FAST)
    assert est.shape == (1, 1600, 2) and torch.equal(est, torch.zeros_like(est))


def _truncated(path):
    write(path, signal(1600))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: write(p, np.zeros(0)), "the audio is empty"),
        (lambda p: write(p, np.array([0.1, np.nan, 0.2, np.inf] * 100, dtype=np.float32), subtype="FLOAT"), "200 NaN or inf samples"),
        (lambda p: (open(p, "w").write("these are not the samples you are looking for"), str(p))[1], "not a readable audio file"),
        (lambda p: (open(p, "wb").close(), str(p))[1], "not a readable audio file"),
        (_truncated, "truncated WAV file"),
        (lambda p: str(p) + ".missing", "no such file"),
        (lambda p: str(p.parent), "is a directory"),
    ],
    ids=["empty", "nan-inf", "text", "zero-bytes", "truncated", "missing", "directory"],
)
def test_bad_files_give_one_line_errors_naming_the_file(separator, tmp_path, make, match):
    path = make(tmp_path / "bad.wav")
    with pytest.raises(ValueError, match=match) as err:
        separator.separate_file(path, **FAST)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))


def test_read_audio_returns_mono_at_the_requested_rate(tmp_path):
    data, rate = read_audio(write(tmp_path / "a.wav", signal(800), 8000, subtype="FLOAT"), 16000)
    assert data.shape == (1, 1600) and rate == 8000 and data.dtype == torch.float32


# ------------------------------------------------------------------ model folders
def _copy_yaml(src, dst, edit=None):
    """A model folder with ``src``'s yaml (optionally one text replacement) and no checkpoint, or
    with a link to ``src``'s checkpoint when ``edit`` is given."""
    dst.mkdir()
    text = (src / "hyperparams.yaml").read_text()
    if edit:
        assert edit[0] in text
        text = text.replace(*edit)
        (dst / "score_model.ckpt").symlink_to(src / "score_model.ckpt")
    (dst / "hyperparams.yaml").write_text(text)
    return dst


def _bad_folder(kind, sep_folder, tmp_path):
    from speechbrain_diffsep.ncsnpp import ScoreModel

    if kind == "missing":
        return tmp_path / "no_such_model", "does not exist"
    folder = _copy_yaml(sep_folder, tmp_path / kind)
    ckpt = folder / "score_model.ckpt"
    if kind == "no-ckpt":
        return folder, "lacks score_model.ckpt"
    if kind == "corrupt":
        ckpt.write_bytes(b"\x00garbage" * 100)
        return folder, "not a readable PyTorch checkpoint"
    if kind == "truncated-ckpt":
        data = (sep_folder / "score_model.ckpt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
        return folder, "not a readable PyTorch checkpoint"
    if kind == "other-nf":
        torch.save(ScoreModel(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()).state_dict(), ckpt)
        return folder, "does not match the score_model"
    if kind == "missing-key":
        state = torch.load(sep_folder / "score_model.ckpt", weights_only=True)
        state.pop(next(iter(state)))
        torch.save(state, ckpt)
        return folder, "1 missing keys"
    if kind == "non-strict-yaml":  # SpeechBrain's default hook would only log the missing key
        text = (folder / "hyperparams.yaml").read_text()
        hook = "  custom_hooks:\n    score_model: !name:speechbrain_diffsep.inference.load_checkpoint_strict\n"
        assert hook in text
        (folder / "hyperparams.yaml").write_text(text.replace(hook, ""))
        state = torch.load(sep_folder / "score_model.ckpt", weights_only=True)
        state.pop(next(iter(state)))
        torch.save(state, ckpt)
        return folder, "score_model.ckpt does not match the score_model: 1 missing keys"
    if kind == "bad-yaml":
        (folder / "hyperparams.yaml").write_text("score_model: !new:speechbrain_diffsep.ncsnpp.NoSuchModel\n")
        ckpt.write_bytes((sep_folder / "score_model.ckpt").read_bytes())
        return folder, "could not load the model"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing", "no-ckpt", "corrupt", "truncated-ckpt", "other-nf", "missing-key", "non-strict-yaml", "bad-yaml"]
)
def test_bad_model_folders_give_one_line_errors(sep_folder, tmp_path, kind):
    folder, match = _bad_folder(kind, sep_folder, tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        DiffSepSeparation.from_hparams(source=str(folder), savedir=str(tmp_path / "save"))
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="nobody/no-such-diffsep-model") as err:
        DiffSepSeparation.from_hparams(source="nobody/no-such-diffsep-model")
    assert "\n" not in str(err.value)


def test_number_of_sources_must_match(sep_folder, tmp_path):
    with pytest.raises(ValueError, match="the model separates K=2 sources but num_spks=3 was asked"):
        DiffSepSeparation.from_hparams(source=str(sep_folder), num_spks=3)
    run, _, _ = make_recipe_run(tmp_path / "run", num_spks=3, si_sdrs=(1.0,), incomplete_best=False)
    export.export_from_recipe(run, tmp_path / "k3")
    with pytest.raises(ValueError, match="DiffSepEnhancement needs a model with K=2 targets, this one has K=3"):
        DiffSepEnhancement.from_hparams(source=str(tmp_path / "k3"))
    k3 = DiffSepSeparation.from_hparams(source=str(tmp_path / "k3"), num_spks=3)
    assert k3.separate_batch(torch.from_numpy(signal(1000))[None], **FAST).shape == (1, 1000, 3)
    # a yaml whose pieces disagree
    folder = _copy_yaml(tmp_path / "k3", tmp_path / "inconsistent")
    (folder / "score_model.ckpt").write_bytes((tmp_path / "k3" / "score_model.ckpt").read_bytes())
    text = (folder / "hyperparams.yaml").read_text().replace("num_sources: !ref <num_spks>\n  gamma", "num_sources: 2\n  gamma")
    (folder / "hyperparams.yaml").write_text(text)
    with pytest.raises(ValueError, match="inconsistent model: num_spks=3, sde.num_sources=2"):
        DiffSepSeparation.from_hparams(source=str(folder))


# ------------------------------------------------------------------ enhancement
def test_enhance_batch_returns_the_clean_target(enhancer):
    noisy = torch.from_numpy(np.stack([signal(3000, 1), signal(3000, 2)]))
    out = enhancer.enhance_batch(noisy, seed=0, **FAST)
    assert out.shape == (2, 3000) and out.dtype == torch.float32
    both = enhancer._separate(noisy[:, None].float(), seed=0, **FAST)
    assert torch.equal(out, both[:, 0])  # clean_index 0 of [clean, noise]


def test_enhance_batch_with_lengths_ignores_the_padding(enhancer):
    short = torch.from_numpy(signal(2000, 3))
    padded = torch.zeros(1, 4000)
    padded[0, :2000] = short
    out = enhancer.enhance_batch(padded, lengths=torch.tensor([0.5]), seed=1, **FAST)
    alone = enhancer.enhance_batch(short[None], seed=1, **FAST)
    assert torch.allclose(out[:, :2000], alone, atol=1e-6) and torch.equal(out[:, 2000:], torch.zeros(1, 2000))
    with pytest.raises(ValueError, match="lengths must hold 1 relative lengths"):
        enhancer.enhance_batch(padded, lengths=torch.tensor([1.5]))


def test_enhance_file_writes_the_model_rate(enhancer, tmp_path):
    path = write(tmp_path / "noisy.wav", signal(1600, 4), 8000, subtype="FLOAT")  # resampled to 16 kHz
    out = enhancer.enhance_file(path, output_filename=str(tmp_path / "enh.wav"), seed=0, **FAST)
    assert out.shape == (3200,)
    data, rate = soundfile.read(str(tmp_path / "enh.wav"), dtype="float32")
    assert rate == 16000 and data.shape == (3200,)
    assert np.allclose(data, out.numpy(), atol=1e-4)  # 16-bit PCM
