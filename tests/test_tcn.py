"""The noise-conditioned Conv-TasNet denoiser network (speechbrain_diffsep/tcn.py)."""

import json

import pytest
import torch

from speechbrain_diffsep.flow import FLOW_SAMPLERS, FlowModel, SeparationFlow
from speechbrain_diffsep.precond import PreconditionedScoreModel, denoiser_loss
from speechbrain_diffsep.sampling import SAMPLERS
from speechbrain_diffsep.sde import MixingSDE
from speechbrain_diffsep.tcn import ConditionedTasNet, NoiseEmbedding

TINY = dict(L=8, N=16, B=8, H=16, P=3, X=2, R=2, emb_dim=8)


@pytest.mark.parametrize("num_sources", [2, 3])
@pytest.mark.parametrize("n", [5, 8, 100, 1001, 1600])
def test_output_shape_any_length(num_sources, n):
    net = ConditionedTasNet(num_sources=num_sources, **TINY)
    x = torch.randn(2, num_sources, n)
    y = torch.randn(2, 1, n)
    out = net(x, torch.tensor([0.2, 0.9]), y)
    assert out.shape == (2, num_sources, n)
    assert torch.isfinite(out).all()


def test_odd_kernel_is_an_error():
    with pytest.raises(ValueError, match="L must be even"):
        ConditionedTasNet(L=7)


def test_conditioning_starts_as_identity_then_depends_on_noise_level():
    torch.manual_seed(0)
    net = ConditionedTasNet(**TINY).eval()
    x, y = torch.randn(1, 2, 400), torch.randn(1, 1, 400)
    with torch.no_grad():
        a = net(x, torch.tensor([0.1]), y)
        b = net(x, torch.tensor([0.9]), y)
    assert torch.equal(a, b)  # FiLM initialized to scale 1, shift 0
    for lin in net.film:
        torch.nn.init.normal_(lin.weight, std=0.5)
    with torch.no_grad():
        a = net(x, torch.tensor([0.1]), y)
        b = net(x, torch.tensor([0.9]), y)
    assert float((a - b).abs().max()) > 1e-3


def test_c_noise_is_log_sigma_over_4_of_the_preconditioning():
    sde = MixingSDE(num_sources=2, gamma=2.0, sigma_min=0.05, sigma_max=0.5, t_eps=0.03)
    net = ConditionedTasNet(sde=sde, **TINY)
    model = PreconditionedScoreModel(net, sde, sigma_data=0.5)
    t = torch.tensor([0.03, 0.3, 0.7, 1.0], dtype=torch.float64)
    c_in = model.scalings(t)[3].flatten()
    sigma = torch.sqrt(1 / c_in**2 - 0.25)
    assert torch.allclose(net.c_noise(t), sigma.log() / 4, atol=1e-12)
    # sigma grows with t, so does the conditioning
    assert bool((net.c_noise(t).diff() > 0).all())
    # without an SDE the network is conditioned on t itself
    assert torch.equal(ConditionedTasNet(**TINY).c_noise(t), t)


def test_noise_embedding_separates_levels():
    emb = NoiseEmbedding(16)
    e = emb(torch.tensor([-1.0, -1.0, 0.5]))
    assert torch.equal(e[0], e[1]) and not torch.allclose(e[0], e[2])


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = ConditionedTasNet(**TINY)
    for lin in net.film:
        torch.nn.init.normal_(lin.weight, std=0.1)
    out = net(torch.randn(2, 2, 300), torch.tensor([0.3, 0.8]), torch.randn(2, 1, 300))
    out.pow(2).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_learns_a_fixed_batch_through_the_denoiser_loss():
    """Separating at the prior (p_T = 1, x_T carries almost nothing of the order): 60 Adam steps
    on one batch of two synthetic sources cut the permutation-min loss to under a quarter."""
    torch.manual_seed(0)
    sde = MixingSDE(num_sources=2)
    model = PreconditionedScoreModel(ConditionedTasNet(sde=sde, **TINY), sde, sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    tt = torch.arange(800) / 8000
    s = torch.stack([0.5 * torch.sin(2 * torch.pi * 220 * tt), 0.5 * torch.sign(torch.sin(2 * torch.pi * 37 * tt))])
    s = s[None].repeat(4, 1, 1)
    y = s.sum(1, keepdim=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(seed):
        gen = torch.Generator().manual_seed(seed)
        return denoiser_loss(model, sde, s, y, p_T=1.0, generator=gen, pit_above=0.5)[0].mean()

    with torch.no_grad():
        before = sum(float(loss_at(k)) for k in range(4)) / 4
    for step in range(60):
        opt.zero_grad()
        loss = denoiser_loss(model, sde, s, y, p_T=1.0, generator=g, pit_above=0.5)[0].mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(loss_at(k)) for k in range(4)) / 4
    assert after < 0.25 * before, (before, after)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_with_it(name):
    if name in FLOW_SAMPLERS:  # the flow objective's model
        sde = SeparationFlow(num_sources=2)
        model = FlowModel(ConditionedTasNet(sde=None, **TINY), sde, sigma_data=0.5).eval()
    else:
        sde = MixingSDE(num_sources=2)
        model = PreconditionedScoreModel(ConditionedTasNet(sde=sde, **TINY), sde, sigma_data=0.5).eval()
    y = torch.randn(1, 1, 640)
    with torch.no_grad():
        est, nfe = SAMPLERS[name](model, sde, y, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert est.shape == (1, 2, 640) and nfe >= 2 and torch.isfinite(est).all()


@pytest.mark.parametrize(
    "yaml_name, sampler, opts, nfe_expected",
    [
        ("diffsep_small.yaml", "ode", {}, 5),
        ("diffsep_small.yaml", "ode", {"restart_t": 0.5}, 6),
        ("diffsep_small.yaml", "ddim", {"restart_t": None}, 3),  # the yaml default restart, switched off
        ("flow_small.yaml", "euler", {}, 3),
        ("flow_small.yaml", "heun", {}, 5),
        ("flow_small.yaml", "midpoint", {}, 6),
    ],
)
def test_recipe_yaml_model_exports_and_separates_the_same(tmp_path, yaml_name, sampler, opts, nfe_expected):
    """A recipe yaml's model (tiny sizes; no training: random weights perturbed twice, with an EMA of
    the two that differs from the raw weights) -> checkpoint -> export -> DiffSepSeparation gives the
    sampler's output of the EMA model, not of the raw one; the exported yaml names the network, not an
    nf. Both objectives (DiffSep's SDE, flow matching) and their samplers. (Training itself:
    test_learns_a_fixed_batch_through_the_denoiser_loss.)"""
    from pathlib import Path

    from hyperpyyaml import load_hyperpyyaml, resolve_references
    from speechbrain.utils.checkpoints import Checkpointer
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from speechbrain_diffsep import export
    from speechbrain_diffsep.inference import DiffSepSeparation
    from speechbrain_diffsep.pipeline import separate_mixture

    yaml_path = Path(__file__).parents[1] / "recipes/WSJ0Mix/separation/hparams" / yaml_name
    out = tmp_path / "run"
    overrides = {"data_folder": str(tmp_path), "output_folder": str(out), "N": 16, "B": 8, "H": 16, "X": 2,
                 "emb_dim": 8}
    with open(yaml_path) as f:
        resolved = resolve_references(f, overrides).getvalue()
    out.mkdir()
    (out / "hyperparams.yaml").write_text(resolved)
    hp = load_hyperpyyaml(resolved)
    model = hp["score_model"]
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    for k in range(2):  # the first update copies the weights, the second averages
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + k)))
        ema.update_parameters(model)
    Checkpointer(str(out / "save"), {"score_model": model, "ema": ema}).save_checkpoint(meta={"si_sdri": 1.0})

    export.export_from_recipe(out, tmp_path / "m", ckpt="last")
    text = (tmp_path / "m" / "hyperparams.yaml").read_text()
    assert "tcn.ConditionedTasNet" in text and "\nnf:" not in text
    info = json.loads((tmp_path / "m" / "export_info.json").read_text())
    assert info["network"] == "ConditionedTasNet" and info["used_ema"] is True
    # a shipped folder names no path of the machine it was made on
    for name in ("hyperparams.yaml", "export_info.json", "README.md"):
        assert str(tmp_path) not in (tmp_path / "m" / name).read_text(), name
    assert info["source"] == "run" and info["checkpoint"].startswith("save/CKPT+")

    folder = DiffSepSeparation.from_hparams(source=str(tmp_path / "m"), savedir=str(tmp_path / "save"))
    src = ema.module.eval()
    mix = torch.randn(1, 2400, generator=torch.Generator().manual_seed(3))
    est = folder.separate_batch(mix, sampler=sampler, num_steps=3, seed=7, **opts)
    with torch.no_grad():
        ref, nfe = separate_mixture(src, hp["sde"], mix[:, None], sampler=sampler, num_steps=3,
                                    generator=torch.Generator().manual_seed(7), **opts)
    assert nfe == nfe_expected
    assert torch.allclose(est, ref.transpose(1, 2), atol=1e-5)
    assert float(est.abs().max()) > 1e-3
    with torch.no_grad():
        raw, _ = separate_mixture(model.eval(), hp["sde"], mix[:, None], sampler=sampler, num_steps=3,
                                  generator=torch.Generator().manual_seed(7), **opts)
    assert float((est - raw.transpose(1, 2)).abs().max()) > 1e-3  # the raw weights would be told apart


def test_export_takes_the_recipes_test_sampler_as_the_folder_default(tmp_path):
    """A model folder samples as its recipe's test stage did (diffsep_small.yaml: ddim, 1 step, restart_t 0.5)."""
    from pathlib import Path

    from hyperpyyaml import load_hyperpyyaml, resolve_references
    from speechbrain.utils.checkpoints import Checkpointer

    from speechbrain_diffsep import export

    yaml_path = Path(__file__).parents[1] / "recipes/WSJ0Mix/separation/hparams/diffsep_small.yaml"
    out = tmp_path / "run"
    overrides = {"data_folder": str(tmp_path), "output_folder": str(out), "N": 8, "B": 8, "H": 8, "X": 1,
                 "R": 1, "emb_dim": 4, "separation_options": {"sampler": "edm", "num_steps": 4, "churn": 0.2}}
    with open(yaml_path) as f:
        resolved = resolve_references(f, overrides).getvalue()
    out.mkdir()
    (out / "hyperparams.yaml").write_text(resolved)
    hp = load_hyperpyyaml(resolved)
    Checkpointer(str(out / "save"), {"score_model": hp["score_model"]}).save_checkpoint(meta={"si_sdri": 0.0})
    export.export_from_recipe(out, tmp_path / "m", ckpt="last", use_ema=False)
    folder = load_hyperpyyaml((tmp_path / "m" / "hyperparams.yaml").read_text())
    # the override is merged into the yaml's dict (ddim, 1 step, restart_t 0.5) as SpeechBrain merges it
    assert (folder["sampler"], folder["num_steps"], dict(folder["sampler_options"])) == (
        "edm", 4, {"churn": 0.2, "restart_t": 0.5}
    )
    text = (tmp_path / "m" / "hyperparams.yaml").read_text()
    assert "60 network calls" not in text  # the template's pc comment is gone with its value
