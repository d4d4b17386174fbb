"""diffsep-separate / diffsep-enhance end to end on small folders, and their one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from conftest import DATA
from speechbrain_diffsep import cli, export
from speechbrain_diffsep.inference import DiffSepEnhancement, DiffSepSeparation
from test_export import make_recipe_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "sep"
    assert export.main(["--out", str(out), "--from-reference", str(DATA / "diffsep_reference_nf16.ckpt")]) == 0
    return out


@pytest.fixture(scope="module")
def enh_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enh")
    run, _, _ = make_recipe_run(root / "run", sample_rate=16000, sde="PriorMixingSDE", si_sdrs=(1.0,), incomplete_best=False)
    export.export_from_recipe(run, root / "model")
    return root / "model"


def noise(n, seed, channels=None):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(n if channels is None else (n, channels), generator=g)).numpy()


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    soundfile.write(folder / "a.wav", noise(1600, 1), 8000, subtype="FLOAT")
    soundfile.write(folder / "b.flac", noise(2400, 2), 16000)  # resampled to 8 kHz
    (folder / "notes.txt").write_text("not audio, not an audio extension: skipped")
    return folder


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_separate_a_folder_of_two_files(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.separate_main([str(inputs), "--model", str(model_dir), "--out", str(out), "--steps", "2", "--seed", "3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_s1.wav", "a_s2.wav", "b_s1.wav", "b_s2.wav"]
    model = DiffSepSeparation.from_hparams(source=str(model_dir))
    for name, n in (("a.wav", 1600), ("b.flac", 1200)):
        ref = model.separate_file(str(inputs / name), num_steps=2, seed=3)[0]
        for k in range(2):
            data, rate = soundfile.read(out / f"{Path(name).stem}_s{k + 1}.wav", dtype="float32")
            assert rate == 8000 and data.shape == (n,)
            assert np.abs(data - ref[:, k].numpy()).max() < 1e-4  # PCM_16 of the peak-normalized estimate
    assert capsys.readouterr().err == ""


def _record_loaded_models(monkeypatch):
    """Wrap ``from_hparams`` of both interfaces; returns the list of ``(kwargs, model)`` it loads."""
    loaded = []
    for cls in (DiffSepSeparation, DiffSepEnhancement):
        real = cls.from_hparams.__func__

        def spy(klass, *args, _real=real, **kwargs):
            model = _real(klass, *args, **kwargs)
            loaded.append((kwargs, model))
            return model

        monkeypatch.setattr(cls, "from_hparams", classmethod(spy))
    return loaded


def test_compile_option_gives_the_eager_output(tmp_path, monkeypatch):
    """--compile (SpeechBrain's run option: torch.compile of the network) changes speed, not output;
    and it does compile: the network is a dynamo ``OptimizedModule`` and dynamo captured graphs of its
    calls (none without the option)."""
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    folder = tmp_path / "in"
    folder.mkdir()
    soundfile.write(folder / "a.wav", noise(800, 4), 8000, subtype="FLOAT")
    model = ROOT / "pretrained" / "diffsep-small-minimix"  # the small Conv-TasNet network compiles fast
    loaded = _record_loaded_models(monkeypatch)
    outs, captured = {}, {}
    for flag in ([], ["--compile"]):
        torch._dynamo.reset()  # no code cached by an earlier test: this run must trace to compile
        counters.clear()
        out = tmp_path / ("compiled" if flag else "eager")
        args = [str(folder / "a.wav"), "--model", str(model), "--out", str(out), "--seed", "1", "--quiet"] + flag
        assert cli.separate_main(args) == 0
        outs[bool(flag)] = soundfile.read(out / "a_s1.wav", dtype="float32")[0]
        captured[bool(flag)] = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"])
        kwargs, sep = loaded[-1]
        assert kwargs["run_opts"]["compile"] is bool(flag)
        assert isinstance(sep.mods.score_model, OptimizedModule) is bool(flag)
    torch._dynamo.reset()
    assert captured[False] == (0, 0)
    assert captured[True][0] >= 1 and captured[True][1] > 0, captured
    assert np.abs(outs[True] - outs[False]).max() < 1e-3 and np.abs(outs[False]).max() > 0.5


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_mode_option_reaches_speechbrain_compile(model_dir, tmp_path, monkeypatch, capsys, mode):
    """--compile-mode implies --compile and becomes SpeechBrain's compile_mode run option: the network is
    wrapped by torch.compile in that mode (nothing compiles here: the only input is unreadable, one line)."""
    from torch._dynamo.eval_frame import OptimizedModule

    loaded = _record_loaded_models(monkeypatch)
    rc = cli.separate_main([str(tmp_path / "missing.wav"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                            "--compile-mode", mode, "--quiet"])
    ((kwargs, sep),) = loaded
    assert kwargs["run_opts"] == {"device": "cpu", "compile": True, "compile_mode": mode}
    assert sep.compile_mode == mode and isinstance(sep.mods.score_model, OptimizedModule)
    assert rc != 0 and len(lines(capsys.readouterr().err)) == 1


def test_compile_mode_rejects_unknown_modes(capsys):
    assert cli.separate_main(["a.wav", "--model", "m", "--compile-mode", "fastest"]) == 2
    (err,) = lines(capsys.readouterr().err)
    assert "--compile-mode: invalid choice: 'fastest'" in err


@pytest.mark.parametrize("task", ["separate", "enhance"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_device_option_reaches_the_model(model_dir, enh_dir, inputs, tmp_path, monkeypatch, capsys, task, device):
    """--device is the Pretrained run option: the model's parameters end on that device ('meta': every
    parameter is a meta tensor, the file then fails with one line)."""
    loaded = _record_loaded_models(monkeypatch)
    main = cli.separate_main if task == "separate" else cli.enhance_main
    folder = model_dir if task == "separate" else enh_dir
    rc = main([str(inputs / "a.wav"), "--model", str(folder), "--out", str(tmp_path / "out"), "--steps", "1",
               "--device", device, "--quiet"])
    ((kwargs, model),) = loaded
    assert kwargs["run_opts"]["device"] == device and model.device == device
    assert {p.device.type for p in model.mods.score_model.parameters()} == {device}
    err = lines(capsys.readouterr().err)
    if device == "cpu":
        assert rc == 0 and err == []
    else:
        assert rc == 1 and len(err) == 1 and "a.wav" in err[0] and "meta" in err[0]


def test_files_and_chunking_options(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    args = [str(inputs / "a.wav"), str(inputs / "b.flac"), "--model", str(model_dir), "--out", str(out),
            "--steps", "1", "--sampler", "em", "--chunk-seconds", "0.1", "--overlap-seconds", "0.02", "--quiet"]
    assert cli.separate_main(args) == 0
    data, rate = soundfile.read(out / "a_s2.wav")
    assert data.shape == (1600,) and np.isfinite(data).all() and np.abs(data).max() == pytest.approx(1.0, abs=1e-4)


def test_enhance_a_file(enh_dir, inputs, tmp_path):
    out = tmp_path / "out"
    assert cli.enhance_main([str(inputs / "a.wav"), "--model", str(enh_dir), "--out", str(out), "--steps", "2",
                             "--seed", "0", "--subtype", "FLOAT", "--quiet"]) == 0
    data, rate = soundfile.read(out / "a_enhanced.wav", dtype="float32")
    ref = DiffSepEnhancement.from_hparams(source=str(enh_dir)).enhance_file(str(inputs / "a.wav"), num_steps=2, seed=0)
    assert rate == 16000 and np.allclose(data, ref.numpy(), atol=1e-6)


def test_bad_inputs_are_skipped_with_one_line_each(model_dir, inputs, tmp_path, capsys):
    (inputs / "broken.wav").write_text("RIFF but not really")
    soundfile.write(inputs / "stereo.wav", noise(800, 4, channels=2), 8000)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    soundfile.write(other / "a.wav", noise(800, 5), 8000)  # same name as in/a.wav
    out = tmp_path / "out"
    rc = cli.separate_main([str(inputs), str(tmp_path / "missing.wav"), str(empty), str(other / "a.wav"),
                            "--model", str(model_dir), "--out", str(out), "--steps", "1", "--quiet"])
    err = lines(capsys.readouterr().err)
    assert rc == 1
    assert "Traceback" not in "\n".join(err)
    expected = [
        f"{tmp_path / 'missing.wav'}: no such file or folder",
        f"{empty}: folder has no audio files",
        f"{inputs / 'broken.wav'}: not a readable audio file",
        f"{inputs / 'stereo.wav'}: 2 channels averaged to mono",
        f"{other / 'a.wav'}: its outputs would overwrite those of {inputs / 'a.wav'}",
    ]
    for piece in expected:
        assert sum(piece in line for line in err) == 1, (piece, err)
    assert len(err) == len(expected)
    assert {"a_s1.wav", "b_s1.wav", "stereo_s1.wav"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    "args,match,code",
    [
        (["x.wav", "--model", "{tmp}/nomodel"], "model folder {tmp}/nomodel does not exist", 1),
        (["x.wav"], "the following arguments are required: --model", 2),
        (["x.wav", "--model", "{model}", "--steps", "0"], "--steps must be >= 1", 1),
        (["x.wav", "--model", "{model}", "--num-spks", "3"], "the model separates K=2 sources but num_spks=3 was asked", 1),
        (["x.wav", "--model", "{model}", "--device", "gpu7"], "--device gpu7: not a torch device", 1),
        (["x.wav", "--model", "{model}", "--subtype", "MP3X"], "--subtype MP3X: not a WAV subtype", 1),
    ],
)
def test_usage_and_model_errors_are_one_line(model_dir, tmp_path, capsys, args, match, code):
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    assert cli.separate_main(args) == code
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and match.format(tmp=tmp_path) in err[0] and err[0].startswith("diffsep-separate: error: ")


def test_python_dash_m_entry_point_has_no_traceback(model_dir, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"\x00" * 10)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "speechbrain_diffsep.cli", "separate", str(tmp_path / "bad.wav"), "--model", str(model_dir),
         "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 1
    assert lines(proc.stderr) == [
        f"python -m speechbrain_diffsep.cli separate: error: {tmp_path / 'bad.wav'}: not a readable audio file "
        f"(Error opening '{tmp_path / 'bad.wav'}': Format not recognised.)"
    ]
    assert cli.main(["frobnicate"]) == 2


def test_restart_option_reaches_the_sampler(model_dir, inputs, tmp_path, capsys):
    """--restart-t is the sampler's restart_t: the files equal separate_file(..., restart_t=...), which
    differ from the plain run; a value outside (t_eps, T) is a one-line error for that file."""
    base = ["--model", str(model_dir), "--steps", "2", "--seed", "3", "--sampler", "ode", "--quiet"]
    wav = str(inputs / "a.wav")
    assert cli.separate_main([wav, "--out", str(tmp_path / "r"), "--restart-t", "0.5", *base]) == 0
    model = DiffSepSeparation.from_hparams(source=str(model_dir))
    ref = model.separate_file(wav, sampler="ode", num_steps=2, seed=3, restart_t=0.5)[0]
    plain = model.separate_file(wav, sampler="ode", num_steps=2, seed=3)[0]
    data = soundfile.read(tmp_path / "r" / "a_s1.wav", dtype="float32")[0]
    assert np.abs(data - ref[:, 0].numpy()).max() < 1e-4
    assert np.abs(data - plain[:, 0].numpy()).max() > 1e-3
    capsys.readouterr()
    assert cli.separate_main([wav, "--out", str(tmp_path / "bad"), "--restart-t", "1.0", *base]) == 1
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "restart_t must lie in (t_eps=0.03, T=1.0)" in err[0] and "a.wav" in err[0]
