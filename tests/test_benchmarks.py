"""The benchmark scripts' helpers (benchmarks/ is not a package): NFE bookkeeping of sampler_quality.py
against the samplers themselves, its table round trip and its degradation summary; gpu_check.py's
quick CPU mode end to end (so that the GPU check never rots)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from speechbrain_diffsep.flow import SeparationFlow
from speechbrain_diffsep.sampling import SAMPLERS, SDE_SAMPLERS
from speechbrain_diffsep.sde import MixingSDE

from helpers import ROOT, load_script

sq = load_script("benchmarks/sampler_quality.py")


@pytest.mark.parametrize(
    "name, restart", [(n, r) for n in sorted(SAMPLERS) for r in (False, True)]
)
def test_nfe_formula_is_what_the_samplers_report(name, restart):
    sde = MixingSDE() if name in SDE_SAMPLERS else SeparationFlow()
    y = torch.randn(1, 1, 32)
    opts = {"restart_t": 0.5} if restart else {}
    for steps in (1, 2, 5):
        _, nfe = SAMPLERS[name](lambda x, t, y: -0.1 * x, sde, y, num_steps=steps, generator=torch.Generator(), **opts)
        assert nfe == sq.nfe_of(name, steps, restart), (name, steps)
    assert sq.nfe_of(name, sq.steps_for(name, 60, restart), restart) in (59, 60, 61)


def test_summary_flags_a_sampler_that_gets_worse_with_more_calls_and_tables_round_trip(tmp_path):
    rows = [dict(sampler="a", steps=s, nfe=float(n), si_sdri=v) for s, n, v in ((1, 1, 10.0), (2, 5, 10.4), (3, 60, 10.0))]
    rows += [dict(sampler="b", steps=s, nfe=float(n), si_sdri=v) for s, n, v in ((1, 1, 10.0), (2, 5, 9.0), (3, 60, 2.0))]
    summ = {r["sampler"]: r for r in sq.summary(rows)}
    assert summ["a"]["never_degrades"] and summ["a"]["max_drop_with_more_nfe"] == pytest.approx(0.4)
    assert not summ["b"]["never_degrades"] and summ["b"]["max_drop_with_more_nfe"] == pytest.approx(8.0)
    sq.write_outputs(rows, str(tmp_path / "m"), "test")
    back = sq.read_table(tmp_path / "m" / "sampler_quality.md")
    assert [(r["sampler"], r["nfe"], r["si_sdri"]) for r in back] == [(r["sampler"], r["nfe"], r["si_sdri"]) for r in rows]
    merged = sq.merge([f"x={tmp_path / 'm'}", f"y={tmp_path / 'm'}"], str(tmp_path / "both"))
    assert len(merged) == 12 and (tmp_path / "both" / "sampler_quality.png").is_file()


# --------------------------------------------------------------------------- gpu_check.py
@pytest.mark.skipif(shutil.which("flite") is None or shutil.which("espeak-ng") is None,
                    reason="the quick check generates a MiniMix: needs flite and espeak-ng (.ci/setup.sh installs them)")
def test_gpu_check_quick_mode_runs_every_section_on_cpu(tmp_path):
    """``gpu_check.py --device cpu --quick`` (what a GPU run does, at tiny sizes) ends with no error,
    both recipes exit 0 under torchrun without aborting, and the report has every section."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
         "--out", str(out), "--recipe-timeout", "150"],
        capture_output=True, text=True, timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["errors"] == []
    assert [r["yaml"] for r in report["recipes"]] == ["diffsep.yaml", "diffsep_tcn.yaml"]
    for r in report["recipes"]:
        assert r["returncode"] == 0 and not r["aborted_at_exit"]
        assert r["timed_steps"] == r["steps"] - 1 >= 3 and r["examples_per_s"] > 0
        assert r["test"].startswith("Epoch loaded")
    modes = report["calls"]["modes"]
    assert set(modes) == {"fp32", "tf32", "bf16", "compiled bf16 (dynamo, eager backend)"}
    assert all(m["finite"] and m["ms_per_call"] > 0 for m in modes.values())
    assert modes["fp32"]["rel_diff_vs_fp32"] == 0 and 0 < modes["bf16"]["rel_diff_vs_fp32"] < 0.1
    bundled = sorted(p.parent.name for p in (ROOT / "pretrained").glob("*/hyperparams.yaml"))
    assert [r["model"] for r in report["separate"]] == bundled
    assert all(r["finite"] and r["nfe"] >= 1 for r in report["separate"])
    assert [r["model"] for r in report["bf16"]] == bundled
    assert all(r["finite"] and r["within_0.3_db"] for r in report["bf16"])
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Recipes under torchrun", "## One network call", "## End to end", "## bf16 sampling"):
        assert heading in md
    assert str(tmp_path) not in md and not (out / "work").exists()  # no machine paths; scratch removed


# --------------------------------------------------------------------------- mutation_score.py
def test_mutation_score_counts_timeouts_as_killed_and_leaves_untested_mutants_out():
    ms = load_script("benchmarks/mutation_score.py")
    status = {"speechbrain_diffsep.sde.xǁMixingSDEǁmean__mutmut_1": "killed",
              "speechbrain_diffsep.sde.xǁMixingSDEǁmean__mutmut_2": "survived",
              "speechbrain_diffsep.sde.x_helper__mutmut_1": "timeout",
              "speechbrain_diffsep.sde.x_helper__mutmut_2": "no tests",
              "speechbrain_diffsep.normalize.x_denormalize__mutmut_1": "killed"}
    rows = {r["module"]: r for r in ms.summarize(status, ["sde", "normalize"])}
    assert ms.module_of("speechbrain_diffsep.sde.x_helper__mutmut_1") == "sde"
    assert (rows["sde"]["mutants"], rows["sde"]["killed"], rows["sde"]["timeout"], rows["sde"]["survived"],
            rows["sde"]["no_tests"]) == (4, 1, 1, 1, 1)
    assert rows["sde"]["score"] == pytest.approx(100 * 2 / 3, abs=0.1)  # (killed + timeout) / tested
    assert rows["normalize"]["score"] == 100.0 and rows["all"]["mutants"] == 5
    assert rows["all"]["score"] == pytest.approx(75.0)


# --------------------------------------------------------------------------- ncsnpp_call_speed.py
def test_ncsnpp_call_speed_quick_mode_times_every_eager_mode_and_writes_its_table(tmp_path, monkeypatch, tf32):
    """The call-latency benchmark on CPU at a tiny size: channels_last and batching change the time,
    not the numbers (the same output as NCHW batch 1), and the markdown table has one row per mode."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    speed = load_script("benchmarks/ncsnpp_call_speed.py")
    modes = ["bf16", "bf16 channels_last", "bf16 batch"]
    rep = speed.main(["--device", "cpu", "--quick", "--modes", *modes, "--batch", "3", "--repeats", "1",
                      "--out", str(tmp_path)])
    assert list(rep["modes"]) == modes and rep["gflop_per_call"] > 0
    for mode, e in rep["modes"].items():
        assert "error" not in e and e["finite"] and e["ms_per_call"] > 0, (mode, e)
        assert e["rel_diff_vs_first_mode"] < 1e-2, (mode, e)
    assert rep["modes"]["bf16 batch"]["batch"] == 3
    assert rep["modes"]["bf16 batch"]["ms_per_mixture"] == pytest.approx(rep["modes"]["bf16 batch"]["ms_per_call"] / 3, abs=1e-3)
    table = (tmp_path / "ncsnpp_call_speed.md").read_text()
    assert sum(line.startswith(("| bf16", "| compiled")) for line in table.splitlines()) == len(modes)
    assert json.loads((tmp_path / "ncsnpp_call_speed.json").read_text())["modes"] == rep["modes"]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32  # restored


@pytest.fixture
def tf32():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# --------------------------------------------------------------------------- restart_cycles.py
@pytest.mark.parametrize("cycles, steps", [(1, 1), (4, 1), (3, 2)])
def test_restart_cycles_calls_and_settings(cycles, steps):
    """The experiment's sampler spends 1 + cycles x steps calls, each cycle renoising around the last
    estimate at t_cycle (the times the network sees), and its setting strings parse as documented."""
    rc = load_script("benchmarks/restart_cycles.py")
    sde, times = MixingSDE(), []

    def score(x, t, y):
        times.append(float(t[0]))
        return -0.1 * x

    y = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    est, nfe = rc.restart_cycles(score, sde, y, num_steps=steps, generator=torch.Generator().manual_seed(1),
                                 restart_t=0.5, cycles=cycles, t_cycle=0.2)
    assert nfe == 1 + cycles * steps == len(times) and est.shape == (1, 2, 64) and torch.isfinite(est).all()
    assert times[0] == pytest.approx(sde.T) and times[1] == pytest.approx(0.5)
    assert [t for t in times[1 + steps:]][::steps] == pytest.approx([0.2] * (cycles - 1))
    st = rc.parse_setting(f"{cycles}@0.5,0.2,{steps}")
    assert st["num_steps"] == steps and st["options"] == {"restart_t": 0.5, "cycles": cycles, "t_cycle": 0.2}
