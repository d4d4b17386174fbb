"""The main job: the bundled models separate a bundled example better than the mixture.

``diffsep-minimix`` (the demo's default) is Conv-TasNet + DiffSep refiner; ``diffsep-small-minimix`` is
DiffSep alone, from the prior, 9 network calls (``diffsep_small.yaml``).
"""
import json
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "pretrained" / "diffsep-minimix"
MODELS = [MODEL, ROOT / "pretrained" / "diffsep-small-minimix"]


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_bundled_model_folder_is_complete_and_small(model):
    assert (model / "hyperparams.yaml").is_file() and (model / "README.md").is_file()
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{model} is {size / 2**20:.1f} MB (limit 25 MB)"


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_demo_writes_files_and_beats_the_mixture(tmp_path, model):
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    args = ["--example", "minimix_ex1", "--out", str(tmp_path)] + ([] if model == MODEL else ["--model", str(model)])
    assert demo.main(args) == 0
    for suffix in ("_s1.wav", "_s2.wav", "_spectrograms.png", "_metrics.json"):
        assert (tmp_path / f"minimix_ex1{suffix}").stat().st_size > 0
    wav, fs = sf.read(str(tmp_path / "minimix_ex1_s1.wav"))
    ref, _ = sf.read(str(ROOT / "examples" / "minimix_ex1_s1.wav"))
    assert fs == 8000 and len(wav) == len(ref)
    result = json.loads((tmp_path / "minimix_ex1_metrics.json").read_text())
    margin = json.loads((model / "results.json").read_text())["ci_min_si_sdri_db"]
    assert result["estimates"]["si_sdri"] >= margin, (result["estimates"], margin)


def test_the_bundled_from_prior_model_gives_the_paper_pc_sampler_its_presets():
    """``diffsep-small-minimix`` gives ``pc`` chosen by name its ``sampler_presets`` (restart at 0.2,
    corrector snr 0.25; 10.38 dB on 40 MiniMix test mixtures against 7.4 dB bare, measured by
    ``benchmarks/sampler_quality.py``): PC makes 2 calls per step + 1 and equals the explicit call."""
    import torch

    from speechbrain_diffsep.inference import DiffSepSeparation

    folder = ROOT / "pretrained" / "diffsep-small-minimix"
    model = DiffSepSeparation.from_hparams(source=str(folder), savedir=str(folder))
    mix = torch.from_numpy(sf.read(str(ROOT / "examples" / "minimix_ex1_mix.wav"), dtype="float32")[0][:4000])[None]
    preset = model.separate_batch(mix, sampler="pc", num_steps=5, seed=0)
    assert model.last_nfe == 11
    assert torch.equal(preset, model.separate_batch(mix, sampler="pc", num_steps=5, seed=0, restart_t=0.2, snr=0.25))
    assert not torch.equal(preset, model.separate_batch(mix, sampler="pc", num_steps=5, seed=0, snr=0.5))
    model.separate_batch(mix, sampler="pc", num_steps=5, seed=0, restart_t=None)
    assert model.last_nfe == 10
