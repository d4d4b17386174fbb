"""Load the authors' DiffSep checkpoint (PyTorch Lightning) into :class:`ScoreModel`.

The released checkpoint (Hugging Face ``fakufaku/diffsep``, ``checkpoint.pt``) is a Lightning
checkpoint of ``DiffSepModel``. We read it without Lightning, Hydra or OmegaConf, and without
executing arbitrary pickled code: :class:`RestrictedUnpickler` resolves only the few globals such
a file references (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, torch storage
types, ``typing.Any``, ``dict``, ``collections.defaultdict``) and replaces every ``omegaconf.*``
class by an inert stub that only records its pickled state (used to read the stored config).

Weights: the EMA weights ``ckpt["ema"]["shadow_params"]`` (what the authors evaluate with) are
matched *positionally* to the checkpoint's ``state_dict`` keys minus the two STFT ``window``
buffers; without ``ema`` the ``state_dict`` itself is used. The reference backbone keeps its
layers in one flat list, ``score_model.backbone.all_modules.<i>.<leaf>``; :func:`reference_key_map`
is the one place that maps those names to ours (and back).

Example (not run here: needs the checkpoint file)::

    model = load_reference_checkpoint("checkpoint.pt")
    model.reference_config["sample_rate"]   # 8000
"""

import collections
import inspect
import os
import pickle
import re
import types
import typing
import zipfile

import torch

from .ncsnpp import NCSNpp, ScoreModel

REF_BACKBONE_PREFIX = "score_model.backbone."
REF_WINDOW_KEYS = ("score_model.stft.window", "score_model.stft_inv.window")


# ----------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("typing", "Any"): typing.Any,
    ("builtins", "dict"): dict,
}
# Python 2 names written by protocol 2 pickles
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class OmegaConfStub:
    """Inert stand-in for any ``omegaconf`` class: stores the pickled state, does nothing else."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def to_python(self):
        """Plain Python value of the node (``_content`` of containers, ``_val`` of value nodes)."""
        state = self.__dict__.get("_state")
        if not isinstance(state, dict):
            return None
        if "_content" in state:
            content = state["_content"]
            if isinstance(content, dict):
                return {k: _stub_to_python(v) for k, v in content.items()}
            if isinstance(content, (list, tuple)):
                return [_stub_to_python(v) for v in content]
            return content  # None or an interpolation string
        return _stub_to_python(state.get("_val"))


def _stub_to_python(value):
    if isinstance(value, OmegaConfStub):
        return value.to_python()
    if isinstance(value, dict):
        return {k: _stub_to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stub_to_python(v) for v in value]
    return value


_STUB_CLASSES = {}


def _omegaconf_stub(module, name):
    key = (module, name)
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (OmegaConfStub,), {"__module__": __name__ + ".stubs." + module})
    return _STUB_CLASSES[key]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals of a DiffSep Lightning checkpoint.

    ``omegaconf.*`` names give :class:`OmegaConfStub` subclasses; anything else not allow-listed
    raises ``pickle.UnpicklingError`` (torch's own wrapper resolves the ``torch.*Storage`` types
    before this method is reached).
    """

    def find_class(self, module, name):
        """Return the allow-listed object for ``module.name`` or refuse."""
        module = _PY2_MODULES.get(module, module)
        if module == "omegaconf" or module.startswith("omegaconf."):
            return _omegaconf_stub(module, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"global '{module}.{name}' is not allowed in a DiffSep reference checkpoint"
        )


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


#: module-like object for ``torch.load(..., pickle_module=restricted_pickle)``
restricted_pickle = types.SimpleNamespace(
    __name__="speechbrain_diffsep.convert.restricted_pickle",
    Unpickler=RestrictedUnpickler,
    UnpicklingError=pickle.UnpicklingError,
    load=_restricted_load,
)


def read_checkpoint(path, map_location="cpu"):
    """Load a reference Lightning checkpoint as plain Python objects (restricted unpickling).

    Arguments
    ---------
    path : str or os.PathLike
        The ``.ckpt`` / ``.pt`` file (a torch zip archive).
    map_location : str or torch.device
        Where tensors go.

    Returns
    -------
    dict
        The checkpoint dict; omegaconf objects are :class:`OmegaConfStub` instances.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file; pass the path of the reference checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip checkpoint (torch.save format); cannot convert it")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to unpickle: {err}") from None
    except Exception as err:  # corrupt archive, truncated data, ...
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {msg})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: no 'state_dict' in the checkpoint; is it a DiffSep Lightning checkpoint?")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Stored configuration
# ----------------------------------------------------------------------------------------------
_INTERP = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def _resolve(node, root):
    """Resolve plain ``${a.b.c}`` interpolations (whole-string ones) against ``root``."""
    if isinstance(node, dict):
        return {k: _resolve(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root) for v in node]
    if isinstance(node, str):
        match = _INTERP.match(node)
        if match:
            value = root
            for part in match.group(1).split("."):
                if not isinstance(value, dict) or part not in value:
                    return node
                value = value[part]
            return _resolve(value, root)
    return node


def _config_from_checkpoint(ckpt):
    """The stored Hydra config as nested dicts (simple interpolations resolved), or None."""
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "config" not in hparams:
        return None
    raw = _stub_to_python(hparams["config"])
    if not isinstance(raw, dict):
        return None
    return _resolve(raw, raw)


def _get(cfg, dotted, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def reference_settings(config):
    """The settings our code needs, read from the reference config (defaults where absent).

    Arguments
    ---------
    config : dict or None
        The stored config (see :func:`read_reference_config`).

    Returns
    -------
    dict
        ``sample_rate``, ``num_sources``, ``n_fft``, ``hop_length``, ``spec_exponent``,
        ``spec_factor``, ``transform``, ``backbone_args`` (dict), ``sde`` (``gamma``, ``sigma_min``,
        ``sigma_max``, ``N``), ``t_eps``, ``sampler`` (``N``, ``snr``, ``corrector_steps``),
        ``ema_decay`` and ``raw`` (the whole config, or None).
    """
    cfg = config or {}
    sm = _get(cfg, "model.score_model", {}) or {}
    stft = sm.get("stft_args", {}) or {}
    backbone = {k: v for k, v in (sm.get("backbone_args", {}) or {}).items() if not k.startswith("_")}
    sde = _get(cfg, "model.sde", {}) or {}
    sampler = _get(cfg, "model.sampler", {}) or {}
    return {
        "sample_rate": _get(cfg, "model.fs", 8000),
        "num_sources": _get(cfg, "model.n_speakers", sm.get("num_sources")),
        "n_fft": stft.get("n_fft", 510),
        "hop_length": stft.get("hop_length", 128),
        "spec_exponent": sm.get("spec_abs_exponent", 0.5),
        "spec_factor": sm.get("spec_factor", 0.15),
        "transform": sm.get("transform", "exponent"),
        "spec_trans_learnable": sm.get("spec_trans_learnable", False),
        "backbone_args": backbone,
        "sde": {
            "gamma": sde.get("d_lambda", 2.0),
            "sigma_min": sde.get("sigma_min", 0.05),
            "sigma_max": sde.get("sigma_max", 0.5),
            "N": sde.get("N", 30),
        },
        "t_eps": _get(cfg, "model.t_eps", 0.03),
        "sampler": {
            "N": sampler.get("N", 30),
            "snr": sampler.get("snr", 0.5),
            "corrector_steps": sampler.get("corrector_steps", 1),
        },
        "ema_decay": _get(cfg, "model.ema_decay"),
        "raw": config,
    }


def read_reference_config(path, map_location="cpu"):
    """Settings stored in a reference checkpoint, see :func:`reference_settings`."""
    return reference_settings(_config_from_checkpoint(read_checkpoint(path, map_location)))


# ----------------------------------------------------------------------------------------------
# Name mapping: reference flat layout <-> our named lobes
# ----------------------------------------------------------------------------------------------
def reference_module_paths(backbone):
    """Our module path for each entry of the reference's ``all_modules`` list, in its order.

    The reference ``NCSNpp`` appends its layers to one list in the order its forward pass uses
    them: Fourier projection, two time linears, input conv; per encoder level the residual blocks
    (each followed by its attention block where used), the down-sampling block and the progressive
    input combiner; bottleneck (block, attention, block); per decoder level (deepest first) the
    residual blocks, attention, the progressive output GroupNorm + conv (or the pyramid
    up-sampler) and the up-sampling block; and, without ``output_skip``, a final GroupNorm + conv.
    Parameter-free layers still take an index.

    Arguments
    ---------
    backbone : NCSNpp
        Our backbone (its configuration decides which entries exist).

    Returns
    -------
    list of str
        ``paths[i]`` is the path (relative to ``backbone``) of ``all_modules.<i>``.
    """
    paths = ["time_embed.fourier"]
    if backbone.config["conditional"]:
        paths += ["time_embed.dense_0", "time_embed.dense_1"]
    paths.append("input_conv")
    for i, level in enumerate(backbone.down_levels):
        for j in range(len(level.blocks)):
            paths.append(f"down_levels.{i}.blocks.{j}")
            if len(level.attn):
                paths.append(f"down_levels.{i}.attn.{j}")
        if level.downsample is not None:
            paths.append(f"down_levels.{i}.downsample")
            if level.combine is not None:
                paths.append(f"down_levels.{i}.combine")
            elif level.pyramid_downsample is not None:
                paths.append(f"down_levels.{i}.pyramid_downsample")
    paths += ["mid.block_0", "mid.attn", "mid.block_1"]
    for i in reversed(range(len(backbone.up_levels))):
        level = backbone.up_levels[i]
        paths += [f"up_levels.{i}.blocks.{j}" for j in range(len(level.blocks))]
        if level.attn is not None:
            paths.append(f"up_levels.{i}.attn")
        if level.pyramid_norm is not None:
            paths += [f"up_levels.{i}.pyramid_norm", f"up_levels.{i}.pyramid_conv"]
        elif level.pyramid_upsample is not None:
            paths.append(f"up_levels.{i}.pyramid_upsample")
        if level.upsample is not None:
            paths.append(f"up_levels.{i}.upsample")
    if backbone.final_norm is not None:
        paths += ["final_norm", "final_conv"]
    return paths


def _reference_leaf(module, our_leaf):
    """Reference name of a parameter inside ``module`` (``REFERENCE_NAMES`` renames, recursively)."""
    head, _, rest = our_leaf.partition(".")
    if not rest:
        return our_leaf
    names = getattr(module, "REFERENCE_NAMES", {})
    child = getattr(module, head)
    ref_head = names.get(head, head)
    if ref_head is None:  # our wrapper level with no reference counterpart
        return _reference_leaf(child, rest)
    return ref_head + "." + _reference_leaf(child, rest)


def reference_key_map(model):
    """``{reference state_dict key: our state_dict key}`` for every parameter of ``model``.

    Reference keys look like ``score_model.backbone.all_modules.<i>.<leaf>`` (and
    ``score_model.backbone.output_layer.*``); ours like ``backbone.down_levels.0.blocks.1.conv_0.weight``.
    Inside a block, our readable names map to the reference's through the block class's
    ``REFERENCE_NAMES`` (e.g. ``norm_0 -> GroupNorm_0``, ``temb_proj -> Dense_0``,
    ``query -> NIN_0``).

    Arguments
    ---------
    model : ScoreModel

    Returns
    -------
    dict
        Ordered like ``model.state_dict()``.
    """
    backbone = model.backbone
    paths = reference_module_paths(backbone)
    index = {path: i for i, path in enumerate(paths)}
    mapping = {}
    for key in model.state_dict():
        if not key.startswith("backbone."):
            raise ValueError(f"unexpected parameter {key} outside the backbone")
        name = key[len("backbone."):]
        if name.startswith("output_layer."):
            mapping[REF_BACKBONE_PREFIX + name] = key
            continue
        # longest module path that prefixes the parameter name
        prefix = max((p for p in index if name.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise ValueError(f"parameter {key} has no counterpart in the reference layout")
        module = backbone.get_submodule(prefix)
        leaf = _reference_leaf(module, name[len(prefix) + 1:])
        mapping[f"{REF_BACKBONE_PREFIX}all_modules.{index[prefix]}.{leaf}"] = key
    return mapping


def to_reference_state_dict(model):
    """Our weights under the reference's key names (reference order of ``all_modules``)."""
    ours = model.state_dict()
    mapping = reference_key_map(model)

    def order(ref_key):
        m = re.match(re.escape(REF_BACKBONE_PREFIX) + r"all_modules\.(\d+)\.", ref_key)
        return -1 if m is None else int(m.group(1))

    keys = sorted(mapping, key=order)  # stable: our order inside a module, which is the reference's
    return collections.OrderedDict((k, ours[mapping[k]]) for k in keys)


def from_reference_state_dict(ref_state, model, source="state dict"):
    """Copy reference-named weights into ``model`` (inverse of :func:`to_reference_state_dict`).

    Keys outside ``score_model.backbone.`` (the STFT windows) are ignored. Missing or unexpected
    backbone keys and shape mismatches raise ``ValueError`` naming ``source``.
    """
    mapping = reference_key_map(model)
    ref_keys = {k for k in ref_state if k.startswith(REF_BACKBONE_PREFIX)}
    missing = sorted(set(mapping) - ref_keys)
    unexpected = sorted(ref_keys - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit the model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    ours = model.state_dict()
    new_state = {}
    for ref_key, our_key in mapping.items():
        value = ref_state[ref_key]
        if tuple(value.shape) != tuple(ours[our_key].shape):
            raise ValueError(
                f"{source}: {ref_key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ours[our_key].shape)} for {our_key}"
            )
        new_state[our_key] = value
    model.load_state_dict(new_state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
def _ema_state(ckpt, path):
    """State dict with the EMA weights swapped in (positional match), or the raw one."""
    state = ckpt["state_dict"]
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or ema.get("shadow_params") is None:
        return state, False
    shadow = list(ema["shadow_params"])
    keys = [k for k in state if k not in REF_WINDOW_KEYS]
    if len(shadow) != len(keys):
        raise ValueError(
            f"{path}: ema.shadow_params has {len(shadow)} tensors but state_dict has {len(keys)} "
            "parameters; cannot match them"
        )
    new_state = collections.OrderedDict(state)
    for key, value in zip(keys, shadow):
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(
                f"{path}: ema.shadow_params entry for {key} has shape {tuple(value.shape)}, "
                f"state_dict has {tuple(state[key].shape)}"
            )
        new_state[key] = value
    return new_state, True


def _infer_architecture(state, path):
    """``(num_sources, nf)`` from the output layer and Fourier-feature shapes."""
    w_key = REF_BACKBONE_PREFIX + "output_layer.weight"
    f_key = REF_BACKBONE_PREFIX + "all_modules.0.W"
    if w_key not in state or f_key not in state:
        raise ValueError(f"{path}: state_dict lacks {w_key} / {f_key}; not a DiffSep NCSN++ checkpoint")
    out_ch, in_ch = state[w_key].shape[:2]
    if out_ch % 2 or in_ch != out_ch + 2:
        raise ValueError(f"{path}: output layer shape {tuple(state[w_key].shape)} is not (2K, 2K+2, 1, 1)")
    return out_ch // 2, state[f_key].numel()


def load_reference_checkpoint(path, map_location="cpu", use_ema=True):
    """Build a :class:`ScoreModel` from the authors' checkpoint, in eval mode.

    Arguments
    ---------
    path : str or os.PathLike
        Lightning checkpoint of the reference ``DiffSepModel``.
    map_location : str or torch.device
        Device of the returned model.
    use_ema : bool
        Use ``ema.shadow_params`` (default, what the authors evaluate with); False loads the
        raw ``state_dict`` weights.

    Returns
    -------
    ScoreModel
        With attribute ``reference_config`` (see :func:`reference_settings`, plus ``nf``,
        ``used_ema``).
    """
    ckpt = read_checkpoint(path, map_location)
    settings = reference_settings(_config_from_checkpoint(ckpt))
    state, used_ema = _ema_state(ckpt, path) if use_ema else (ckpt["state_dict"], False)
    num_sources, nf = _infer_architecture(state, path)
    if settings["num_sources"] not in (None, num_sources):
        raise ValueError(
            f"{path}: config says {settings['num_sources']} sources but the weights have {num_sources}"
        )
    if settings["transform"] != "exponent" or settings["spec_trans_learnable"]:
        raise ValueError(
            f"{path}: only the 'exponent' spectral transform with fixed parameters is supported, "
            f"got transform={settings['transform']!r}, learnable={settings['spec_trans_learnable']}"
        )
    known = set(inspect.signature(NCSNpp).parameters) - {"nf", "num_channels_in", "num_channels_out"}
    backbone_args = {k: v for k, v in settings["backbone_args"].items() if k in known}
    for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
        if key in backbone_args:
            backbone_args[key] = tuple(backbone_args[key])
    model = ScoreModel(
        num_sources=num_sources,
        nf=nf,
        n_fft=settings["n_fft"],
        hop_length=settings["hop_length"],
        spec_exponent=settings["spec_exponent"],
        spec_factor=settings["spec_factor"],
        **backbone_args,
    )
    from_reference_state_dict(state, model, source=os.fspath(path))
    model.to(map_location).eval()
    settings.update(num_sources=num_sources, nf=nf, used_ema=used_ema)
    model.reference_config = settings
    return model
