"""SI-SDRi against NFE for every sampler in refiner mode (a model folder with ``init_separator``).

Each sampler starts at the folder's ``t_start`` around the initial separator's estimate; the
paper's PC-30 (60 calls) is the reference row.

    python benchmarks/refiner_samplers.py --model pretrained/diffsep-minimix \\
        --data <minimix run>/save/test.csv --n-utts 16
"""

import argparse
import csv

import soundfile as sf
import torch

from speechbrain_diffsep.inference import DiffSepSeparation
from speechbrain_diffsep.metrics import apply_permutation, best_permutation, si_sdr

GRID = [("pc", 30), ("pc", 2), ("pc", 3), ("pc", 5), ("em", 3), ("em", 5), ("em", 10), ("ode", 2), ("ode", 3),
        ("ode", 4), ("ode", 6), ("edm", 2), ("edm", 3), ("edm", 4), ("edm", 6)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained/diffsep-minimix")
    p.add_argument("--data", required=True, help="SpeechBrain CSV with mix_wav, s1_wav, s2_wav")
    p.add_argument("--n-utts", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = DiffSepSeparation.from_hparams(source=args.model, savedir=args.model)
    if model.init_separator is None:
        p.error(f"{args.model} has no init_separator: not a refiner folder")
    with open(args.data) as f:
        utts = list(csv.DictReader(f))[: args.n_utts]
    data = []
    for u in utts:
        mix = torch.from_numpy(sf.read(u["mix_wav"], dtype="float32")[0])[None]
        refs = torch.stack([torch.from_numpy(sf.read(u[f"s{k}_wav"], dtype="float32")[0]) for k in (1, 2)])
        data.append((mix, refs))
    print(f"refiner t_start = {model.hparams.t_start}, {len(data)} mixtures")
    print("| sampler | steps | NFE | SI-SDRi (dB) |\n|---|---|---|---|")
    for name, steps in GRID:
        vals = []
        for i, (mix, refs) in enumerate(data):
            est = model.separate_batch(mix, sampler=name, num_steps=steps, seed=i)[0].T[None]
            est = apply_permutation(est, best_permutation(est, refs[None]))[0]
            vals.append(float((si_sdr(est, refs) - si_sdr(mix.expand(2, -1), refs)).mean()))
        print(f"| {name} | {steps} | {model.last_nfe} | {sum(vals) / len(vals):.2f} |", flush=True)


if __name__ == "__main__":
    main()
