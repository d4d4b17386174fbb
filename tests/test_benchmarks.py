"""The benchmark scripts' helpers (benchmarks/ is not a package): NFE bookkeeping of sampler_quality.py
against the samplers themselves, its table round trip and its degradation summary."""

import importlib.util
from pathlib import Path

import pytest
import torch

from speechbrain_diffsep.flow import SeparationFlow
from speechbrain_diffsep.sampling import SAMPLERS, SDE_SAMPLERS
from speechbrain_diffsep.sde import MixingSDE

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sampler_quality", ROOT / "benchmarks" / "sampler_quality.py")
sq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sq)


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
