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
