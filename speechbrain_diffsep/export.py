"""Export a DiffSep model folder that ``DiffSepSeparation.from_hparams`` / ``DiffSepEnhancement`` load.

A model folder holds ``hyperparams.yaml`` (an inference template from ``hparams/`` with the network,
the SDE, ``nf``, ``num_spks`` and ``sample_rate`` of the exported model), ``score_model.ckpt`` (the
weights as a plain state dict), ``export_info.json`` (where it came from) and a short README.

Two sources::

    # a recipe's output folder: <output_folder>/hyperparams.yaml + save/CKPT+*/ (EMA weights)
    python -m speechbrain_diffsep.export --out pretrained/diffsep-wsj0 --from-recipe results/diffsep/2spk/1234 --ckpt best
    # the authors' released Lightning checkpoint (through convert.load_reference_checkpoint)
    python -m speechbrain_diffsep.export --out pretrained/diffsep-paper --from-reference checkpoint.pt

From a recipe, the ``score_model`` and ``sde`` entries of the recipe's yaml are copied into the
template (so any network the recipe built is rebuilt identically), the parameters are taken from the
checkpoint's ``ema.ckpt`` (a ``torch.optim.swa_utils.AveragedModel`` state dict, ``module.<name>``
keys) and the buffers from its ``score_model.ckpt``. After writing, the folder is loaded back and its
weights compared with the source's, so an export that does not reproduce the model fails loudly.

Writes are atomic: a folder is written and verified in a hidden temporary sibling
(``.<name>.partial-*``), then renamed to ``--out`` in one step; over an existing folder each file is
replaced by ``os.replace`` (never truncated in place, and no other file of that folder is touched).
Readers (other DDP ranks, concurrent test-only runs) thus see a complete model folder or none.
"""

import argparse
import datetime
import errno
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references
from ruamel.yaml import YAML
from ruamel.yaml.comments import TaggedScalar

from . import __version__
from .inference import CHECKPOINT_FILE, HPARAMS_FILE, _one_line, read_state_dict

def _hparams_dir():
    """The inference templates: ``hparams/`` of a source checkout (editable install), else the copy
    that ``setup.py`` installs under ``<prefix>/share/speechbrain-diffsep/hparams``."""
    repo = Path(__file__).resolve().parent.parent / "hparams"
    installed = Path(sys.prefix) / "share" / "speechbrain-diffsep" / "hparams"
    return repo if repo.is_dir() or not installed.is_dir() else installed


REPO_HPARAMS = _hparams_dir()
SEPARATION_TEMPLATE = REPO_HPARAMS / "separation_wsj0mix_8k.yaml"
ENHANCEMENT_TEMPLATE = REPO_HPARAMS / "enhancement_voicebank_16k.yaml"
COMPLETE_MARKER = "complete.ckpt"  # written last by DiffSepBrain's checkpoints
MAX_KEYS = ("si_sdr", "si_snr", "sdr", "pesq", "estoi", "stoi")
MIN_KEYS = ("loss", "valid_loss")


class ExportError(ValueError):
    """A one-line problem with the export's input."""


# --------------------------------------------------------------------------- yaml helpers
def _yaml():
    y = YAML(typ="rt")
    y.width = 4096
    y.representer.add_representer(type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _load_rt(text, name):
    try:
        return _yaml().load(text)
    except Exception as err:
        raise ExportError(f"{name}: not a valid yaml file ({_one_line(err)})") from None


def _dump(doc):
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    return buf.getvalue()


def _ref(name):
    return TaggedScalar(value=f"<{name}>", tag="!ref")


def _tag(node):
    tag = getattr(node, "tag", None)
    return getattr(tag, "value", None) or ""


def _drop_anchors(node):
    """Remove anchors from a transplanted yaml subtree (its aliases are left in the recipe)."""
    anchor = getattr(node, "anchor", None)
    if anchor is not None and anchor.value is not None and not anchor.always_dump:
        anchor.value = None
    children = node.values() if hasattr(node, "values") else node if isinstance(node, list) else []
    for child in children:
        _drop_anchors(child)


def default_template(enhancement):
    """The inference template of this repository for separation or enhancement."""
    path = ENHANCEMENT_TEMPLATE if enhancement else SEPARATION_TEMPLATE
    if not path.is_file():
        raise ExportError(f"inference template {path} not found (installed without hparams/?); pass --hparams")
    return path


def _read_template(path):
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--hparams {path}: no such file")
    doc = _load_rt(path.read_text(encoding="utf-8"), str(path))
    for key in ("score_model", "sde", "modules", "pretrainer"):
        if key not in doc:
            raise ExportError(f"--hparams {path}: an inference template needs a top-level '{key}' entry")
    return doc


# --------------------------------------------------------------------------- writing a folder
def _find_score_model(module):
    """The ``ScoreModel`` inside ``module`` (itself or wrapped, e.g. by preconditioning), or None."""
    from .ncsnpp import ScoreModel

    for m in module.modules():
        if isinstance(m, ScoreModel):
            return m
    return None


def _network_name(model_obj):
    """Class name of the network (the wrapped one for a preconditioned model)."""
    net = getattr(model_obj, "net", model_obj)
    return type(net).__name__ if net is not None else None


def _readme(info):
    cls = "DiffSepEnhancement" if info["task"] == "enhancement" else "DiffSepSeparation"
    call = "enhance_file('noisy.wav')" if info["task"] == "enhancement" else "separate_file(path='mixture.wav')"
    return (
        f"# DiffSep model folder ({info['task']}, {info['sample_rate']} Hz, K={info['num_spks']}, "
        f"{'nf=' + str(info['nf']) if info['nf'] is not None else info.get('network', '')})\n\n"
        f"Exported by speechbrain-diffsep {__version__} on {info['date']} from {info['source_kind']} "
        f"`{info['source']}`.\n\n"
        "```python\n"
        f"from speechbrain_diffsep.inference import {cls}\n"
        f"model = {cls}.from_hparams(source='<this folder>', savedir='tmp')\n"
        f"out = model.{call}\n"
        "```\n"
    )


def _staging_folder(out):
    """A fresh hidden folder next to ``out`` (same file system, so that a rename is atomic)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish_folder(staging, out):
    """Move the finished folder ``staging`` to ``out`` atomically; returns ``out``.

    ``out`` absent (or empty): one ``rename``, so a reader sees the whole folder or nothing. ``out``
    present (an earlier export, or another process that finished first): each file of ``staging``
    replaces its namesake with ``os.replace`` (atomic per file); other files of ``out`` are kept.
    ``staging`` is gone afterwards.
    """
    staging, out = Path(staging), Path(out)
    try:
        os.rename(staging, out)
        return out
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not out.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            raise
    for item in sorted(staging.iterdir()):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_files(out, doc, state_dict, info):
    text = _dump(doc)
    (out / HPARAMS_FILE).write_text(
        f"# Exported by speechbrain_diffsep.export from {info['source_kind']} {info['source']}\n{text}",
        encoding="utf-8",
    )
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out / CHECKPOINT_FILE)
    (out / "export_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(info), encoding="utf-8")


def write_model_folder(out_dir, doc, state_dict, info, verify=True):
    """Write ``hyperparams.yaml``, ``score_model.ckpt``, ``export_info.json`` and ``README.md``.

    The files are written into a staging folder, loaded back there (``verify``: the weights must
    equal ``state_dict``, see :func:`verify_model_folder`) and only then published to ``out_dir``
    (:func:`publish_folder`), so a failed export leaves ``out_dir`` as it was.
    """
    out = Path(out_dir)
    staging = _staging_folder(out)
    try:
        _write_files(staging, doc, state_dict, info)
        if verify:
            verify_model_folder(staging, state_dict)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_folder(staging, out)


def verify_model_folder(out_dir, state_dict):
    """Load the exported folder with ``from_hparams`` and check its weights equal ``state_dict``."""
    from .inference import DiffSepSeparation

    model = DiffSepSeparation.from_hparams(source=str(out_dir), run_opts={"device": "cpu"})
    loaded = model.mods.score_model.state_dict()
    bad = [k for k, v in state_dict.items() if k not in loaded or not torch.equal(loaded[k].cpu(), v.detach().cpu())]
    if bad or len(loaded) != len(state_dict):
        raise ExportError(f"exported folder {out_dir} does not reproduce the source weights (e.g. {bad[:1]})")
    return model


def _info(kind, source, model_obj, sample_rate, num_spks, task, **extra):
    inner = _find_score_model(model_obj)
    return {
        "source_kind": kind,
        "source": Path(str(source)).name,  # no path of the machine it was made on
        "task": task,
        "sample_rate": int(sample_rate),
        "num_spks": int(num_spks),
        "nf": inner.config.get("nf") if inner is not None else None,
        "network": _network_name(model_obj),
        "score_model_config": dict(inner.config) if inner is not None else None,
        "date": datetime.date.today().isoformat(),
        "speechbrain_diffsep_version": __version__,
        **extra,
    }


# --------------------------------------------------------------------------- from the reference
def _listify(value):
    return list(value) if isinstance(value, tuple) else value


def export_from_reference(checkpoint, out_dir, hparams=None):
    """Export the authors' Lightning checkpoint (EMA weights) with the nf / K / rate it stores."""
    from .convert import load_reference_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ExportError(f"--from-reference {checkpoint}: no such file")
    try:
        model = load_reference_checkpoint(checkpoint)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"--from-reference {checkpoint}: cannot convert it ({_one_line(err)})") from None
    cfg = model.reference_config
    raw_sde = ((cfg.get("raw") or {}).get("model") or {}).get("sde") or {}
    enhancement = "PriorMix" in str(raw_sde.get("_target_", ""))
    doc = _read_template(hparams or default_template(enhancement))
    doc["sample_rate"] = int(cfg["sample_rate"])
    doc["num_spks"] = int(model.num_sources)
    doc["nf"] = int(cfg["nf"])
    sde_node = doc["sde"]
    sde_node["num_sources"] = _ref("num_spks")
    for ours, value in (("gamma", cfg["sde"]["gamma"]), ("sigma_min", cfg["sde"]["sigma_min"]),
                        ("sigma_max", cfg["sde"]["sigma_max"]), ("t_eps", cfg["t_eps"])):
        sde_node[ours] = float(value)
    sm_node = doc["score_model"]
    for key, value in model.config.items():
        sm_node[key] = _listify(value)
    sm_node["num_sources"] = _ref("num_spks")
    sm_node["nf"] = _ref("nf")
    if "num_steps" in doc:
        doc["num_steps"] = int(cfg["sampler"]["N"])
    if isinstance(doc.get("sampler_options"), dict):
        doc["sampler_options"]["snr"] = float(cfg["sampler"]["snr"])
        doc["sampler_options"]["corrector_steps"] = int(cfg["sampler"]["corrector_steps"])
    state = model.state_dict()
    info = _info("reference checkpoint", checkpoint.resolve(), model, cfg["sample_rate"], model.num_sources,
                 "enhancement" if enhancement else "separation", used_ema=cfg.get("used_ema"),
                 sde=dict(cfg["sde"], t_eps=cfg["t_eps"]))
    write_model_folder(out_dir, doc, state, info)
    return Path(out_dir)


# --------------------------------------------------------------------------- from a recipe
def list_recipe_checkpoints(output_folder):
    """Checkpoints of a recipe run whose save finished, as SpeechBrain ``Checkpoint`` tuples."""
    from speechbrain.utils.checkpoints import Checkpointer

    save = Path(output_folder) / "save"
    if not save.is_dir():
        raise ExportError(f"--from-recipe {output_folder}: no save/ folder with checkpoints")
    ckpts = Checkpointer(str(save)).list_checkpoints()
    ckpts = [c for c in ckpts if (Path(c.path) / "score_model.ckpt").is_file()]
    complete = [c for c in ckpts if (Path(c.path) / COMPLETE_MARKER).is_file()]
    if any((Path(c.path) / COMPLETE_MARKER).is_file() for c in ckpts):
        ckpts = complete  # the Brain marks finished saves; unmarked folders are partial
    if not ckpts:
        raise ExportError(f"--from-recipe {output_folder}: no complete checkpoint with score_model.ckpt in {save}")
    return ckpts


def select_checkpoint(ckpts, which="best", metric=None):
    """``"last"``: the most recent; ``"best"``: by ``metric`` (max for SI-SDR-like keys, min for
    losses); without ``metric``, the first of ``si_sdr ...`` / ``loss ...`` found in the metas."""
    if which == "last":
        return max(ckpts, key=lambda c: c.meta.get("unixtime", 0))
    if which != "best":
        raise ExportError(f"--ckpt must be 'best' or 'last', got {which!r}")
    keys = [metric] if metric else list(MAX_KEYS) + list(MIN_KEYS)
    for key in keys:
        have = [c for c in ckpts if isinstance(c.meta.get(key), (int, float))]
        if have:
            maximize = key in MAX_KEYS or (metric and key.lower().startswith(("si", "sdr", "pesq", "stoi", "estoi")))
            pick = max if maximize else min
            return pick(have, key=lambda c: c.meta[key])
    found = sorted({k for c in ckpts for k in c.meta})
    raise ExportError(f"no checkpoint meta has {'metric ' + metric if metric else 'a known metric'}; found {found}; use --ckpt last or --metric")


def _strip_prefix(state, prefix="module."):
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def ema_state_dict(model, raw_state, ema_state):
    """Parameters from an ``AveragedModel`` state dict, buffers from the raw weights."""
    ema = {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}
    state = dict(raw_state)
    for name, param in model.named_parameters():
        if name not in ema:
            raise ExportError(f"ema.ckpt has no weights for parameter {name}; is it the EMA of this score_model?")
        if tuple(ema[name].shape) != tuple(param.shape):
            raise ExportError(f"ema.ckpt: {name} has shape {tuple(ema[name].shape)}, the model {tuple(param.shape)}")
        state[name] = ema[name]
    return state


def _recipe_doc(output_folder, hparams):
    """The template with the recipe's score_model, sde, sample_rate and num_spks."""
    recipe_yaml = Path(output_folder) / HPARAMS_FILE
    if not recipe_yaml.is_file():
        raise ExportError(f"--from-recipe {output_folder}: no {HPARAMS_FILE} (SpeechBrain copies the recipe yaml there)")
    try:
        with open(recipe_yaml, encoding="utf-8") as f:
            resolved = resolve_references(f).getvalue()
    except Exception as err:
        raise ExportError(f"{recipe_yaml}: cannot resolve it ({_one_line(err)})") from None
    rec = _load_rt(resolved, str(recipe_yaml))
    missing = [k for k in ("score_model", "sde", "sample_rate", "num_spks") if k not in rec]
    if missing:
        raise ExportError(f"{recipe_yaml}: missing top-level {', '.join(missing)}")
    enhancement = "PriorMixingSDE" in _tag(rec["sde"])
    doc = _read_template(hparams or default_template(enhancement))
    for key in ("score_model", "sde"):
        node = rec[key]
        _drop_anchors(node)
        if hasattr(node, "keys"):
            if "num_sources" in node:
                node["num_sources"] = _ref("num_spks")
            # the network may be wrapped (e.g. PreconditionedScoreModel(net=ScoreModel(...)))
            net = node["net"] if key == "score_model" and "nf" not in node and hasattr(node.get("net"), "keys") else node
            if key == "score_model" and "nf" in net:
                doc["nf"] = net["nf"]
                net["nf"] = _ref("nf")
            elif key == "score_model":
                doc.pop("nf", None)  # not an NCSN++ (e.g. tcn.ConditionedTasNet): no base width
            if net is not node and "num_sources" in net:
                net["num_sources"] = _ref("num_spks")
        doc[key] = node
    doc["sample_rate"] = int(rec["sample_rate"])
    doc["num_spks"] = int(rec["num_spks"])
    if hparams is None:
        _sampler_from_recipe(doc, rec.get("separation_options"))
    return doc, enhancement


def _sampler_from_recipe(doc, options):
    """The folder's default sampler = the recipe's test-stage ``separation_options`` (the sampler
    the model was measured with, e.g. ode/3 for ``diffsep_small.yaml``, pc/30 for ``diffsep.yaml``)."""
    if not hasattr(options, "keys") or "sampler" not in options:
        return
    options = {str(k): v for k, v in options.items()}
    for key in ("sampler", "num_steps", "sampler_options"):
        if hasattr(doc, "ca"):
            doc.ca.items.pop(key, None)  # the template's comments describe its own defaults
    doc["sampler"] = str(options.pop("sampler"))
    if "num_steps" in options:
        doc["num_steps"] = int(options.pop("num_steps"))
    doc["sampler_options"] = options


def export_from_recipe(output_folder, out_dir, ckpt="best", hparams=None, metric=None, use_ema=True):
    """Export a recipe's checkpoint (EMA parameters when ``ema.ckpt`` exists)."""
    output_folder = Path(output_folder)
    if not output_folder.is_dir():
        raise ExportError(f"--from-recipe {output_folder}: no such folder")
    doc, enhancement = _recipe_doc(output_folder, hparams)
    chosen = select_checkpoint(list_recipe_checkpoints(output_folder), ckpt, metric)
    try:
        hp = load_hyperpyyaml(_dump(doc))
    except Exception as err:
        raise ExportError(f"cannot build the recipe's score_model/sde ({type(err).__name__}: {_one_line(err)})") from None
    model = hp["score_model"]
    raw = _strip_prefix(read_state_dict(Path(chosen.path) / "score_model.ckpt"))
    ema_path = Path(chosen.path) / "ema.ckpt"
    ema_info = {"used_ema": False}
    if use_ema and ema_path.is_file():
        ema = read_state_dict(ema_path)
        state = ema_state_dict(model, raw, ema)
        ema_info = {"used_ema": True, "n_averaged": int(ema["n_averaged"]) if "n_averaged" in ema else None}
    else:
        if use_ema:
            print(f"warning: {ema_path} not found; exporting the raw (non-EMA) weights", file=sys.stderr)
        state = raw
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{chosen.path}: the checkpoint does not fit the recipe's score_model ({_one_line(err)})") from None
    state = model.state_dict()
    meta = {k: v for k, v in chosen.meta.items() if isinstance(v, (int, float, str))}
    info = _info("recipe", output_folder.resolve(), model, doc["sample_rate"], doc["num_spks"],
                 "enhancement" if enhancement else "separation",
                 checkpoint=str(Path(chosen.path).resolve().relative_to(output_folder.resolve())),
                 checkpoint_meta=meta, **ema_info)
    write_model_folder(out_dir, doc, state, info)
    return Path(out_dir)


def export_separator_from_recipe(output_folder, out_dir, ckpt="best", metric=None):
    """Export a Conv-TasNet recipe run as a :class:`~speechbrain_diffsep.inference.ConvTasNetSeparation`
    folder (``encoder``/``masknet``/``decoder`` checkpoints + ``hyperparams.yaml``), written atomically
    like :func:`write_model_folder`."""
    from speechbrain.utils.checkpoints import Checkpointer

    output_folder = Path(output_folder)
    recipe_yaml = output_folder / HPARAMS_FILE
    if not recipe_yaml.is_file():
        raise ExportError(f"--from-recipe {output_folder}: no {HPARAMS_FILE} (SpeechBrain copies the recipe yaml there)")
    with open(recipe_yaml, encoding="utf-8") as f:
        rec = _load_rt(resolve_references(f).getvalue(), str(recipe_yaml))
    names = ("encoder", "masknet", "decoder")
    ckpts = [c for c in Checkpointer(str(output_folder / "save")).list_checkpoints()
             if all((Path(c.path) / f"{n}.ckpt").is_file() for n in names)]
    if not ckpts:
        raise ExportError(f"--from-recipe {output_folder}: no checkpoint with {', '.join(n + '.ckpt' for n in names)}")
    chosen = select_checkpoint(ckpts, ckpt, metric)
    doc = _yaml().load("interface: ConvTasNetSeparation\n")
    doc["sample_rate"] = int(rec["sample_rate"])
    doc["num_spks"] = int(rec["num_spks"])
    for n in names:
        _drop_anchors(rec[n])
        doc[n] = rec[n]
    doc["modules"] = {n: _ref(n) for n in names}
    doc["pretrainer"] = _load_rt(
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n  loadables:\n"
        + "".join(f"    {n}: !ref <{n}>\n" for n in names), "template")["pretrainer"]
    out = Path(out_dir)
    staging = _staging_folder(out)
    try:
        (staging / HPARAMS_FILE).write_text(_dump(doc), encoding="utf-8")
        for n in names:
            shutil.copyfile(Path(chosen.path) / f"{n}.ckpt", staging / f"{n}.ckpt")
        meta = {k: v for k, v in chosen.meta.items() if isinstance(v, (int, float, str))}
        (staging / "export_info.json").write_text(json.dumps(
            {"task": "separation", "interface": "ConvTasNetSeparation", "source": output_folder.resolve().name,
             "checkpoint": str(Path(chosen.path).resolve().relative_to(output_folder.resolve())), "checkpoint_meta": meta,
             "sample_rate": doc["sample_rate"], "num_spks": doc["num_spks"], "nf": None}, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_folder(staging, out)


def _is_conv_tasnet_run(output_folder):
    path = Path(output_folder) / HPARAMS_FILE
    return path.is_file() and "masknet:" in path.read_text(encoding="utf-8") and "score_model:" not in path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m speechbrain_diffsep.export",
        description="Make a DiffSep model folder (hyperparams.yaml + score_model.ckpt) for from_hparams.",
    )
    p.add_argument("--out", required=True, help="model folder to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-recipe", metavar="OUTPUT_FOLDER", help="a recipe's output folder (hyperparams.yaml, save/CKPT+*)")
    src.add_argument("--from-reference", metavar="CHECKPOINT", help="the authors' Lightning checkpoint (checkpoint.pt)")
    p.add_argument("--ckpt", choices=["best", "last"], default="best", help="recipe checkpoint to export (default best)")
    p.add_argument("--metric", help="checkpoint meta key for --ckpt best (default: si_sdr, else loss)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights of a recipe, not the EMA")
    p.add_argument("--hparams", help="inference template (default: hparams/separation_wsj0mix_8k.yaml, or the "
                   "enhancement one for a PriorMixingSDE model)")
    return p


def main(argv=None):
    """Entry point; returns the exit status (0, or 1 with a one-line error on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.from_recipe and _is_conv_tasnet_run(args.from_recipe):
            out = export_separator_from_recipe(args.from_recipe, args.out, args.ckpt, args.metric)
        elif args.from_recipe:
            out = export_from_recipe(args.from_recipe, args.out, args.ckpt, args.hparams, args.metric, not args.no_ema)
        else:
            out = export_from_reference(args.from_reference, args.out, args.hparams)
    except (ValueError, OSError) as err:
        print(f"export: error: {_one_line(err)}", file=sys.stderr)
        return 1
    info = json.loads((Path(out) / "export_info.json").read_text())
    net = f"nf={info['nf']}" if info.get("nf") is not None else info.get("network")
    print(f"wrote {out} ({info.get('interface', info['task'])}, {info['sample_rate']} Hz, K={info['num_spks']}, {net})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
