"""Learning curves on MiniMix: SI-SDRi on held-out mixtures against CPU training time.

Every model is built from a recipe yaml (``recipes/WSJ0Mix/separation/hparams``) exactly as
``train.py`` builds it, then trained for the same wall-clock budget (``--minutes`` of training
time; evaluation time is not counted) on the same MiniMix. At ``--points`` evenly spaced times
(and at 0) the model separates the first ``--n-eval`` test mixtures (DiffSep with its EMA weights
and the sampler of the yaml, ``--eval-steps`` overriding its number of steps) and the mean SI-SDRi
(SI-SIR permutation, as the paper) is recorded.

Models are given as ``--model LABEL=YAML[@OVERRIDES]`` (repeatable) where OVERRIDES is a YAML
flow mapping applied to the yaml, e.g. to compare DiffSep training options::

    python benchmarks/learn_minimix.py --minutes 30 --out results/learn_minimix \\
        --model diffsep=diffsep_small.yaml \\
        --model "diffsep_pT0.5=diffsep_small.yaml@{loss_options: {p_T: 0.5}}" \\
        --model convtasnet=convtasnet_small.yaml

Without ``--model`` it compares ``diffsep_small.yaml`` (preconditioned, Conv-TasNet network),
``diffsep_small_paper.yaml`` (the paper's parameterization, NCSN++) and ``convtasnet_small.yaml``. The MiniMix
is generated into ``--data`` if that folder does not hold one yet (needs flite and espeak-ng).
Writes ``learning_curves.md`` (markdown table), ``learning_curves.png`` and ``learning_curves.json``
into ``--out``. With ``--save`` each model's folder ``--out/LABEL`` is also laid out as a recipe's
output folder (``hyperparams.yaml`` and a checkpoint with the EMA weights at every evaluation
point), so ``python -m speechbrain_diffsep.export --from-recipe OUT/LABEL --ckpt last --out DIR``
turns the trained model into a model folder for ``DiffSepSeparation`` and the sampler benchmark.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from hyperpyyaml import load_hyperpyyaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "WSJ0Mix" / "separation"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(RECIPE))
sys.path.insert(0, str(ROOT / "recipes" / "MiniMix"))

import speechbrain as sb  # noqa: E402

from speechbrain_diffsep.metrics import evaluate_separation  # noqa: E402

DEFAULT_MODELS = ["diffsep_small=diffsep_small.yaml", "diffsep_small_paper=diffsep_small_paper.yaml",
                  "convtasnet_small=convtasnet_small.yaml"]


def parse_model(spec):
    """``LABEL=YAML[@OVERRIDES]`` -> ``(label, yaml_path, overrides dict)``."""
    if "=" not in spec:
        raise ValueError(f"--model must look like LABEL=YAML[@OVERRIDES], got {spec!r}")
    label, rest = spec.split("=", 1)
    path, _, over = rest.partition("@")
    path = Path(path)
    if not path.is_file():
        path = RECIPE / "hparams" / path
    if not path.is_file():
        raise ValueError(f"yaml {rest.partition('@')[0]!r} not found (also looked in {RECIPE / 'hparams'})")
    overrides = yaml.safe_load(over) if over else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides of {label!r} must be a YAML mapping, got {over!r}")
    return label, path, overrides


def ensure_minimix(data, n_train, n_valid, n_test, seed, max_seconds):
    """Generate a MiniMix into ``data`` unless one is there already."""
    if (Path(data) / "wav8k" / "min" / "tt" / "mix").is_dir():
        return
    from generate_minimix import generate_minimix

    print(f"generating MiniMix into {data} ...", flush=True)
    generate_minimix(str(data), n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed,
                     max_seconds=max_seconds)


def run_overrides(label, overrides, data, out):
    """The yaml overrides of one model's run: its data, its output folder ``out/label``, ``overrides``."""
    return {"data_folder": str(data), "output_folder": str(Path(out) / label), **overrides}


def build(label, yaml_path, overrides, data, out):
    """The Brain, the train DataLoader and the test dataset, as train.py builds them."""
    from prepare_wsj0mix import prepare_wsj0mix
    from train import dataio_prep

    with open(yaml_path, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, run_overrides(label, overrides, data, out))
    prepare_wsj0mix(hparams["data_folder"], hparams["save_folder"], n_spks=hparams["num_spks"],
                    sample_rate=hparams["sample_rate"], version=hparams["data_version"])
    datasets = dataio_prep(hparams)
    brain = hparams["brain_class"](
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=None,
    )
    loader = brain.make_dataloader(datasets["train"], sb.Stage.TRAIN, ckpt_prefix=None,
                                   **hparams["train_dataloader_opts"])
    return brain, loader, datasets["test"]


def held_out(test_set, n_eval, max_seconds, sample_rate):
    """The first ``n_eval`` test mixtures, cropped to ``max_seconds``: (id, mix (1,1,n), ref (1,K,n))."""
    items = []
    for i in range(min(n_eval, len(test_set))):
        ex = test_set[i]
        n = ex["mix_sig"].shape[-1]
        if max_seconds is not None:
            n = min(n, int(max_seconds * sample_rate))
        k = 1
        refs = []
        while f"s{k}_sig" in ex:
            refs.append(ex[f"s{k}_sig"][:n])
            k += 1
        items.append((ex["id"], ex["mix_sig"][None, None, :n], torch.stack(refs)[None]))
    return items


@torch.no_grad()
def evaluate(brain, items, sample_rate):
    """Mean and std of the per-utterance SI-SDRi (dB) on ``items``."""
    brain.modules.eval()
    vals = []
    for utt_id, mix, ref in items:
        est = brain.separate(mix, [utt_id], sb.Stage.TEST)
        res = evaluate_separation(est[0], ref[0], mix[0, 0], sample_rate, metrics=("si_sdri",))
        vals.append(sum(res["si_sdri"]) / len(res["si_sdri"]))
    brain.modules.train()
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def make_saver(brain, yaml_path, overrides, folder):
    """A SpeechBrain Checkpointer over the score model and its EMA in ``folder/save``, and the
    resolved yaml as ``folder/hyperparams.yaml`` (what ``train.py`` leaves in its output folder)."""
    from hyperpyyaml import resolve_references

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(yaml_path, encoding="utf-8") as f:
        (folder / "hyperparams.yaml").write_text(resolve_references(f, overrides).getvalue())
    recoverables = {"score_model": brain.modules["score_model"]}
    if getattr(brain, "ema", None) is not None:
        recoverables["ema"] = brain.ema
    return sb.utils.checkpoints.Checkpointer(str(folder / "save"), recoverables=recoverables)


def learning_curve(brain, loader, items, minutes, points, sample_rate, log, saver=None, progress=None):
    """Train for ``minutes`` of training time; evaluate at 0 and ``points`` evenly spaced times.

    ``progress(curve)`` is called after every evaluation (the caller writes the JSON, so a run
    stopped early keeps its points)."""
    brain.on_fit_start()
    brain.modules.train()
    marks = [minutes * 60.0 * k / points for k in range(1, points + 1)]
    curve = []
    mean, std = evaluate(brain, items, sample_rate)
    curve.append({"minutes": 0.0, "steps": 0, "si_sdri": mean, "si_sdri_std": std, "train_loss": None})
    log(f"  0.0 min, 0 steps: SI-SDRi {mean:.2f} dB")
    trained, steps, losses = 0.0, 0, []
    while marks:
        for batch in loader:
            t0 = time.perf_counter()
            brain.step += 1
            losses.append(float(brain.fit_batch(batch)))
            trained += time.perf_counter() - t0
            steps += 1
            if trained >= marks[0]:
                break
        if trained >= marks[0]:
            marks.pop(0)
            mean, std = evaluate(brain, items, sample_rate)
            loss = sum(losses) / len(losses)
            losses = []
            curve.append({"minutes": trained / 60, "steps": steps, "si_sdri": mean, "si_sdri_std": std,
                          "train_loss": loss})
            log(f"  {trained / 60:.1f} min, {steps} steps: SI-SDRi {mean:.2f} dB (train loss {loss:.3f})")
            if progress is not None:
                progress(curve)
            if saver is not None:
                saver.save_and_keep_only(meta={"si_sdri": mean, "minutes": trained / 60, "steps": steps},
                                         num_to_keep=1)
    return curve


def markdown(curves, minutes, n_eval):
    """A table: one row per evaluation point, one column per model."""
    labels = list(curves)
    lines = [
        f"SI-SDRi (dB, mean +- std over {n_eval} held-out MiniMix mixtures) after t minutes of CPU "
        f"training ({minutes} min per model); steps = optimizer steps done.",
        "",
        "| point | " + " | ".join(f"{lab}: t (min) | {lab}: steps | {lab}: SI-SDRi" for lab in labels) + " |",
        "|---" * (1 + 3 * len(labels)) + "|",
    ]
    n = max(len(c) for c in curves.values())
    for i in range(n):
        cells = [str(i)]
        for lab in labels:
            c = curves[lab]
            if i < len(c):
                p = c[i]
                std = "" if p.get("si_sdri_std") is None else f" +- {p['si_sdri_std']:.2f}"  # None: not recorded
                cells += [f"{p['minutes']:.1f}", str(p["steps"]), f"{p['si_sdri']:.2f}{std}"]
            else:
                cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.errorbar([p["minutes"] for p in c], [p["si_sdri"] for p in c],
                    yerr=[p.get("si_sdri_std") or 0.0 for p in c], marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_xlabel("CPU training time (min)")
    ax.set_ylabel("SI-SDRi on held-out MiniMix (dB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths, out, minutes, n_eval):
    """One table and one PNG from several ``learning_curves.json`` (labels must differ)."""
    curves = {}
    for path in paths:
        for label, curve in json.loads(Path(path).read_text()).items():
            if label in curves:
                raise ValueError(f"--merge: label {label!r} appears twice ({path})")
            curves[label] = curve
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curves.json").write_text(json.dumps(curves, indent=1))
    table = markdown(curves, minutes, n_eval)
    (out / "learning_curves.md").write_text(table)
    plot(curves, out / "learning_curves.png")
    print(table)
    print(f"wrote {out / 'learning_curves.md'}, {out / 'learning_curves.png'}")
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training time per model")
    parser.add_argument("--points", type=int, default=5, help="evaluation points (besides t=0)")
    parser.add_argument("--model", action="append", default=None, help="LABEL=YAML[@OVERRIDES] (repeatable)")
    parser.add_argument("--data", default=str(ROOT / "results" / "minimix"), help="MiniMix folder")
    parser.add_argument("--out", default=str(ROOT / "results" / "learn_minimix"))
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-valid", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=4.0, help="MiniMix mixture length cap")
    parser.add_argument("--n-eval", type=int, default=8, help="held-out mixtures per evaluation")
    parser.add_argument("--eval-seconds", type=float, default=3.0, help="crop of the held-out mixtures")
    parser.add_argument("--eval-steps", type=int, default=10, help="DiffSep sampler steps at evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only on an idle machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="keep each model's weights (recipe folder layout)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only combine the learning_curves.json of runs made side by side (e.g. one "
                             "process per model) into one table and PNG in --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.minutes, args.n_eval)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_minimix(args.data, args.n_train, args.n_valid, args.n_test, args.seed, args.max_seconds)
    models = [parse_model(s) for s in (args.model or DEFAULT_MODELS)]

    def log(msg):
        print(msg, flush=True)
        with open(out / "log.txt", "a") as f:
            f.write(msg + "\n")

    curves = {}
    for label, path, overrides in models:
        log(f"{label}: {path.name} {overrides or ''}")
        torch.manual_seed(args.seed)
        run = {"seed": args.seed, **overrides}
        brain, loader, test_set = build(label, path, run, args.data, out)
        if hasattr(brain.hparams, "separation_options"):
            brain.hparams.separation_options = {**brain.hparams.separation_options, "num_steps": args.eval_steps}
        items = held_out(test_set, args.n_eval, args.eval_seconds, int(brain.hparams.sample_rate))
        saver = None
        if args.save and "score_model" in brain.modules:
            saver = make_saver(brain, path, run_overrides(label, run, args.data, out), out / label)

        def progress(curve, label=label):
            (out / "learning_curves.json").write_text(json.dumps({**curves, label: curve}, indent=1))

        curves[label] = learning_curve(brain, loader, items, args.minutes, args.points,
                                       int(brain.hparams.sample_rate), log, saver, progress)
        (out / "learning_curves.json").write_text(json.dumps(curves, indent=1))

    table = markdown(curves, args.minutes, len(items))
    (out / "learning_curves.md").write_text(table)
    plot(curves, out / "learning_curves.png")
    print(table)
    print(f"wrote {out / 'learning_curves.md'}, {out / 'learning_curves.png'}")
    return curves


if __name__ == "__main__":
    main()
