#!/usr/bin/env python3
"""The main job: separate a bundled MiniMix example with the bundled model.

Writes, into ``--out`` (default ``results/demo``):

- ``<name>_s1.wav``, ``<name>_s2.wav``: the separated sources (peak-normalized, 8 kHz);
- ``<name>_spectrograms.png``: the mixture, the estimates and the references;
- ``<name>_metrics.json`` and a printed table: SI-SDR, SI-SDRi, PESQ, ESTOI (and DNSMOS
  OVRL/SIG/BAK with ``--dnsmos``) of the estimates against the references, and of the mixture.

::

    python examples/demo.py                                   # first bundled example
    python examples/demo.py --example all --sampler pc --steps 30
    python examples/demo.py --mix my_mix.wav --refs s1.wav s2.wav
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_diffsep.inference import DiffSepSeparation, read_audio  # noqa: E402
from speechbrain_diffsep.metrics import evaluate_separation  # noqa: E402

DEFAULT_MODEL = ROOT / "pretrained" / "diffsep-minimix"
EXAMPLES = ROOT / "examples"


def bundled_examples():
    """Names of the bundled examples: ``examples/<name>_mix.wav`` with ``_s1.wav``/``_s2.wav``."""
    return sorted(p.name[: -len("_mix.wav")] for p in EXAMPLES.glob("*_mix.wav"))


def spectrogram_png(path, signals, titles, fs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(signals), 1, figsize=(8, 1.7 * len(signals)), sharex=True)
    for ax, sig, title in zip(np.atleast_1d(axes), signals, titles):
        spec = torch.stft(
            torch.as_tensor(sig, dtype=torch.float32), 256, 64, window=torch.hann_window(256), return_complex=True
        )
        db = 20 * torch.log10(spec.abs() + 1e-6)
        ax.imshow(
            db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 70, vmax=float(db.max()),
            extent=[0, len(sig) / fs, 0, fs / 2000],
        )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("kHz")
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_one(model, mix_path, ref_paths, out_dir, name, args):
    fs = int(model.hparams.sample_rate)
    mix, _ = read_audio(mix_path, fs)  # [1, time], mono at the model's rate
    est = model.separate_batch(mix, sampler=args.sampler, num_steps=args.steps, seed=args.seed)[0].T  # (K, time)
    for k, src in enumerate(est):
        peak = float(src.abs().max()) or 1.0
        sf.write(str(out_dir / f"{name}_s{k + 1}.wav"), (src / peak).numpy(), fs, subtype="PCM_16")
    result = {"example": name, "nfe": model.last_nfe}
    titles = ["mixture"] + [f"estimate {k + 1}" for k in range(est.shape[0])]
    signals = [mix[0].numpy()] + [s.numpy() for s in est]
    if ref_paths:
        refs = torch.cat([read_audio(p, fs)[0] for p in ref_paths])
        n = min(refs.shape[-1], est.shape[-1])
        metrics = ["si_sdr", "si_sdri", "pesq", "estoi"] + (["dnsmos"] if args.dnsmos else [])
        scores = evaluate_separation(est[:, :n], refs[:, :n], mix[0, :n], fs, metrics=metrics)
        mix_scores = evaluate_separation(
            mix[:, :n].expand(refs.shape[0], n), refs[:, :n], mix[0, :n], fs,
            metrics=[m for m in metrics if m != "si_sdri"], permute=False,
        )
        result["estimates"] = {k: float(np.mean(v)) for k, v in scores.items() if k != "perm"}
        result["mixture"] = {k: float(np.mean(v)) for k, v in mix_scores.items() if k != "perm"}
        # plot the estimates in the order of the references they were matched to
        signals[1:] = [est[k].numpy() for k in scores["perm"]]
        titles[1:] = [f"estimate {k + 1} (matched to reference {i + 1})" for i, k in enumerate(scores["perm"])]
        titles += [f"reference {k + 1}" for k in range(refs.shape[0])]
        signals += [r.numpy() for r in refs]
    spectrogram_png(out_dir / f"{name}_spectrograms.png", signals, titles, fs)
    with open(out_dir / f"{name}_metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the bundled MiniMix model)")
    p.add_argument("--example", default=None, help="bundled example name, or 'all' (default: the first)")
    p.add_argument("--mix", help="your own mixture instead of a bundled example")
    p.add_argument("--refs", nargs="*", default=None, help="reference sources of --mix, for the metrics")
    p.add_argument("--out", default=str(ROOT / "results" / "demo"))
    p.add_argument("--sampler", default=None, help="sampler (default: the model's yaml)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dnsmos", action="store_true", help="also compute DNSMOS P.835 (needs the eval extras)")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = DiffSepSeparation.from_hparams(source=args.model, savedir=args.model)
    except ValueError as err:
        sys.exit(f"demo: {err}")
    if args.mix:
        jobs = [(args.mix, args.refs or [], Path(args.mix).stem)]
    else:
        names = bundled_examples()
        if not names:
            sys.exit(f"demo: no bundled examples in {EXAMPLES} (expected <name>_mix.wav, <name>_s1.wav, <name>_s2.wav)")
        chosen = names if args.example == "all" else [args.example or names[0]]
        for n in chosen:
            if n not in names:
                sys.exit(f"demo: unknown example {n!r}; bundled: {', '.join(names)}")
        jobs = [(EXAMPLES / f"{n}_mix.wav", sorted(EXAMPLES.glob(f"{n}_s[0-9].wav")), n) for n in chosen]

    print(f"model: {args.model}  (sampler {args.sampler or model.hparams.sampler}, steps {args.steps or model.hparams.num_steps})")
    for mix_path, refs, name in jobs:
        r = run_one(model, str(mix_path), [str(x) for x in refs], out_dir, name, args)
        print(f"\n{name}: {r['nfe']} network calls -> {out_dir}/{name}_s1.wav, _s2.wav, _spectrograms.png")
        if "estimates" in r:
            keys = list(r["estimates"])
            print("            " + "".join(f"{k:>9s}" for k in keys))
            print("mixture     " + "".join(f"{r['mixture'][k]:9.2f}" if k in r["mixture"] else f"{'-':>9s}" for k in keys))
            print("estimates   " + "".join(f"{r['estimates'][k]:9.2f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
