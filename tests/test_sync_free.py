"""The per-step path of sampling makes no host sync and the score networks trace without graph breaks.

A host sync is a Python-level read of a tensor's value (``bool(t)``, ``if (t < 0).any()``, ``float(t)``,
``t.item()``, ``t.tolist()``, ``int(t)``, ``t.__index__()``, ``t.nonzero()``): on a GPU each one stalls the
CPU until the queue drains, and under ``torch.compile`` each is a graph break (CUDA graphs become
impossible). Inputs are checked once at the API boundary (a constant number of syncs per separation);
the count must not grow with the number of network calls (issue 13, item 3).
"""

from pathlib import Path

import pytest
import torch

from speechbrain_diffsep.flow import FLOW_SAMPLERS, FlowModel, SeparationFlow
from speechbrain_diffsep.ncsnpp import ScoreModel
from speechbrain_diffsep.pipeline import separate_mixture
from speechbrain_diffsep.precond import PreconditionedScoreModel
from speechbrain_diffsep.sampling import SDE_SAMPLERS
from speechbrain_diffsep.sde import MixingSDE, PriorMixingSDE
from speechbrain_diffsep.tcn import ConditionedTasNet

ROOT = Path(__file__).resolve().parent.parent
SMALL_MODEL = ROOT / "pretrained" / "diffsep-small-minimix"
SYNC_METHODS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero")


class HostSyncCounter:
    """Counts the Python-level calls that read a tensor's value back to the host, while active."""

    def __enter__(self):
        self.count = 0
        self._saved = {}
        for name in SYNC_METHODS:
            own = torch.Tensor.__dict__.get(name)
            orig = getattr(torch.Tensor, name)
            self._saved[name] = own

            def counted(*args, _orig=orig, **kwargs):
                self.count += 1
                return _orig(*args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, own in self._saved.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        return False


def test_counter_sees_every_kind_of_read_back():
    t = torch.tensor([0.5, 2.0])
    with HostSyncCounter() as c:
        if (t > 1).any():
            pass
        float(t[0]), t[0].item(), t.tolist(), int(t[1]), [0, 1, 2][torch.tensor(1)], t.nonzero()
    assert c.count == 7
    assert torch.Tensor.__bool__ is torch._C.TensorBase.__bool__  # restored
    assert bool(torch.tensor(True)) and float(torch.tensor(0.5)) == 0.5


def _counting(fn, calls):
    def score_fn(x, t, y):
        calls.append(1)
        return fn(x, t, y)

    return score_fn


def _syncs_and_calls(model, sde, mix, sampler, num_steps, **opts):
    calls = []
    with torch.no_grad(), HostSyncCounter() as c:
        est, nfe = separate_mixture(
            _counting(model, calls), sde, mix, sampler=sampler, num_steps=num_steps,
            generator=torch.Generator().manual_seed(0), **opts,
        )
    assert torch.isfinite(est).all() and nfe == len(calls)
    return c.count, len(calls)


def _assert_no_sync_per_call(model, sde, mix, sampler, n=2, **opts):
    syncs_n, calls_n = _syncs_and_calls(model, sde, mix, sampler, n, **opts)
    syncs_2n, calls_2n = _syncs_and_calls(model, sde, mix, sampler, 2 * n, **opts)
    assert calls_2n > calls_n
    # a constant at the API boundary (input checks, the time grid) is fine; per network call: none
    assert syncs_2n - syncs_n == 0, (sampler, opts, (syncs_n, calls_n), (syncs_2n, calls_2n))
    assert syncs_n <= 5, (sampler, opts, syncs_n)


def _tiny_tasnet(sde=None):
    return ConditionedTasNet(num_sources=2, L=16, N=16, B=8, H=16, P=3, X=2, R=1, emb_dim=8, sde=sde)


@pytest.fixture(scope="module")
def tiny_precond():
    torch.manual_seed(0)
    sde = MixingSDE(num_sources=2)
    return PreconditionedScoreModel(_tiny_tasnet(sde), sde, sigma_data=0.5).eval()


@pytest.fixture(scope="module")
def tiny_flow_model():
    torch.manual_seed(0)
    return FlowModel(_tiny_tasnet(), SeparationFlow(num_sources=2)).eval()


MIX = torch.randn(1, 1, 800, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("restart_t", [None, 0.5])
@pytest.mark.parametrize("sampler", sorted(SDE_SAMPLERS))
@pytest.mark.parametrize("sde", [MixingSDE(), PriorMixingSDE()], ids=["mixing", "prior_mixing"])
def test_sde_samplers_make_no_sync_per_network_call(tiny_precond, sde, sampler, restart_t):
    opts = {} if restart_t is None else {"restart_t": restart_t}
    _assert_no_sync_per_call(tiny_precond, sde, MIX, sampler, **opts)


def test_default_sampler_and_refiner_mode_make_no_sync_per_network_call(tiny_precond):
    sde = MixingSDE()
    _assert_no_sync_per_call(tiny_precond, sde, MIX, "pc")  # separate_mixture's default sampler
    init = torch.randn(1, 2, 800, generator=torch.Generator().manual_seed(2))
    _assert_no_sync_per_call(tiny_precond, sde, MIX, "ddim", init=init, t_start=0.5)
    _assert_no_sync_per_call(tiny_precond, sde, MIX, "pc", dt="reference", denoise_final=True)


def test_ncsnpp_score_model_samples_without_sync_per_network_call():
    torch.manual_seed(0)
    model = ScoreModel(nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=()).eval()
    _assert_no_sync_per_call(model, MixingSDE(), MIX, "pc", n=1)


@pytest.mark.parametrize("restart_t", [None, 0.5])
@pytest.mark.parametrize("sampler", sorted(FLOW_SAMPLERS))
def test_flow_samplers_make_no_sync_per_network_call(tiny_flow_model, sampler, restart_t):
    opts = {} if restart_t is None else {"restart_t": restart_t}
    _assert_no_sync_per_call(tiny_flow_model, SeparationFlow(), MIX, sampler, **opts)


@pytest.fixture(scope="module")
def bundled_small():
    from speechbrain_diffsep.inference import DiffSepSeparation

    return DiffSepSeparation.from_hparams(source=str(SMALL_MODEL), savedir=str(SMALL_MODEL))


@pytest.mark.parametrize("sampler, opts", [(None, {}), ("pc", {}), ("ode", {}), ("edm", {"restart_t": 0.5})])
def test_bundled_small_model_makes_no_sync_per_network_call(bundled_small, sampler, opts):
    """The package's own path: DiffSepSeparation.separate_batch with the model as from_hparams loads it."""
    mix = MIX[:, 0]
    counts = []
    for steps in (2, 4):
        with HostSyncCounter() as c:
            est = bundled_small.separate_batch(mix, sampler=sampler, num_steps=steps, seed=0, **opts)
        assert est.shape == (1, 800, 2) and torch.isfinite(est).all()
        counts.append((c.count, bundled_small.last_nfe))
    (syncs_n, nfe_n), (syncs_2n, nfe_2n) = counts
    assert nfe_2n > nfe_n
    assert syncs_2n - syncs_n == 0, counts


def test_one_network_call_makes_no_sync(bundled_small, tiny_precond, tiny_flow_model):
    torch.manual_seed(0)
    ncsnpp = ScoreModel(nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=()).eval()
    x, t, y = torch.randn(2, 2, 800), torch.tensor([0.3, 1.0]), torch.randn(2, 1, 800)
    for model in (bundled_small.mods.score_model, tiny_precond, tiny_flow_model, ncsnpp):
        for grad in (False, True):
            with torch.set_grad_enabled(grad), HostSyncCounter() as c:
                model(x, t, y)
            assert c.count == 0, (type(model).__name__, grad, c.count)
    with HostSyncCounter() as c:
        tiny_precond(x, t, y, output="denoised"), tiny_flow_model(x, t, y, output="denoised")
    assert c.count == 0


# ----------------------------------------------------------------------------------------------
# torch.compile: one network call is one graph
# ----------------------------------------------------------------------------------------------
def _explain(model, *args, **kwargs):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(*args, **kwargs)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("output, grad", [("score", False), ("denoised", True)], ids=["sampling", "training"])
def test_preconditioned_tasnet_traces_without_graph_breaks(output, grad):
    """The network of the bundled diffsep-small model (diffsep_small.yaml), at tiny sizes."""
    torch.manual_seed(0)
    sde = MixingSDE(num_sources=2, gamma=2.0, sigma_min=0.05, sigma_max=0.5, t_eps=0.03)
    model = PreconditionedScoreModel(_tiny_tasnet(sde), sde, sigma_data=0.5).train(grad)
    x, t, y = torch.randn(2, 2, 400), torch.tensor([0.3, 1.0]), torch.randn(2, 1, 400)
    with torch.set_grad_enabled(grad):
        ex = _explain(model, x, t, y, output=output)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_ncsnpp_score_model_traces_without_graph_breaks():
    """The paper's network (STFT front end, U-Net with attention), tiny, as the samplers call it."""
    torch.manual_seed(0)
    model = ScoreModel(nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(128,)).eval()
    x, t, y = torch.randn(1, 2, 800), torch.tensor([0.5]), torch.randn(1, 1, 800)
    with torch.no_grad():
        ex = _explain(model, x, t, y)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_flow_model_traces_without_graph_breaks():
    torch.manual_seed(0)
    model = FlowModel(_tiny_tasnet(), SeparationFlow(num_sources=2)).eval()
    x, t, y = torch.randn(2, 2, 400), torch.tensor([0.3, 1.0]), torch.randn(2, 1, 400)
    with torch.no_grad():
        ex = _explain(model, x, t, y)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
