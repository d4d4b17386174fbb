"""Experiment: repeated restarts ("restart sampling", Xu et al., NeurIPS 2023) on a from-prior DiffSep.

A restart sampler makes one denoiser call at T, draws fresh noise around that estimate on the true
marginal at ``restart_t`` and makes one more call (``ddim``, 1 step, ``restart_t=0.5``: 2 calls; the
folder's default sampler is a row of its own). Here that renoise-and-denoise cycle is repeated: after the first
restart, ``cycles - 1`` more times fresh noise is drawn around the current estimate at ``t_cycle``
and ``steps`` DDIM steps go back to t_eps. Scores SI-SDRi (SI-SIR permutation), narrow-band PESQ
and DNSMOS P.835 OVRL per setting, against one denoiser call, the 2-call restart and the folder's default::

    python benchmarks/restart_cycles.py --model pretrained/diffsep-small-minimix --data <minimix> --n 10 \\
        --out benchmarks/results/restart_cycles 4@0.5,0.2 8@0.5,0.2 4@0.3,0.15

A setting ``C@R,TC[,S]``: C cycles, first restart at R, later ones at TC, S DDIM steps per cycle
(default 1); network calls = 1 + C x S. The cycles are built from the package's ``ddim_sampler``
(its refiner mode: ``init`` + ``t_start``); not a registered sampler (yet).
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speechbrain_diffsep import sampling  # noqa: E402
from speechbrain_diffsep.metrics import apply_permutation, best_permutation, dnsmos, pesq_score, si_sdr  # noqa: E402


def restart_cycles(score_fn, sde, y, num_steps=1, generator=None, restart_t=0.5, cycles=2, t_cycle=None):
    """``cycles`` renoise-and-denoise cycles after one call at T; NFE = 1 + cycles x num_steps."""
    x, nfe = sampling.ddim_sampler(score_fn, sde, y, num_steps=num_steps, generator=generator, restart_t=restart_t)
    for _ in range(cycles - 1):
        x, n = sampling.ddim_sampler(score_fn, sde, y, num_steps=num_steps, generator=generator,
                                     init=x, t_start=restart_t if t_cycle is None else t_cycle)
        nfe += n
    return x, nfe


def parse_setting(spec):
    cyc, rest = spec.split("@")
    parts = [float(v) for v in rest.split(",")]
    steps = int(parts[2]) if len(parts) > 2 else 1
    return {"label": f"{int(cyc)} cycles, restart {parts[0]:g}, then {parts[1]:g}, {steps} step(s) each",
            "sampler": "restart_cycles", "num_steps": steps,
            "options": {"restart_t": parts[0], "cycles": int(cyc), "t_cycle": parts[1]}}


def test_rows(data, n):
    tt = Path(data) / "wav8k" / "min" / "tt"
    ids = [r["id"] for r in csv.DictReader(open(Path(data) / "metadata" / "tt.csv", encoding="utf-8"))][:n]
    return [{k: tt / k / f"{i}.wav" for k in ("mix", "s1", "s2")} for i in ids]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "pretrained" / "diffsep-small-minimix"))
    p.add_argument("--data", required=True, help="a MiniMix folder (recipes/MiniMix/generate_minimix.py)")
    p.add_argument("--n", type=int, default=10, help="test mixtures (the first n)")
    p.add_argument("--out", type=Path)
    p.add_argument("settings", nargs="*", default=["4@0.5,0.2", "8@0.5,0.2", "4@0.3,0.15"])
    args = p.parse_args(argv)
    from speechbrain_diffsep.inference import DiffSepSeparation

    sampling.SAMPLERS["restart_cycles"] = restart_cycles  # this experiment's sampler, for this process only
    model = DiffSepSeparation.from_hparams(source=args.model, savedir=args.model)
    settings = [{"label": "one denoiser call", "sampler": "ddim", "num_steps": 1, "options": {"restart_t": None}},
                {"label": "ddim 1 step, restart 0.5", "sampler": "ddim", "num_steps": 1,
                 "options": {"restart_t": 0.5}},
                {"label": "the folder's default sampler", "sampler": None, "num_steps": None, "options": {}}] + [
        parse_setting(s) for s in args.settings]
    rows = test_rows(args.data, args.n)
    results = []
    for st in settings:
        t0, per = time.time(), []
        for i, r in enumerate(rows):
            mix, fs = sf.read(r["mix"], dtype="float32")
            refs = torch.stack([torch.from_numpy(sf.read(r[k], dtype="float32")[0]) for k in ("s1", "s2")])
            mix_t = torch.from_numpy(mix)[None]
            model.last_nfe = 0
            est = model.separate_batch(mix_t, sampler=st["sampler"], num_steps=st["num_steps"], seed=i,
                                       **st["options"])[0].T[None]
            est = apply_permutation(est, best_permutation(est, refs[None]))[0]
            per.append((float((si_sdr(est, refs) - si_sdr(mix_t.expand(2, -1), refs)).mean()),
                        float(pesq_score(est, refs, fs).mean()), float(dnsmos(est, fs)["ovrl"].mean()), model.last_nfe))
        mean = [sum(v[j] for v in per) / len(per) for j in range(4)]
        res = {"setting": st["label"], "nfe": mean[3], "si_sdri": round(mean[0], 2), "pesq": round(mean[1], 3),
               "ovrl": round(mean[2], 3), "seconds": round(time.time() - t0, 1)}
        results.append(res)
        print(res, flush=True)
    base = results[0]
    lines = [f"# Repeated restarts on `{Path(args.model).name}`, {len(rows)} MiniMix test mixtures", "",
             "`python benchmarks/restart_cycles.py --n %d %s`" % (args.n, " ".join(args.settings)), "",
             "| setting | NFE | SI-SDRi (dB) | PESQ | DNSMOS OVRL | vs one call: dB / PESQ / OVRL |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['setting']} | {r['nfe']:g} | {r['si_sdri']:.2f} | {r['pesq']:.3f} | {r['ovrl']:.3f} | "
                     f"{r['si_sdri'] - base['si_sdri']:+.2f} / {r['pesq'] - base['pesq']:+.3f} / {r['ovrl'] - base['ovrl']:+.3f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "restart_cycles.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (args.out / "restart_cycles.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
