"""The training objective the Brain calls, picked by ``loss_options: {objective: ...}`` in the yaml.

- ``"score"``: the paper's score matching with the p_T loss (:func:`.losses.score_matching_loss`),
  for a network that outputs the score (NCSN++'s ``ScoreModel``).
- ``"denoiser"``: EDM-style data prediction (:func:`.precond.denoiser_loss`), for a
  :class:`~.precond.PreconditionedScoreModel`; ``mismatch_p`` adds the mismatch-aware states,
  ``restart_p`` the restart-aware ones.
- ``"flow"``: flow matching for separation (:func:`.flow.flow_matching_loss`), for a
  :class:`~.flow.FlowModel` with ``sde: SeparationFlow``.

This module sits above ``losses``, ``precond`` and ``flow`` (each imports only what is below it), so
there is no import circle between them.
"""

from .flow import FlowModel, SeparationFlow, flow_matching_loss
from .losses import score_matching_loss
from .precond import denoiser_loss
from .sde import MixingSDE

OBJECTIVES = ("score", "denoiser", "flow")


def check_objective(objective, score_model, sde):
    """One-line error when the yaml's objective, model and SDE/flow do not belong together."""
    inner = getattr(score_model, "module", score_model)  # DDP wraps in .module
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if objective == "flow":
        if not isinstance(inner, FlowModel) or not isinstance(sde, SeparationFlow):
            raise ValueError(
                "objective 'flow' needs score_model: a speechbrain_diffsep.flow.FlowModel and "
                "sde: a speechbrain_diffsep.flow.SeparationFlow in the yaml"
            )
        return
    if not isinstance(sde, MixingSDE):
        raise ValueError(f"objective {objective!r} needs sde: a speechbrain_diffsep.sde.MixingSDE, got {type(sde).__name__}")
    if objective == "denoiser" and not hasattr(inner, "denoise"):
        raise ValueError(
            "objective 'denoiser' needs a PreconditionedScoreModel as score_model; "
            "wrap the network with speechbrain_diffsep.precond.PreconditionedScoreModel in the yaml"
        )


def training_loss(score_model, sde, s, y, generator=None, objective="score", **options):
    """The loss the Brain calls: ``(per-example loss (batch,), info dict)``.

    ``options`` come from the yaml's ``loss_options`` (``p_T``, ``shuffle``, ``t_sampling``,
    ``t_power``, ``pit_above``, ``mismatch_p``, ... as the chosen objective's function takes them).

    Example
    -------
    >>> import torch
    >>> from speechbrain_diffsep.sde import MixingSDE
    >>> s = torch.randn(4, 2, 32); y = s.sum(1, keepdim=True)
    >>> loss, info = training_loss(lambda x, t, y: torch.zeros_like(x), MixingSDE(), s, y)
    >>> loss.shape
    torch.Size([4])
    """
    check_objective(objective, score_model, sde)
    if objective == "score":
        for key in ("mismatch_p", "restart_p"):
            if options.get(key):
                raise ValueError(f"{key} needs objective 'denoiser' (the score objective's target assumes true marginals)")
        for key in ("mismatch_p", "mismatch_above", "restart_p", "restart_range"):
            options.pop(key, None)
        loss, mask = score_matching_loss(score_model, sde, s, y, generator=generator, **options)
    else:
        fn = denoiser_loss if objective == "denoiser" else flow_matching_loss
        loss, mask = fn(score_model, sde, s, y, generator=generator, **options)
    return loss, {"use_prior": mask}
